"""The autoscaling policy: load statistics, the steady-state prediction, the switching rule and
the analytic profile. Pure functions on made-up profiles; no workers."""
from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from remp.policy.analytic import analytic_profile_for
from remp.policy.policy import Policy, predict
from remp.policy.profile import DecodePoint, LayoutProfile, PrefillPoint, Profile, SwitchCost
from remp.policy.stats import LoadStats, LoadTracker
from remp.topology import Topology

INPUT_LEN, OUTPUT_LEN = 256, 64


def synthetic_layout(tp: int, pp: int, base_ms: float, per_seq_ms: float, prefill_ms: float,
                     num_kv_blocks: int = 4096) -> LayoutProfile:
    """TPOT = base + per_seq * batch at any context; prefill = prefill_ms per 256 tokens."""
    return LayoutProfile(
        tp=tp, pp=pp, num_kv_blocks=num_kv_blocks, block_size=16, max_num_seqs=64,
        prefill=[PrefillPoint(n, prefill_ms * n / 256 / 1e3) for n in (16, 256, 4096)],
        decode=[DecodePoint(b, c, (base_ms + per_seq_ms * b) / 1e3) for b in (1, 16, 64) for c in (128, 1024)])


def synthetic_profile(pause_s: float = 0.2) -> Profile:
    """tp2pp1 is fast for one request and slows quickly with the batch; tp1pp2 the other way
    round (TPOTs cross at a batch of 25); tp1pp1 is worse than both everywhere."""
    layouts = {lp.name: lp for lp in (synthetic_layout(2, 1, base_ms=10, per_seq_ms=0.5, prefill_ms=20),
                                      synthetic_layout(1, 2, base_ms=20, per_seq_ms=0.1, prefill_ms=40),
                                      synthetic_layout(1, 1, base_ms=25, per_seq_ms=0.6, prefill_ms=40))}
    switch = {f"{a}->{b}": SwitchCost(pause_s * 2, pause_s) for a in layouts for b in layouts if a != b}
    return Profile(model="synthetic", pool_size=2, device="made up", layouts=layouts, switch=switch)


def load(rate: float, queue: float = 0.0, input_len: float = INPUT_LEN, output_len: float = OUTPUT_LEN,
         concurrency: float | None = None) -> LoadStats:
    return LoadStats(window_s=30.0, arrival_rate=rate, mean_input_len=input_len, mean_output_len=output_len,
                     concurrency=rate if concurrency is None else concurrency, queue_len=queue, kv_usage=0.1,
                     now=0.0)


def eager(profile: Profile, **kwargs) -> Policy:
    """A policy without hysteresis or rate uncertainty, to test the scoring alone."""
    return Policy(profile, **{"confirm": 1, "dwell_s": 0.0, "rate_confidence_z": 0.0, **kwargs})


# load statistics


def test_tracker_window_rates_and_lengths():
    tracker = LoadTracker(window_s=10.0)
    for i in range(20):  # 2 req/s for 10 s
        tracker.on_arrival(i * 0.5, input_len=100, output_len_hint=50)
    stats = tracker.stats(10.0)
    assert stats.arrival_rate == pytest.approx(2.0)
    assert (stats.mean_input_len, stats.mean_output_len) == (100, 50)  # no finish yet: the hints
    tracker.on_finish(10.0, output_len=30)
    tracker.observe(10.0, running=4, waiting=2, kv_usage=0.5)
    tracker.observe(11.0, running=6, waiting=1, kv_usage=0.25)
    stats = tracker.stats(11.0)
    assert stats.mean_output_len == 30  # finished requests' real lengths win
    assert (stats.concurrency, stats.queue_len, stats.kv_usage) == (6.0, 1.0, 0.25)
    assert tracker.stats(100.0).arrival_rate == 0.0  # everything slid out of the window
    assert tracker.stats(100.0).mean_input_len == 100  # but the last lengths are kept


def test_tracker_young_window_is_not_diluted():
    tracker = LoadTracker(window_s=60.0, start=100.0)
    for i in range(6):
        tracker.on_arrival(100.0 + i, input_len=10, output_len_hint=10)
    assert tracker.stats(105.0).arrival_rate == pytest.approx(6 / 5)


# prediction


def test_predict_light_load_is_the_profile():
    layout = synthetic_profile().layouts["tp2pp1"]
    p = predict(layout, load(0.01))
    assert p.ttft_s == pytest.approx(layout.prefill_seconds(INPUT_LEN), rel=0.01)
    assert p.tpot_s == pytest.approx(layout.decode_seconds(1, INPUT_LEN + OUTPUT_LEN / 2), rel=0.01)
    assert not p.saturated and p.utilisation < 0.01


def test_predict_monotone_in_rate_and_saturates():
    for layout in synthetic_profile().layouts.values():
        capacity = predict(layout, load(1.0)).max_request_rate
        previous = None
        for rate in [capacity * k / 20 for k in range(1, 30)]:
            p = predict(layout, load(rate))
            assert p.saturated == (rate >= capacity)
            assert p.throughput_tok_s <= capacity * OUTPUT_LEN * (1 + 1e-9)
            if previous is not None:
                for field in ("ttft_s", "tpot_s", "e2e_s", "utilisation"):
                    assert getattr(p, field) >= getattr(previous, field), (layout.name, rate, field)
            previous = p
        assert math.isinf(previous.ttft_s) and math.isinf(previous.e2e_s)


