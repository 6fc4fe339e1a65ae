"""The host a benchmark ran on, as every benchmark reports it: a ratio holds for its CPU."""
from __future__ import annotations

import os
import platform
from dataclasses import asdict, dataclass

# The instruction-set flags that decide which kernels (and which dtype) run fastest here.
FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


@dataclass(frozen=True)
class HostInfo:
    cpu: str  # the model name /proc/cpuinfo gives
    cores: int  # os.cpu_count()
    flags: tuple[str, ...]  # of FLAGS, those the CPU has

    def __str__(self) -> str:
        return f"{self.cpu}, {self.cores} cores, {' '.join(self.flags) or 'no AVX2'}"

    def to_dict(self) -> dict:
        return asdict(self)


def host_info() -> HostInfo:
    name, flags = platform.processor() or "unknown", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                if name and flags:
                    break
    except OSError:
        pass
    return HostInfo(name, os.cpu_count() or 1, tuple(f for f in FLAGS if f in flags))
