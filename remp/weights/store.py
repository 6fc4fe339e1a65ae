"""The checkpoint, mapped once, viewed as any rank's shard for any topology.

Safetensors files are memory-mapped (private, copy-on-write: nothing can write back), and a
shard is a set of *views* into that mapping: the rows of q/k/v/gate/up and the embedding that a
tensor rank owns are contiguous, the columns of o/down are strided views that BLAS reads in
place, and an expert of a fused experts tensor ([E, ...]) is a view of its index. Every worker on a host therefore shares the same page-cache pages, the checkpoint sits
in host memory once however many workers map it, and building the shard for a new
(topology, rank) costs no copy, no file read and no other worker (remp.weights.loader puts
the views in a model's parameters). Copies happen only where a view cannot serve: vocabulary
padding, a device other than the CPU. (A serving dtype other than the checkpoint's is served from
a converted copy in shared memory, mapped the same way: remp.weights.serving_copy.)

safetensors' own loaders copy every tensor they return, hence the small header reader here;
the format (8-byte little-endian header length, JSON header, raw data) is its documented spec.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path

import torch

from remp.config import ModelError

_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _map_safetensors(path: Path) -> tuple[mmap.mmap, dict[str, torch.Tensor]]:
    """Every tensor of one safetensors file as a view of a private mapping of it."""
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    (header_len,) = struct.unpack("<Q", mapping[:8])
    header = json.loads(mapping[8:8 + header_len])
    header.pop("__metadata__", None)
    tensors = {}
    for name, meta in header.items():
        if meta["dtype"] not in _DTYPES:
            raise ModelError(f"{path.name}: tensor {name!r} has dtype {meta['dtype']}, which remp cannot load")
        dtype = _DTYPES[meta["dtype"]]
        start, end = meta["data_offsets"]
        count = (end - start) // dtype.itemsize
        flat = (torch.frombuffer(mapping, dtype=dtype, count=count, offset=8 + header_len + start) if count
                else torch.empty(0, dtype=dtype))
        tensors[name] = flat.view(meta["shape"])
    return mapping, tensors


INDEX = "model.safetensors.index.json"


def checkpoint_files(model_dir: str) -> list[str]:
    """The safetensors files of the checkpoint in `model_dir` (one, or those its index names)."""
    root = Path(model_dir)
    if (root / INDEX).is_file():
        return sorted(set(json.loads((root / INDEX).read_text())["weight_map"].values()))
    if (root / "model.safetensors").is_file():
        return ["model.safetensors"]
    raise ModelError(f"no model.safetensors or {INDEX} in {model_dir!r}")


def map_file(path: Path) -> tuple[mmap.mmap, dict[str, torch.Tensor]]:
    """Every tensor of one safetensors file as a view of a private mapping of it."""
    return _map_safetensors(path)


class WeightStore:
    """Named tensors of a (possibly sharded) safetensors checkpoint, mapped into memory."""

    def __init__(self, model_dir: str):
        root = Path(model_dir)
        files = checkpoint_files(model_dir)
        self._tensors: dict[str, torch.Tensor] = {}
        self._spans: list[tuple[int, int]] = []  # address ranges of the mappings
        self._mappings = []
        for f in files:
            mapping, tensors = _map_safetensors(root / f)
            self._mappings.append(mapping)
            base = torch.frombuffer(mapping, dtype=torch.uint8).data_ptr()
            self._spans.append((base, base + len(mapping)))
            self._tensors.update(tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def maps(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` is a view of the mapped checkpoint (so holding it copies nothing)."""
        if tensor.device.type != "cpu":
            return False
        ptr = tensor.untyped_storage().data_ptr()
        return any(lo <= ptr < hi for lo, hi in self._spans)

    def rows(self, name: str, idx: range) -> torch.Tensor:
        """Rows idx of a tensor (whole tensor for 1-D); rows past the end are zero (vocab padding)."""
        full = self._tensors[name]
        n = full.shape[0]
        part = full[idx.start:min(idx.stop, n)]
        if idx.stop > n:
            pad = torch.zeros((idx.stop - max(idx.start, n),) + tuple(part.shape[1:]), dtype=part.dtype)
            part = torch.cat([part, pad])
        return part

    def cols(self, name: str, idx: range) -> torch.Tensor:
        return self._tensors[name][:, idx.start:idx.stop]

    def full(self, name: str) -> torch.Tensor:
        return self._tensors[name]

    def expert(self, name: str, index: int, half: int | None = None) -> torch.Tensor:
        """Expert `index` of a fused experts tensor [E, ...]; with `half` (0 or 1), the first or
        second half of its rows. A view, like the rest."""
        part = self._tensors[name][index]
        if half is None:
            return part
        n = part.shape[0] // 2
        return part[half * n:(half + 1) * n]
