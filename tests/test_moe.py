"""Mixture-of-experts models (Mixtral, Qwen3-MoE), their experts tensor-parallel (cut over their
width) or expert-parallel (whole, spread over a stage's dp * tp ranks), with data-parallel
attention or without: transformers-exact greedy tokens and log-probabilities on every layout of a
pool of 4, tokens kept across a live tour of every ordered pair of layouts (TP <-> EP, EP 2 -> 4 ->
2 with standbys, tp2 <-> dp2, ...), and the experts' block against transformers' own on a router
that sends every token to the same expert."""
from __future__ import annotations

import pytest
import torch

from remp.config import EngineConfig, ModelConfig
from remp.engine.llm_engine import LLMEngine
from remp.engine.sampling import SamplingParams
from remp.topology import Topology, valid_layouts
import helpers
from helpers import remp_server, transformers_greedy

POOL = 4
PROMPTS = [[5, 17, 99, 3, 42], list(range(30, 71)), [400, 2, 250, 7, 7, 7, 19]]
MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=3)
FAMILIES = ["tiny_mixtral", "tiny_qwen3_moe", "tiny_qwen2_moe"]


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    """(checkpoint, engine on a pool of 4, transformers' greedy reference), per family."""
    path = request.getfixturevalue(request.param)
    eng = LLMEngine(EngineConfig(dtype="float32", model=path, worker_pool_size=POOL, max_model_len=128, block_size=4))
    yield path, eng, transformers_greedy(path, PROMPTS, MAX_TOKENS)
    eng.shutdown()


def generate(engine: LLMEngine, tag: str, switch_to: list[Topology] = ()) -> list:
    """Run PROMPTS to the end; with `switch_to`, switch live to each layout in turn, a step apart."""
    return helpers.generate(engine, PROMPTS, GREEDY, tag, switch_to, start=2, every=1)[0]


def test_every_layout_of_the_pool_matches_transformers(family):
    path, engine, reference = family
    layouts = valid_layouts(ModelConfig.from_pretrained(path), POOL)
    assert set(map(str, layouts)) >= {"tp1pp1", "tp2pp1", "tp4pp1", "tp1pp2", "tp2pp2", "tp1pp4", "tp2pp1ep",
                                      "tp4pp1ep", "tp2pp2ep", "dp2tp1pp1", "dp2tp1pp1ep", "dp2tp2pp1ep",
                                      "dp2tp1pp2ep", "dp4tp1pp1", "dp4tp1pp1ep"}
    for layout in [*layouts, Topology(2, 1, ep=True, dp=2, placement="round_robin")]:
        engine.reconfigure(layout, lambda outs: None)
        for out, (tokens, logits) in zip(generate(engine, f"{layout}-"), reference):
            assert out.token_ids == tokens, layout
            for step, ref in zip(out.logprobs, logits):
                for token, logprob in step.items():
                    assert abs(logprob - float(ref[token])) < 1e-4, layout


def test_experts_that_do_not_divide_over_the_ranks_are_refused_and_change_nothing(family):
    from remp.topology import TopologyError

    _, engine, _ = family
    before = engine.topology
    with pytest.raises(TopologyError, match="8 experts to divide evenly over them"):  # dp3: 3 ranks
        engine.reconfigure(Topology(1, 1, ep=True, dp=3), lambda outs: None)
    assert engine.topology == before


def test_requests_keep_their_tokens_across_a_live_tour(family):
    _, engine, reference = family
    engine.reconfigure(Topology(2, 1), lambda outs: None)
    # TP -> EP with attention unchanged, EP 2 -> 4 -> 2 (standbys join and leave), tp2 -> dp2 (whole
    # requests move to the group that serves them next), EP over dp x tp, EP -> TP, PP
    tour = [Topology(2, 1, ep=True), Topology(4, 1, ep=True), Topology(2, 1, ep=True), Topology(1, 1, ep=True, dp=2),
            Topology(2, 1, ep=True, dp=2), Topology(2, 2, ep=True), Topology(2, 2), Topology(1, 1)]
    outs = generate(engine, "tour-", switch_to=tour)
    assert [o.token_ids for o in outs] == [tokens for tokens, _ in reference]


