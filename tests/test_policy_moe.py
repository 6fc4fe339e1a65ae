"""Mixture-of-experts layouts in the analytic cost model and the policy: the expert-load
statistics, the MoE presets against the published figures they are checked on, the TP / EP /
DP+EP trade-off, switch costs, the policy's choice by concurrency, and adaptive against fixed
layouts on a decaying burst. Pure functions and short simulations; no workers."""
from __future__ import annotations

import random
from dataclasses import replace

import pytest

from remp.bench.workload import parse_rate_schedule, schedule_arrivals
from remp.policy.analytic import (
    HARDWARE,
    MIXTRAL_TP2_H100_LATENCY_MS,
    MODELS,
    QWEN3_30B_A3B_H100_ITL_MS,
    analytic_profile_for,
    layout_costs,
)
from remp.policy.expert_load import active_share, distinct_experts, max_active_per_rank, max_pairs_per_rank
from remp.policy.policy import Policy
from remp.policy.stats import LoadStats
from remp.sim.simulator import simulate
from remp.topology import Topology

MOE_PRESETS = ("mixtral-8x7b-8xh100", "qwen3-30b-a3b-8xh100")


@pytest.fixture(scope="module")
def profiles():
    return {preset: analytic_profile_for(preset) for preset in MOE_PRESETS}


def tokens_per_s(costs, batch: int, context: int = 1024) -> float:
    return batch / costs.decode_s(batch, context)


# expert load


def test_distinct_experts_from_one_token_to_a_large_batch():
    assert distinct_experts(1, 8, 2) == pytest.approx(2)
    assert distinct_experts(1, 128, 8) == pytest.approx(8)
    assert distinct_experts(4096, 128, 8) == pytest.approx(128)
    assert distinct_experts(0, 8, 2) == 0
    counts = [distinct_experts(m, 128, 8) for m in (1, 2, 8, 32, 128)]
    assert counts == sorted(counts) and 8 < counts[2] < 128


def test_busiest_rank_matches_sampled_routing():
    """The expected maximum over ranks of their active experts, against uniform top-k routing
    sampled directly (which also couples the ranks, unlike the formula)."""
    rng = random.Random(0)
    for tokens, experts, top_k, ranks in ((1, 8, 2, 8), (8, 128, 8, 8), (32, 128, 8, 8), (8, 128, 8, 2)):
        per_rank = experts // ranks
        trials, total = 2000, 0
        for _ in range(trials):
            active = set()
            for _ in range(tokens):
                active.update(rng.sample(range(experts), top_k))
            total += max(sum(e in active for e in range(r * per_rank, (r + 1) * per_rank)) for r in range(ranks))
        assert max_active_per_rank(tokens, experts, top_k, ranks) == pytest.approx(total / trials, rel=0.05)
    assert max_active_per_rank(10_000, 128, 8, 8) == 16  # all of a rank's experts
    mean = 512 * 2 / 8
    assert mean < max_pairs_per_rank(512 * 2, 8) < 1.2 * mean
    assert max_pairs_per_rank(5, 1) == 5 and active_share(0, 8, 2) == 0


# the presets' shapes and calibration


def test_moe_shapes_match_the_published_parameter_counts():
    mixtral, qwen = MODELS["mixtral-8x7b"], MODELS["qwen3-30b-a3b"]
    assert mixtral.active_params == pytest.approx(12.9e9, rel=0.02)  # Mistral AI: 12.9B per token
    assert qwen.active_params == pytest.approx(3.3e9, rel=0.03)  # Qwen3 model card: 3.3B activated
    # Everything but the experts: attention per layer plus the embedding and LM head.
    for m in (mixtral, qwen):
        attention = m.hidden_size * m.head_dim * (2 * m.num_heads + 2 * m.num_kv_heads)
        embeddings = 2 * m.vocab_size * m.hidden_size
        assert m.dense_params == pytest.approx(m.num_layers * attention + embeddings, rel=0.02)
    assert qwen.head_dim == 128 and mixtral.head_dim == 128


