"""The checkpoint converted once into the serving dtype, in shared memory (remp.weights.serving_copy)."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

from remp.testing.tiny_model import make_tiny_model
from remp.weights.serving_copy import PREFIX, remove_orphans, serving_weights
from remp.weights.store import INDEX, WeightStore


def test_a_sharded_checkpoint_is_converted_tensor_for_tensor(tmp_path):
    model = make_tiny_model(tmp_path / "sharded", variant="qwen2", max_shard_size="200KB")
    assert (model / INDEX).is_file()
    path, copy = serving_weights(str(model), torch.bfloat16)
    try:
        assert copy is not None and Path(path) == copy and (copy / INDEX).is_file()
        original, converted = WeightStore(str(model)), WeightStore(path)
        assert set(original._tensors) == set(converted._tensors)
        for name, tensor in original._tensors.items():
            assert converted.full(name).dtype == torch.bfloat16
            assert torch.equal(converted.full(name), tensor.to(torch.bfloat16)), name
    finally:
        shutil.rmtree(copy)


def test_the_checkpoint_dtype_needs_no_copy(tiny_gqa):
    assert serving_weights(tiny_gqa, torch.float32) == (tiny_gqa, None)


def test_copies_of_engines_that_no_longer_run_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    orphan = tmp_path / f"{PREFIX}{int(dead.stdout)}-x"
    mine = tmp_path / f"{PREFIX}{__import__('os').getpid()}-y"
    other = tmp_path / "unrelated"
    for d in (orphan, mine, other):
        d.mkdir()
    remove_orphans(tmp_path)
    assert not orphan.exists() and mine.exists() and other.exists()


def test_a_checkpoint_of_mixed_dtypes_is_converted_whole(tmp_path):
    """A tensor already in the serving dtype is copied too, not left a view of the source file's
    mapping (which is closed before the copy is written)."""
    from safetensors.torch import save_file

    src = tmp_path / "mixed"
    src.mkdir()
    tensors = {"a": torch.randn(64, 64, dtype=torch.bfloat16), "b": torch.randn(64, 64),
               "ids": torch.arange(10, dtype=torch.int64)}
    save_file(tensors, src / "model.safetensors")
    path, copy = serving_weights(str(src), torch.bfloat16)
    try:
        store = WeightStore(path)
        assert torch.equal(store.full("a"), tensors["a"]) and torch.equal(store.full("b"), tensors["b"].bfloat16())
        assert torch.equal(store.full("ids"), tensors["ids"])
    finally:
        shutil.rmtree(copy)


def test_a_copy_too_big_for_shared_memory_goes_to_the_temporary_directory():
    import tempfile

    from remp.weights.serving_copy import SHARED_MEMORY, copy_root
    assert copy_root(1) == (SHARED_MEMORY if SHARED_MEMORY.is_dir() else Path(tempfile.gettempdir()))
    assert copy_root(shutil.disk_usage(SHARED_MEMORY).free if SHARED_MEMORY.is_dir() else 1) == \
        Path(tempfile.gettempdir())