def test_predict_queue_adds_drain_time():
    layout = synthetic_profile().layouts["tp1pp2"]
    quiet, queued = predict(layout, load(2.0)), predict(layout, load(2.0, queue=30))
    assert queued.ttft_s - quiet.ttft_s == pytest.approx(30 / quiet.max_request_rate)


def test_predict_kv_capacity_limits_the_batch():
    roomy = synthetic_layout(1, 1, 20, 0.1, 40)
    cramped = synthetic_layout(1, 1, 20, 0.1, 40, num_kv_blocks=4 * (INPUT_LEN + OUTPUT_LEN) // 16)
    assert predict(cramped, load(1)).max_request_rate < predict(roomy, load(1)).max_request_rate / 4


# decisions


def crossover_rate(profile: Profile) -> float:
    """The rate at which tp2pp1's and tp1pp2's predicted E2E are equal."""
    lo, hi = 0.1, 50.0
    for _ in range(60):
        mid = (lo + hi) / 2
        fast, wide = (predict(profile.layouts[n], load(mid)) for n in ("tp2pp1", "tp1pp2"))
        lo, hi = (mid, hi) if fast.e2e_s < wide.e2e_s else (lo, mid)
    return lo


def test_low_load_picks_tp_high_load_picks_pp():
    profile = synthetic_profile()
    policy = eager(profile)
    boundary = crossover_rate(profile)
    assert policy.decide(load(boundary / 10), "tp1pp2", 100.0).target == "tp2pp1"
    assert policy.decide(load(boundary * 2), "tp2pp1", 200.0).target == "tp1pp2"
    assert policy.decide(load(boundary / 10), "tp2pp1", 300.0).target is None
    assert policy.decide(load(boundary * 2), "tp1pp2", 400.0).target is None


def test_analytic_profile_low_load_favours_tp_high_load_favours_pp():
    profile = analytic_profile_for("llama-7b-8xh100")
    policy = eager(profile, valid_layouts=[n for n in profile.layouts if Topology.parse(n).world_size == 8])
    low = policy.decide(load(1.0, input_len=512, output_len=256), "tp1pp8", 10.0)
    high = policy.decide(load(60.0, input_len=512, output_len=256, concurrency=150), "tp8pp1", 20.0)
    low_t, high_t = Topology.parse(low.target), Topology.parse(high.target)
    assert low_t.tp > high_t.tp and high_t.pp > low_t.pp, (low.reason, high.reason)


def test_no_flapping_around_the_boundary():
    profile = synthetic_profile()
    boundary = crossover_rate(profile)
    policy = Policy(profile)
    rng = random.Random(0)
    current, switches = "tp2pp1", []
    for i in range(200):
        now = 5.0 * i
        decision = policy.decide(load(boundary * rng.uniform(0.85, 1.15)), current, now)
        assert decision.reason and "\n" not in decision.reason
        if decision.target:
            current = decision.target
            switches.append(now)
            policy.on_switched(now, current)
    assert len(switches) <= 1, switches


def test_never_an_invalid_layout():
    profile = synthetic_profile()
    allowed = ["tp1pp1", "tp1pp2", "tp4pp1"]  # tp4pp1 is not in the profile; tp2pp1 is not allowed
    policy = eager(profile, valid_layouts=allowed)
    rng = random.Random(1)
    targets = set()
    for i in range(300):
        stats = load(rng.uniform(0, 60), queue=rng.choice([0, 0, 5, 50]), input_len=rng.choice([32, 256, 2048]),
                     output_len=rng.choice([1, 16, 256]))
        current = rng.choice(list(profile.layouts))
        decision = policy.decide(stats, current, float(i))
        if decision.target:
            targets.add(decision.target)
            policy.on_switched(float(i), decision.target)
    assert targets and targets <= {"tp1pp1", "tp1pp2"}
    assert policy.decide(load(1.0), "tp2pp2", 1e6).target is None  # current layout not profiled
    with pytest.raises(ValueError):
        Policy(profile, valid_layouts=["tp4pp1"])


def test_switch_cost_is_weighed():
    boundary = crossover_rate(synthetic_profile())
    busy = load(boundary * 1.15)
    assert eager(synthetic_profile(pause_s=1e-6)).decide(busy, "tp2pp1", 0.0).target == "tp1pp2"
    expensive = eager(synthetic_profile(pause_s=600.0)).decide(busy, "tp2pp1", 0.0)
    assert expensive.target is None and "switch cost" in expensive.reason
    # A longer horizon makes the same switch pay.
    assert eager(synthetic_profile(pause_s=600.0), horizon_s=1e7).decide(busy, "tp2pp1", 0.0).target == "tp1pp2"


def test_rate_uncertainty_blocks_switches_that_only_noise_would_pay_for():
    profile = synthetic_profile(pause_s=1e-6)
    stats = load(crossover_rate(profile) * 1.1)
    assert eager(profile).decide(stats, "tp2pp1", 0.0).target == "tp1pp2"
    few = eager(profile, rate_confidence_z=2.0).decide(replace(stats, window_s=2.0), "tp2pp1", 0.0)
    assert few.target is None and "uncertainty" in few.reason
    many = eager(profile, rate_confidence_z=2.0).decide(replace(stats, window_s=3600.0), "tp2pp1", 0.0)
    assert many.target == "tp1pp2"


def test_margin_rejects_small_gains():
    profile = synthetic_profile(pause_s=1e-6)
    stats = load(crossover_rate(profile) * 1.02)  # tp1pp2 just ahead
    assert eager(profile, margin=0.0).decide(stats, "tp2pp1", 0.0).target == "tp1pp2"
    assert eager(profile, margin=0.5).decide(stats, "tp2pp1", 0.0).target is None


def test_confirmation_and_dwell():
    profile = synthetic_profile()
    high = load(crossover_rate(profile) * 2)
    low = load(crossover_rate(profile) / 10)
    policy = Policy(profile, confirm=3, dwell_s=60.0)
    assert [policy.decide(high, "tp2pp1", t).target for t in (0.0, 5.0, 10.0)] == [None, None, "tp1pp2"]
    assert "confirming (1/3)" in Policy(profile, confirm=3).decide(high, "tp2pp1", 0.0).reason
    policy.on_switched(10.0, "tp1pp2")
    # Load drops at once: the way back is confirmed but held until 60 s after the switch.
    assert [policy.decide(low, "tp1pp2", t).target for t in (15.0, 20.0, 25.0, 65.0, 70.0)] == \
        [None, None, None, None, "tp2pp1"]
    # An interrupted streak starts over.
    policy = Policy(profile, confirm=2, dwell_s=0.0)
    assert [policy.decide(s, "tp2pp1", t).target for s, t in ((high, 0.0), (low, 5.0), (high, 10.0), (high, 15.0))] \
        == [None, None, None, "tp1pp2"]


def test_saturated_layout_is_left_even_at_a_cost():
    profile = synthetic_profile(pause_s=5.0)
    capacity = predict(profile.layouts["tp2pp1"], load(1.0)).max_request_rate
    decision = eager(profile).decide(load(capacity * 1.1, queue=100), "tp2pp1", 0.0)
    assert decision.target == "tp1pp2" and decision.predictions["tp2pp1"].saturated


def test_everything_saturated_goes_for_capacity():
    profile = synthetic_profile()
    decision = eager(profile).decide(load(1000.0), "tp2pp1", 0.0)
    assert decision.target == "tp1pp2" and "capacity" in decision.reason
    assert decision.scores["tp1pp2"] == max(decision.scores.values())


def test_slos_decide_by_goodput():
    profile = synthetic_profile()
    boundary = crossover_rate(profile)
    # At low load only tp2pp1 has the TPOT headroom; a TTFT SLO alone is met by both.
    tight = eager(profile, slo_ttft_s=1.0, slo_tpot_s=0.02)
    decision = tight.decide(load(boundary / 10), "tp1pp2", 0.0)
    assert decision.target == "tp2pp1" and "goodput" in decision.reason
    assert eager(profile, slo_ttft_s=1.0).decide(load(boundary / 10), "tp1pp2", 0.0).target is None
    # SLOs nobody can meet: fall back to latency.
    impossible = eager(profile, slo_tpot_s=1e-4).decide(load(boundary / 10), "tp1pp2", 0.0)
    assert impossible.target == "tp2pp1" and "latency" in impossible.reason


# the analytic profile


def test_analytic_profile_shape_and_trade_off():
    profile = analytic_profile_for("llama-7b-8xh100")
    assert {"tp8pp1", "tp4pp2", "tp2pp4", "tp1pp8", "tp1pp1"} <= set(profile.layouts)
    assert len(profile.switch) == len(profile.layouts) * (len(profile.layouts) - 1)
    assert all(0 < c.pause_seconds <= c.seconds for c in profile.switch.values())
    for wide_tp, wide_pp in (("tp8pp1", "tp1pp8"), ("tp4pp2", "tp2pp4")):
        tp, pp = profile.layouts[wide_tp], profile.layouts[wide_pp]
        assert tp.decode_seconds(1, 512) < pp.decode_seconds(1, 512)  # tp: lower latency per token
        assert tp.prefill_seconds(512) < pp.prefill_seconds(512)
        assert pp.decode_seconds(256, 512) < tp.decode_seconds(256, 512)  # pp: more tokens/s when busy
    assert profile.layouts["tp1pp8"].kv_capacity_tokens > 4 * profile.layouts["tp1pp1"].kv_capacity_tokens
    big = analytic_profile_for("llama3-70b-8xh100")
    assert "tp1pp1" not in big.layouts  # 141 GB of weights do not fit one GPU
    with pytest.raises(ValueError, match="known"):
        analytic_profile_for("gpt-5-on-a-toaster")