@pytest.mark.slow
def test_every_ordered_pair_of_layouts_switches_live_with_requests_mid_generation(tiny_mixtral):
    """The whole switch matrix of tiny Mixtral on a pool of 4 (19 layouts with dp, 342 ordered
    pairs), walked as one Eulerian tour in one engine: a batch of requests runs through each
    stretch of 8 switches, a switch every step, and every batch's tokens equal transformers'."""
    from remp.reconfig.tour import switch_tour

    layouts = valid_layouts(ModelConfig.from_pretrained(tiny_mixtral), POOL)
    tour = switch_tour(layouts)
    assert len(tour) - 1 == len(layouts) * (len(layouts) - 1)
    # long enough to outlast 8 switches: a switch keeps stepping while it prepares, so several tokens may
    # come out in one switch on a loaded machine
    max_tokens = 60
    reference = [tokens for tokens, _ in transformers_greedy(tiny_mixtral, PROMPTS, max_tokens)]
    params = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)
    engine = LLMEngine(EngineConfig(dtype="float32", model=tiny_mixtral, worker_pool_size=POOL, max_model_len=128,
                                    block_size=4).with_topology(tour[0]))
    try:
        rest, n = tour[1:], 0
        while rest:
            stretch, rest = rest[:8], rest[8:]
            outs, results = helpers.generate(engine, PROMPTS, params, f"pair{n}-", stretch, start=2, every=1)
            assert [o.token_ids for o in outs] == reference, stretch
            n += 1
        assert engine.topology == tour[-1] and engine.stats().num_worker_replacements == 0
    finally:
        engine.shutdown()


@pytest.mark.parametrize("variant", FAMILIES)
def test_a_router_that_sends_every_token_to_one_expert(request, variant):
    """Router weights that make expert 4 every token's first choice (positive inputs, one positive
    router row): the experts' block equals transformers' own block with the same weights (Qwen2-MoE's
    shared expert and its gate included)."""
    from transformers import AutoConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock
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
    for e, expert in moe.experts.items():
        expert.gate_weight, expert.up_weight, expert.down_weight = (
            torch.nn.Parameter(w[int(e)]) for w in (w_gate, w_up, w_down))
    block = {"MixtralForCausalLM": MixtralSparseMoeBlock, "Qwen3MoeForCausalLM": Qwen3MoeSparseMoeBlock,
             "Qwen2MoeForCausalLM": Qwen2MoeSparseMoeBlock}[cfg.architecture](hf_cfg)
    with torch.no_grad():
        block.gate.weight.copy_(router)
        block.experts.gate_up_proj.copy_(torch.cat([w_gate, w_up], dim=1))
        block.experts.down_proj.copy_(w_down)
        if cfg.moe.shared_expert_size:
            shared = moe.shared_expert
            s_gate, s_up, s_down = (torch.randn(*shape, generator=gen) * 0.2 for shape in
                                    ((cfg.moe.shared_expert_size, H), (cfg.moe.shared_expert_size, H),
                                     (H, cfg.moe.shared_expert_size)))
            gate_row = torch.randn(1, H, generator=gen)
            shared.gate_weight, shared.up_weight, shared.down_weight = map(torch.nn.Parameter, (s_gate, s_up, s_down))
            moe.shared_gate = torch.nn.Parameter(gate_row)
            block.shared_expert.gate_proj.weight.copy_(s_gate)
            block.shared_expert.up_proj.weight.copy_(s_up)
            block.shared_expert.down_proj.weight.copy_(s_down)
            block.shared_expert_gate.weight.copy_(gate_row)
    x = torch.rand(9, H, generator=gen)  # positive: expert 4's logit is the only positive one
    chosen, _ = moe.route(x)
    assert (chosen[:, 0] == 4).all()
    with torch.no_grad():
        torch.testing.assert_close(moe(x), block(x[None])[0], atol=1e-6, rtol=1e-5)