def test_presets_reproduce_the_published_h100_figures_within_15_percent():
    qwen_tp1 = layout_costs("qwen3-30b-a3b", "8xh100", "tp1pp1")
    for batch, itl_ms in QWEN3_30B_A3B_H100_ITL_MS.items():
        assert qwen_tp1.decode_s(batch, 1024) * 1e3 == pytest.approx(itl_ms, rel=0.15), batch
    mixtral_tp2 = layout_costs("mixtral-8x7b", "8xh100", "tp2pp1")
    latency = mixtral_tp2.prefill_s(8 * 32) + sum(mixtral_tp2.decode_s(8, 32 + i) for i in range(1, 128))
    assert latency * 1e3 == pytest.approx(MIXTRAL_TP2_H100_LATENCY_MS, rel=0.15)


def test_moe_presets_list_tp_ep_and_data_parallel_layouts(profiles):
    for preset, profile in profiles.items():
        names = set(profile.layouts)
        assert {"tp8pp1", "tp8pp1ep", "dp8tp1pp1ep", "dp2tp4pp1ep"} <= names, preset
        for name, layout in profile.layouts.items():
            assert layout.name == name == str(Topology.parse(name))
        assert profile.layouts["dp8tp1pp1ep"].seq_limit == 8 * profile.layouts["tp8pp1"].seq_limit
    # Qwen3 has 4 KV heads: tp8 replicates each twice, data-parallel groups hold them once.
    qwen = profiles["qwen3-30b-a3b-8xh100"].layouts
    assert qwen["dp8tp1pp1ep"].kv_capacity_tokens == pytest.approx(2 * qwen["tp8pp1"].kv_capacity_tokens, rel=0.01)
    # Dense presets keep dp = 1.
    assert not any(layout.dp > 1 for layout in analytic_profile_for("llama-7b-8xh100").layouts.values())


# TP, EP and DP+EP


def test_ep_reads_whole_experts_on_its_busiest_gpu():
    """One token: TP's GPUs each read 1/8 of the two chosen experts, EP's busiest GPU reads a whole
    expert. A large batch activates every expert: both read 1/8 of them per GPU."""
    tp, ep = (layout_costs("mixtral-8x7b", "8xh100", name) for name in ("tp8pp1", "tp8pp1ep"))
    expert = MODELS["mixtral-8x7b"].expert_params
    assert tp._experts(1)[0] == pytest.approx(2 * expert / 8)
    assert ep._experts(1)[0] == pytest.approx(expert)
    assert tp._experts(4096)[0] == pytest.approx(ep._experts(4096)[0]) == pytest.approx(expert)
    assert tp.decode_s(1, 1024) < ep.decode_s(1, 1024)


def test_all_to_all_replaces_nothing_at_dp1_and_adds_its_latency_at_dp_above_1():
    hw = HARDWARE["8xh100"]
    tp, ep, dp_ep = (layout_costs("mixtral-8x7b", "8xh100", name) for name in ("tp8pp1", "tp8pp1ep", "dp8tp1pp1ep"))
    assert ep._collectives_s(1) == tp._collectives_s(1)  # dp = 1: the tensor all-reduce combines
    assert dp_ep._collectives_s(1) == pytest.approx(2 * hw.all_to_all_latency_s, rel=0.01)  # tp1: no all-reduce
    rows = 64 * 2 * 4096 * 2  # 64 tokens of a group, top-2, hidden 4096, bf16
    assert dp_ep._collectives_s(64) == pytest.approx(2 * (hw.all_to_all_latency_s + 7 / 8 * rows / hw.link_bandwidth))
    # The ring all-reduce's bandwidth term grows with the whole group's batch: at 1024 tokens per
    # group tp8 moves more per layer than dp8's all-to-all does for its 128 tokens.
    assert tp._collectives_s(1024) > dp_ep._collectives_s(128)


