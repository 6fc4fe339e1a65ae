"""Shared fixtures: tiny checkpoints made once per test session."""
from __future__ import annotations

import pytest

from remp.testing.tiny_model import make_tiny_model


def _tiny(tmp_path_factory, variant: str) -> str:
    return str(make_tiny_model(tmp_path_factory.mktemp("models") / f"tiny-{variant}", variant=variant))


@pytest.fixture(scope="session")
def tiny_gqa(tmp_path_factory) -> str:
    """Llama, 8 query heads / 2 KV heads, 4 layers: every layout of a pool of 4 is valid."""
    return _tiny(tmp_path_factory, "gqa")


@pytest.fixture(scope="session")
def tiny_qwen2(tmp_path_factory) -> str:
    return _tiny(tmp_path_factory, "qwen2")


@pytest.fixture(scope="session")
def tiny_qwen3(tmp_path_factory) -> str:
    """Qwen3: per-head q/k norms, head_dim 32 (not hidden / heads), 4 query / 2 KV heads."""
    return _tiny(tmp_path_factory, "qwen3")


@pytest.fixture(scope="session")
def tiny_mixtral(tmp_path_factory) -> str:
    """Mixtral: 8 query / 2 KV heads, 8 experts of width 96, top-2 renormalised, 4 layers."""
    return _tiny(tmp_path_factory, "mixtral")


@pytest.fixture(scope="session")
def tiny_qwen3_moe(tmp_path_factory) -> str:
    """Qwen3-MoE: as tiny_qwen3, 8 experts of width 48, top-2 renormalised, layer 1 dense."""
    return _tiny(tmp_path_factory, "qwen3-moe")


@pytest.fixture(scope="session")
def tiny_qwen2_moe(tmp_path_factory) -> str:
    """Qwen2-MoE: q/k/v bias, 4 query / 2 KV heads, 8 experts of width 48, top-2 not renormalised,
    a shared expert of width 64 with its sigmoid gate, layer 2 dense."""
    return _tiny(tmp_path_factory, "qwen2-moe")
