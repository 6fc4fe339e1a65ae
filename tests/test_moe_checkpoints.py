"""Mixture-of-experts checkpoints in either layout: one tensor per expert (as published
checkpoints and save_pretrained write them) or fused as transformers 5 holds experts in memory
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I]; `make-tiny-model
--fused-experts`). Every rank of every layout of a pool of 4 views the same values in both, and
a fused checkpoint serves transformers' greedy tokens tensor-, expert- and data-parallel."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from remp.config import EngineConfig, ModelConfig
from remp.engine.llm_engine import LLMEngine
from remp.engine.sampling import SamplingParams
from remp.models.registry import model_class
from remp.parallel.context import ParallelContext
from remp.testing.tiny_model import make_tiny_model
from remp.topology import Topology, valid_layouts
from remp.weights.loader import load_weights
from remp.weights.serving_copy import serving_weights
from remp.weights.store import WeightStore
import helpers
from helpers import transformers_greedy

POOL = 4
VARIANTS = {"tiny_mixtral": "mixtral", "tiny_qwen3_moe": "qwen3-moe"}
PROMPTS = [[5, 17, 99, 3, 42], list(range(30, 71)), [400, 2, 250, 7, 7, 7, 19]]
MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def fused(tmp_path_factory) -> dict[str, str]:
    """Fixture name of the per-expert checkpoint -> the same model's fused checkpoint."""
    root = tmp_path_factory.mktemp("fused")
    return {name: str(make_tiny_model(root / variant, variant=variant, fused_experts=True))
            for name, variant in VARIANTS.items()}


def build(path: str, topo: Topology, rank: int, dtype=torch.float32, reuse=None, weights: str | None = None):
    """Rank `rank`'s model under `topo`, its weights from `weights` (default: the checkpoint)."""
    cfg = ModelConfig.from_pretrained(path)
    model = model_class(cfg.architecture)(cfg, ParallelContext(topo, rank), cfg.hf_config())
    store = WeightStore(weights or path)
    load_weights(model, store, dtype, torch.device("cpu"), reuse)
    return store, model


def block_sparse_moe_names(fused_path: str, out) -> str:
    """A fused Mixtral checkpoint with the block under its published name (`block_sparse_moe`)
    instead of transformers' in-memory `mlp`."""
    shutil.copytree(fused_path, out)
    tensors = load_file(out / "model.safetensors")
    renamed = {k.replace(".mlp.", ".block_sparse_moe."): v for k, v in tensors.items()}
    assert any(".block_sparse_moe.experts.gate_up_proj" in k for k in renamed)
    save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
    return str(out)


@pytest.mark.parametrize("per_expert_fixture", list(VARIANTS))
def test_every_rank_views_the_same_values_in_either_layout(request, fused, tmp_path, per_expert_fixture):
    per_expert = request.getfixturevalue(per_expert_fixture)
    store = WeightStore(fused[per_expert_fixture])
    assert not any(".experts.0." in name for name in store._tensors)
    checkpoints = [fused[per_expert_fixture]]
    if per_expert_fixture == "tiny_mixtral":
        checkpoints.append(block_sparse_moe_names(checkpoints[0], tmp_path / "block_sparse_moe"))
    cfg = ModelConfig.from_pretrained(per_expert)
    layouts = valid_layouts(cfg, POOL, data_parallel=True) + [Topology(2, 1, ep=True, placement="round_robin")]
    assert {Topology(2, 1, ep=True), Topology(1, 1, ep=True, dp=2), Topology(4, 1)} <= set(layouts)
    for topo in layouts:
        for rank in range(topo.world_size):
            _, want = build(per_expert, topo, rank)
            want = dict(want.named_parameters())
            for path in checkpoints:
                store, model = build(path, topo, rank)
                got = dict(model.named_parameters())
                assert got.keys() == want.keys(), (topo, rank)
                for name, param in got.items():
                    assert torch.equal(param, want[name]), (path, topo, rank, name)
                    assert store.maps(param), f"{name} copied under {topo} rank {rank}"
    # The same tensor split under another pipeline depth takes every tensor over (equal slices).
    _, model = build(checkpoints[0], Topology(2, 1), 1)
    old = dict(model.named_parameters())
    _, again = build(checkpoints[0], Topology(2, 2), 1, reuse=old)
    assert any(".experts." in n for n, _ in again.named_parameters())
    assert all(old[n] is p for n, p in again.named_parameters())
    # Served in bfloat16: the shared-memory copy converts the fused tensors like any other.
    path, copy = serving_weights(checkpoints[0], torch.bfloat16)
    try:
        for topo in (Topology(2, 1), Topology(2, 1, ep=True)):
            store, model = build(checkpoints[0], topo, 1, dtype=torch.bfloat16, weights=path)
            _, want = build(per_expert, topo, 1)
            want = dict(want.named_parameters())
            for name, param in model.named_parameters():
                assert torch.equal(param, want[name].to(torch.bfloat16)), (topo, name)
                assert store.maps(param), (topo, name)
    finally:
        shutil.rmtree(copy)


@pytest.mark.parametrize("per_expert_fixture", list(VARIANTS))
def test_a_fused_checkpoint_matches_transformers_on_each_kind_of_layout(fused, per_expert_fixture):
    """tp1pp1, tp2pp1 and tp2pp1ep on one engine (switched live), dp2tp1pp1ep on its own (a
    switch to or from dp > 1 is refused)."""
    path = fused[per_expert_fixture]
    reference = transformers_greedy(path, PROMPTS, MAX_TOKENS)

    def check(engine: LLMEngine, layout: Topology) -> None:
        outs = helpers.generate(engine, PROMPTS, GREEDY, f"{layout}-")[0]
        for out, (tokens, logits) in zip(outs, reference):
            assert out.token_ids == tokens, layout
            for step, ref in zip(out.logprobs, logits):
                for token, logprob in step.items():
                    assert abs(logprob - float(ref[token])) < 1e-4, layout

    common = dict(dtype="float32", model=path, worker_pool_size=POOL, max_model_len=128, block_size=4)
    engine = LLMEngine(EngineConfig(**common))
    try:
        for layout in (Topology(1, 1), Topology(2, 1), Topology(2, 1, ep=True)):
            if layout != engine.topology:
                result = engine.reconfigure(layout, lambda outs: None)
                assert result.outcome == "committed", result.reason
            check(engine, layout)
    finally:
        engine.shutdown()
    engine = LLMEngine(EngineConfig(**common, data_parallel_size=2, enable_expert_parallel=True))
    try:
        assert engine.topology == Topology(1, 1, ep=True, dp=2)
        check(engine, engine.topology)
    finally:
        engine.shutdown()