@pytest.mark.parametrize("model, crossover", [("mixtral-8x7b", 470), ("qwen3-30b-a3b", 170)])
def test_tp_ep_crossover_emerges_from_the_model(model, crossover):
    """On the same 8 GPUs, tensor parallelism decodes faster alone and DP+EP faster in a large batch
    (no sequence limit here, context 1024); the batch where they cross is what docs/policy.md
    reports."""
    tp, dp_ep = (layout_costs(model, "8xh100", name) for name in ("tp8pp1", "dp8tp1pp1ep"))
    assert tokens_per_s(tp, 1) > 1.15 * tokens_per_s(dp_ep, 1)
    assert tokens_per_s(dp_ep, 2 * crossover) > tokens_per_s(tp, 2 * crossover)
    assert tokens_per_s(tp, crossover // 2) > tokens_per_s(dp_ep, crossover // 2)


def test_switch_costs_follow_what_moves(profiles):
    hw = HARDWARE["8xh100"]
    for profile in profiles.values():
        tp_to_ep = profile.switch_cost("tp8pp1", "tp8pp1ep")
        assert tp_to_ep.pause_seconds == pytest.approx(hw.switch_fixed_s)  # no KV moves
        assert tp_to_ep.seconds > tp_to_ep.pause_seconds  # expert weights are re-viewed
        assert profile.switch_cost("tp8pp1ep", "tp8pp1") == tp_to_ep
        tp_to_dp = profile.switch_cost("tp8pp1", "dp8tp1pp1ep")
        assert tp_to_dp.pause_seconds > 1.3 * hw.switch_fixed_s  # whole requests' KV changes GPU
        assert profile.switch_cost("dp8tp1pp1ep", "dp8tp1pp1ep").pause_seconds == 0


# the policy


def tail(concurrency: float) -> LoadStats:
    """No arrivals, `concurrency` requests still generating (an RL rollout's batch)."""
    return LoadStats(window_s=30.0, arrival_rate=0.0, mean_input_len=512, mean_output_len=2000,
                     concurrency=concurrency, queue_len=0.0, kv_usage=0.1, now=100.0)


@pytest.mark.parametrize("preset", MOE_PRESETS)
def test_policy_picks_tensor_parallel_alone_and_dp_ep_at_high_concurrency(profiles, preset):
    """One request left: experts cut over a tensor group (a data-parallel layout without ep runs
    it on one group, as fast as that group's dp = 1 layout). 1500: experts spread over DP+EP."""
    policy = Policy(profiles[preset], confirm=1, dwell_s=0.0, rate_confidence_z=0.0)
    alone = policy.decide(tail(1), "dp8tp1pp1ep", 100.0)
    target = Topology.parse(alone.target)
    assert not target.ep and target.tp > 1, alone.reason
    crowd = policy.decide(tail(1500), "tp8pp1", 200.0)
    target = Topology.parse(crowd.target)
    assert target.dp > 1 and target.ep, crowd.reason
    assert "in system" in crowd.reason


def test_no_switch_into_a_layout_that_would_preempt_most_of_the_batch(profiles):
    """1500 requests running on dp8tp1pp1ep (2048 slots): a dp = 1 layout holds 256 of them, so the
    rest would be preempted and recomputed; the switch cost counts them."""
    profile = profiles["mixtral-8x7b-8xh100"]
    saturated = replace(tail(1500), arrival_rate=1000.0, mean_output_len=50)
    decision = Policy(profile, confirm=1, dwell_s=0.0, rate_confidence_z=0.0).decide(saturated, "dp8tp1pp1ep", 0.0)
    assert decision.target is None or Topology.parse(decision.target).dp > 1, decision.reason


# adaptive on a decaying burst


def test_adaptive_beats_every_fixed_layout_on_a_decaying_burst(profiles):
    """512 prompts at once with heavy-tailed outputs: DP+EP drains the crowd, tensor parallelism
    the tail. On a few layouts of the Qwen3 preset, so the test stays short."""
    full = profiles["qwen3-30b-a3b-8xh100"]
    keep = ("tp2pp1", "tp4pp1", "tp8pp1", "tp8pp1ep", "dp8tp1pp1ep", "dp4tp2pp1ep")
    profile = replace(full, layouts={name: full.layouts[name] for name in keep})
    items = schedule_arrivals(parse_rate_schedule("burst:n=512,within=1"), input_len=256, output_len=1000,
                              output_tail=1.0, output_cap=8000, seed=0)
    fixed = {name: simulate(items, profile, name).metrics.request_throughput for name in keep}
    adaptive = simulate(items, profile, "dp8tp1pp1ep", Policy(profile))
    layouts = [change.layout for change in adaptive.timeline]
    assert layouts[0] == "dp8tp1pp1ep" and Topology.parse(layouts[-1]).dp == 1
    assert adaptive.metrics.completed == len(items)
    assert adaptive.metrics.request_throughput > 1.02 * max(fixed.values()), (fixed, layouts)
