"""Decode attention that reads the paged KV cache in place, on CPU (`paged_attention.cpp`).

Why remp builds its own: PyTorch's attention kernels take keys and values as dense
[batch, heads, length, dim] tensors, so a paged cache must first be gathered into a padded copy,
every layer of every step. Flex attention accepts a paged block mask, but in torch 2.13 its CPU
template fails to compile with dynamic shapes and at larger static ones, compiles seconds per new
shape, and where it runs it was twice as slow as gather + SDPA at a 128-token context; Intel's
extension (IPEX) stops at torch 2.8; vLLM's CPU op ships only inside vLLM. The kernel here is
one C++ loop nest (a task per token, or per token and KV head when there are fewer tokens than
threads; float32 softmax), built once per machine with torch's extension builder, the way
PyTorch documents custom C++ operators.

`load()` builds (first use; ~10 s) or loads the library and registers `torch.ops.remp.paged_attention`.
It answers False, with the reason in `unavailable`, where it cannot be built (no C++ compiler):
attention then gathers the cache as before. `scripts/setup.sh` builds it at install time.
"""
from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("paged_attention.cpp")
# -ffast-math lets gcc vectorise the softmax's exp (glibc's libmvec) and the dot products' sums:
# 0.40 -> 0.23 ms for 32 decodes at a 128-token context. It is a compile flag only: torch's
# builder links without it, so no crtfastmath flushes denormals for the rest of the process.
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]

_lock = threading.Lock()
_loaded: bool | None = None
unavailable: str | None = None


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return ""


def library_name() -> str:
    """The extension's name: it names the CPU's feature flags too, since -march=native code built
    on one CPU may not run on another that shares the cache directory."""
    digest = hashlib.sha1(("\n".join(CFLAGS) + _cpu_flags()).encode()).hexdigest()[:12]
    return f"remp_paged_attention_{digest}"


def load() -> bool:
    """Build (once per machine) or load the kernel; True when torch.ops.remp.paged_attention works."""
    global _loaded, unavailable
    with _lock:
        if _loaded is None:
            try:
                from torch.utils.cpp_extension import load as build

                build(name=library_name(), sources=[str(SOURCE)], extra_cflags=CFLAGS, is_python_module=False,
                      verbose=os.environ.get("REMP_VERBOSE_BUILD") == "1")
                _loaded = True
            except Exception as e:  # no compiler, no ninja, a failed build: serve with the gather path
                unavailable = f"{type(e).__name__}: {str(e).strip().splitlines()[-1] if str(e).strip() else ''}"
                log.warning("paged-attention kernel unavailable (%s); decode attention gathers the cache", unavailable)
                _loaded = False
        return _loaded


def paged_attention(query: torch.Tensor, cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, scale: float) -> torch.Tensor:
    """query [T, heads, dim] attends to the first context_lens[t] slots of block_tables[t] in
    cache [blocks, 2, block_size, kv_heads, dim]; int32 tables and lengths. -> [T, heads, dim]."""
    return torch.ops.remp.paged_attention(query, cache, block_tables, context_lens, scale)


if __name__ == "__main__":  # scripts/setup.sh: build at install time
    if not load():
        raise SystemExit(f"paged-attention kernel not built: {unavailable}")
    print(f"paged-attention kernel ready ({library_name()})")