def test_a_switch_between_tp_and_ep_moves_no_kv_and_keeps_the_attention_weights(family):
    """TP <-> EP changes expert ownership only: no KV block moves, no weight is copied."""
    _, engine, _ = family
    engine.reconfigure(Topology(2, 1), lambda outs: None)
    for target in (Topology(2, 1, ep=True), Topology(2, 1)):
        for i, p in enumerate(PROMPTS):
            engine.add_request(f"kv-{target}-{i}", p, GREEDY)
        for _ in range(3):
            engine.step()
        result = engine.reconfigure(target, lambda outs: None)
        assert result.outcome == "committed" and result.live_kv_blocks > 0, result.reason
        assert result.kv_bytes_moved == 0 and result.weight_bytes_loaded == 0
        assert result.target["enable_expert_parallel"] == target.ep
        while engine.has_unfinished():
            engine.step()


def test_the_server_switches_tp_and_ep_and_reports_it(tiny_mixtral, tmp_path):
    """Over HTTP: `remp serve --enable-expert-parallel`, then POST /v1/admin/reconfigure to TP and
    back; GET /v1/admin/topology says which; the same completion before and after."""
    import httpx

    with remp_server(tiny_mixtral, tmp_path / "serve.log", "-tp", "2", "--enable-expert-parallel",
                     "--served-model-name", "moe") as url:
        def ask() -> str:
            body = {"model": "moe", "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
            return httpx.post(f"{url}/v1/completions", json=body, timeout=120).json()["choices"][0]["text"]

        def topology() -> dict:
            return httpx.get(f"{url}/v1/admin/topology").json()

        assert topology()["enable_expert_parallel"] is True
        before = ask()
        for ep, dp in ((False, 1), (True, 1), (True, 2)):
            r = httpx.post(f"{url}/v1/admin/reconfigure", timeout=300, json={
                "tensor_parallel_size": 2 // dp, "pipeline_parallel_size": 1, "enable_expert_parallel": ep,
                "data_parallel_size": dp})
            assert r.status_code == 200 and r.json()["outcome"] == "committed", r.text
            assert r.json()["target"]["enable_expert_parallel"] is ep and topology()["enable_expert_parallel"] is ep
            assert topology()["data_parallel_size"] == dp
            assert ask() == before
        now = topology()
        r = httpx.post(f"{url}/v1/admin/reconfigure", timeout=300, json={  # a pool of 2
            "tensor_parallel_size": 1, "pipeline_parallel_size": 1, "data_parallel_size": 3,
            "enable_expert_parallel": True})
        assert r.status_code == 400 and "3 workers needed but the pool has 2" in r.json()["error"]["message"]
        assert topology() == now and ask() == before


@pytest.mark.slow
@pytest.mark.parametrize("phase,rank,action,target", [("prepare", 1, "kill", Topology(2, 1, ep=True)),
                                                      ("prepare", 0, "hang", Topology(2, 1, ep=True)),
                                                      ("migrate", 1, "kill", Topology(1, 1, ep=True, dp=2))],
                         ids=["tp-ep-prepare-kill", "tp-ep-prepare-hang", "tp-dp-migrate-kill"])
def test_a_worker_lost_in_a_switch_rolls_back_and_is_replaced(tiny_mixtral, monkeypatch, phase, rank, action, target):
    """A serving rank killed, or stopped, while it prepares the expert-parallel target, or while it
    moves KV towards data-parallel groups: the switch rolls back, the rank is replaced, and no
    request fails or changes; then the switch commits."""
    from remp.executor.messages import FAULT_ENV

    reference = [tokens for tokens, _ in transformers_greedy(tiny_mixtral, PROMPTS, MAX_TOKENS)]
    monkeypatch.setenv(FAULT_ENV, f"{phase}:{rank}:{action}")
    engine = LLMEngine(EngineConfig(dtype="float32", model=tiny_mixtral, tensor_parallel_size=2, worker_pool_size=4,
                                    max_model_len=128, block_size=4, worker_hang_timeout_s=4.0))
    try:
        for attempt, outcome in (("a", "rolled_back"), ("b", "committed")):
            tokens, result = helpers.run_batch(engine, PROMPTS, GREEDY, attempt, target)
            assert result.outcome == outcome, result.reason
            assert tokens == reference
            if outcome == "rolled_back":
                assert result.replaced_ranks == [rank] and engine.topology == Topology(2, 1)
        assert engine.topology == target and engine.stats().num_worker_replacements == 1
    finally:
        engine.shutdown()
