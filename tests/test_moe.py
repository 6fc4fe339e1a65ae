"""Mixture-of-experts models (Mixtral, Qwen3-MoE) under tensor parallelism over the experts'
width: transformers-exact greedy tokens and log-probabilities on every layout of a pool of 4,
tokens kept across a live tour of layouts, and the experts' block against transformers' own on a
router that sends every token to the same expert."""
from __future__ import annotations

import pytest
import torch

from remp.config import EngineConfig, ModelConfig
from remp.engine.llm_engine import LLMEngine
from remp.engine.sampling import SamplingParams
from remp.topology import Topology, valid_layouts
from helpers import transformers_greedy

POOL = 4
PROMPTS = [[5, 17, 99, 3, 42], list(range(30, 71)), [400, 2, 250, 7, 7, 7, 19]]
MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=3)
FAMILIES = ["tiny_mixtral", "tiny_qwen3_moe"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(checkpoint, engine on a pool of 4, transformers' greedy reference), per family."""
    path = request.getfixturevalue(request.param)
    eng = LLMEngine(EngineConfig(dtype="float32", model=path, worker_pool_size=POOL, max_model_len=128, block_size=4))
    yield path, eng, transformers_greedy(path, PROMPTS, MAX_TOKENS)
    eng.shutdown()


def generate(engine: LLMEngine, tag: str, switch_to: list[Topology] = ()) -> list:
    """Run PROMPTS to the end; with `switch_to`, switch live to each layout in turn, two steps apart."""
    done = {}

    def book(outs):
        done.update({o.request_id: o for o in outs if o.finished})

    for i, p in enumerate(PROMPTS):
        engine.add_request(f"{tag}{i}", p, GREEDY)
    pending, steps = list(switch_to), 0
    while engine.has_unfinished():
        book(engine.step())
        steps += 1
        if pending and steps % 2 == 0:
            result = engine.reconfigure(pending.pop(0), book)
            assert result.outcome == "committed", result.reason
    assert not pending, "the requests ended before every switch"
    return [done[f"{tag}{i}"] for i in range(len(PROMPTS))]


def test_every_layout_of_the_pool_matches_transformers(family):
    path, engine, reference = family
    layouts = valid_layouts(ModelConfig.from_pretrained(path), POOL)
    assert {(t.tp, t.pp) for t in layouts} >= {(1, 1), (2, 1), (4, 1), (1, 2), (2, 2), (1, 4)}
    for layout in layouts:
        engine.reconfigure(layout, lambda outs: None)
        for out, (tokens, logits) in zip(generate(engine, f"{layout}-"), reference):
            assert out.token_ids == tokens, layout
            for step, ref in zip(out.logprobs, logits):
                for token, logprob in step.items():
                    assert abs(logprob - float(ref[token])) < 1e-4, layout


def test_requests_keep_their_tokens_across_a_live_tour(family):
    _, engine, reference = family
    engine.reconfigure(Topology(1, 1), lambda outs: None)
    tour = [Topology(2, 1), Topology(1, 2), Topology(4, 1), Topology(2, 2), Topology(1, 1)]
    outs = generate(engine, "tour-", switch_to=tour)
    assert [o.token_ids for o in outs] == [tokens for tokens, _ in reference]


@pytest.mark.parametrize("variant", ["tiny_mixtral", "tiny_qwen3_moe"])
def test_a_router_that_sends_every_token_to_one_expert(request, variant):
    """Router weights that make expert 4 every token's first choice (positive inputs, one positive
    router row): the experts' block equals transformers' own block with the same weights."""
    from transformers import AutoConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    from remp.layers.moe import SparseMoE
    from remp.parallel.context import ParallelContext

    path = request.getfixturevalue(variant)
    cfg, hf_cfg = ModelConfig.from_pretrained(path), AutoConfig.from_pretrained(path)
    mixtral = cfg.architecture == "MixtralForCausalLM"
    names = ("w1", "w3", "w2") if mixtral else ("gate_proj", "up_proj", "down_proj")
    moe = SparseMoE(cfg, ParallelContext(Topology(1, 1), 0), "x", names)
    gen = torch.Generator().manual_seed(1)
    E, H, I = cfg.moe.num_experts, cfg.hidden_size, cfg.moe.intermediate_size
    router = torch.zeros(E, H)
    router[4] = 1.0
    w_gate, w_up, w_down = (torch.randn(E, *shape, generator=gen) * 0.2 for shape in ((I, H), (I, H), (H, I)))
    moe.router_weight = torch.nn.Parameter(router)
    for e, expert in enumerate(moe.experts):
        expert.gate_weight, expert.up_weight, expert.down_weight = (
            torch.nn.Parameter(w[e]) for w in (w_gate, w_up, w_down))
    block = (MixtralSparseMoeBlock if mixtral else Qwen3MoeSparseMoeBlock)(hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(router)
        block.experts.gate_up_proj.copy_(torch.cat([w_gate, w_up], dim=1))
        block.experts.down_proj.copy_(w_down)
    x = torch.rand(9, H, generator=gen)  # positive: expert 4's logit is the only positive one
    chosen, _ = moe.route(x)
    assert (chosen[:, 0] == 4).all()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), block(x[None])[0], atol=1e-6, rtol=1e-5)
