"""The checkpoint in the serving dtype, in host shared memory.

Served in a dtype other than the checkpoint's (bfloat16 from a float32 checkpoint, say), every
worker would convert its shard for itself: a copy per worker, and another at every switch that
changes a rank's slices. Instead the engine converts the checkpoint once, before the workers
start, into a safetensors copy in host shared memory (/dev/shm where there is one), and the
workers map that copy: a shard is again a set of views, every worker shares the same pages, and
a switch copies no weight. (Where /dev/shm cannot hold the copy, as in a container with a small
one, it is written to the temporary directory instead: a file the workers map all the same.) Floating-point tensors are converted (`Tensor.to`, as a worker would);
others are written as they are.

The copy belongs to one engine: it is made in a directory named after the engine's process and
removed at its shutdown; copies left by engines that no longer run are removed when the next one
starts.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from remp.weights.store import INDEX, checkpoint_files, map_file

SHARED_MEMORY = Path("/dev/shm")
PREFIX = "remp-weights-"


def copy_bytes(model_dir: str, dtype: torch.dtype) -> int:
    """The size of the checkpoint converted to `dtype`, or 0 when every floating-point tensor is in
    `dtype` already (no copy is needed). Reads the files' headers only."""
    total, differs = 0, False
    for name in checkpoint_files(model_dir):
        mapping, tensors = map_file(Path(model_dir, name))
        try:
            differs = differs or any(t.is_floating_point() and t.dtype != dtype for t in tensors.values())
            total += sum(t.numel() * (dtype.itemsize if t.is_floating_point() else t.element_size())
                         for t in tensors.values())
        finally:
            del tensors
            mapping.close()
    return total if differs else 0


def write_serving_copy(model_dir: str, dtype: torch.dtype, out_dir: Path) -> None:
    """Write the checkpoint's safetensors files (and index) into `out_dir`, floating-point tensors
    in `dtype`. One file at a time, so at most one file's converted tensors are in memory."""
    for name in checkpoint_files(model_dir):
        mapping, tensors = map_file(Path(model_dir, name))
        try:
            # copy=True: a tensor already in `dtype` must not stay a view of a mapping closed below.
            converted = {k: t.to(dtype, copy=True) if t.is_floating_point() else t.clone() for k, t in tensors.items()}
        finally:
            del tensors
            mapping.close()
        save_file(converted, out_dir / name, metadata={"format": "pt"})
        del converted
    if (Path(model_dir) / INDEX).is_file():
        shutil.copyfile(Path(model_dir) / INDEX, out_dir / INDEX)


def serving_weights(model_dir: str, dtype: torch.dtype) -> tuple[str, Path | None]:
    """The directory the workers map the weights from, and the copy to remove at shutdown (None
    when the checkpoint is already in `dtype`: the workers map it where it is)."""
    size = copy_bytes(model_dir, dtype)
    if not size:
        return model_dir, None
    root = copy_root(size)
    remove_orphans(root)
    out = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-", dir=root))
    try:
        write_serving_copy(model_dir, dtype, out)
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    return str(out), out


def copy_root(size: int) -> Path:
    """Host shared memory when it can hold `size` bytes with room to spare (a container's /dev/shm
    may be small), else the temporary directory (a disk file, in the page cache all the same)."""
    if SHARED_MEMORY.is_dir() and os.access(SHARED_MEMORY, os.W_OK) \
            and shutil.disk_usage(SHARED_MEMORY).free > 1.25 * size:
        return SHARED_MEMORY
    return Path(tempfile.gettempdir())


def remove_orphans(root: Path) -> None:
    """Remove the copies of engines that no longer run (killed before their shutdown)."""
    for path in root.glob(f"{PREFIX}*"):
        match = re.match(rf"{PREFIX}(\d+)-", path.name)
        if match is None or _alive(int(match.group(1))):
            continue
        shutil.rmtree(path, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
