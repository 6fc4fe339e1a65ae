"""Shared fixtures: tiny checkpoints made once per test session."""
from __future__ import annotations

import pytest

from remp.testing.tiny_model import make_tiny_model


@pytest.fixture(scope="session")
def tiny_gqa(tmp_path_factory) -> str:
    """Llama, 8 query heads / 2 KV heads, 4 layers: every layout of a pool of 4 is valid."""
    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-gqa", variant="gqa"))


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen2", variant="qwen2"))


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    """Qwen3: per-head q/k norms, head_dim 32 (not hidden / heads), 4 query / 2 KV heads."""
    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3", variant="qwen3"))


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> str:
    """Mixtral: 8 query / 2 KV heads, 8 experts of width 96, top-2 renormalised, 4 layers."""
    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-mixtral", variant="mixtral"))


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory) -> str:
    """Qwen3-MoE: as tiny_qwen3, 8 experts of width 48, top-2 renormalised, layer 1 dense."""
    return str(make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-qwen3-moe", variant="qwen3-moe"))
