"""The simulator: continuous batching against a profile, fixed or under the policy. Made-up
profiles from test_policy; no workers."""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import replace

import pytest
from test_policy import INPUT_LEN, OUTPUT_LEN, load, synthetic_layout, synthetic_profile

from remp.bench.metrics import RequestRecord
from remp.bench.workload import WorkItem, parse_rate_schedule, schedule_arrivals
from remp.cli import main
from remp.policy.policy import Decision, Policy, predict
from remp.policy.profile import Profile
from remp.policy.stats import LoadStats
from remp.sim.simulator import simulate

SLOS_MS = {"ttft": 1000.0, "tpot": 25.0}


def workload(schedule: str, seed: int = 0, range_ratio: float = 0.0) -> list[WorkItem]:
    return schedule_arrivals(parse_rate_schedule(schedule), input_len=INPUT_LEN, output_len=OUTPUT_LEN,
                             range_ratio=range_ratio, seed=seed)


def tpot(record: RequestRecord) -> float:
    return (record.latency - record.ttft) / (record.output_tokens - 1)


def test_deterministic():
    profile, items = synthetic_profile(), workload("2:60,18:60,2:60", range_ratio=0.5)
    runs = [simulate(items, profile, "tp2pp1", Policy(profile, slo_tpot_s=0.025), SLOS_MS) for _ in range(2)]
    assert runs[0].records == runs[1].records
    assert runs[0].timeline == runs[1].timeline and len(runs[0].timeline) > 1
    assert runs[0].metrics == runs[1].metrics


@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2"])
def test_light_load_is_the_profile(layout):
    profile = synthetic_profile()
    lp = profile.layouts[layout]
    result = simulate(workload("0.1:600", seed=1), profile, layout)
    ok = [r for r in result.records if r.success]
    assert len(ok) == len(result.records) > 30 and all(r.output_tokens == OUTPUT_LEN for r in ok)
    assert statistics.median(r.ttft for r in ok) == pytest.approx(lp.prefill_seconds(INPUT_LEN), rel=0.02)
    assert statistics.median(map(tpot, ok)) == pytest.approx(
        lp.decode_seconds(1, INPUT_LEN + OUTPUT_LEN / 2), rel=0.03)
    assert result.timeline[0].layout == layout and len(result.timeline) == 1 and result.preemptions == 0


@pytest.mark.parametrize("layout", ["tp2pp1", "tp1pp2"])
def test_prediction_agrees_with_the_simulation(layout):
    profile = synthetic_profile()
    lp = profile.layouts[layout]
    capacity = predict(lp, load(1.0)).max_request_rate
    for utilisation in (0.3, 0.7):
        simulated = simulate(workload(f"{capacity * utilisation}:300"), profile, layout).metrics
        predicted = predict(lp, load(capacity * utilisation))
        assert simulated.tpot.mean_ms / 1e3 == pytest.approx(predicted.tpot_s, rel=0.1)
        assert simulated.e2el.mean_ms / 1e3 == pytest.approx(predicted.e2e_s, rel=0.1)
    # Overloaded, it serves at about the predicted capacity: less when a backlog admits many
    # prompts at once, whose long joint prefill holds batch slots that do not decode yet.
    overloaded = simulate(workload(f"{capacity * 1.5}:300"), profile, layout).metrics
    assert 0.85 * capacity < overloaded.request_throughput < 1.02 * capacity


def test_adaptive_follows_a_load_step_and_beats_worse_fixed_layouts():
    profile, items = synthetic_profile(), workload("2:90,18:90,2:90")
    policy = Policy(profile, slo_ttft_s=SLOS_MS["ttft"] / 1e3, slo_tpot_s=SLOS_MS["tpot"] / 1e3)
    adaptive = simulate(items, profile, "tp2pp1", policy, SLOS_MS)
    assert [c.layout for c in adaptive.timeline] == ["tp2pp1", "tp1pp2", "tp2pp1"]
    up, down = adaptive.timeline[1:]
    assert 90 < up.t_s < 180 < down.t_s and up.pause_s == pytest.approx(0.2)
    fixed = {name: simulate(items, profile, name, None, SLOS_MS).metrics.request_goodput for name in profile.layouts}
    best = max(fixed.values())
    assert all(adaptive.metrics.request_goodput > g for g in fixed.values() if g < best)
    assert adaptive.metrics.request_goodput >= 0.95 * best
    assert adaptive.metrics.completed == len(items)


def test_throughput_never_exceeds_the_profile():
    profile = synthetic_profile()
    items = workload("60:60")  # far beyond every layout's capacity
    for name, lp in profile.layouts.items():
        result = simulate(items, profile, name)
        bound = max(b / lp.decode_seconds(b, INPUT_LEN) for b in range(1, lp.max_num_seqs + 1))
        assert result.metrics.output_throughput <= bound
        assert result.metrics.completed == len(items)


def test_kv_exhaustion_preempts_and_recomputes():
    # Three prompts fit, three grown requests do not.
    cramped = synthetic_layout(2, 1, 10, 0.5, 20, num_kv_blocks=3 * INPUT_LEN // 16 + 2)
    profile = Profile("synthetic", 2, "made up", {"tp2pp1": cramped})
    too_long = WorkItem(arrival_s=0.5, input_len=cramped.kv_capacity_tokens + 1, output_len=4)
    result = simulate([*workload("20:10"), too_long], profile, "tp2pp1")
    assert result.preemptions > 0
    failed = [r for r in result.records if not r.success]
    assert len(failed) == 1 and "KV blocks" in failed[0].error
    assert all(r.output_tokens == OUTPUT_LEN for r in result.records if r.success)


class SwitchOnce(Policy):
    """Switches to `target` at the first decision after `at`, whatever the load."""

    def __init__(self, profile: Profile, target: str, at: float):
        super().__init__(profile)
        self.target, self.at = target, at

    def decide(self, stats: LoadStats, current: str, now: float) -> Decision:
        target = self.target if now >= self.at and current != self.target else None
        return Decision(target, "scripted", {}, {})


def test_switch_pauses_and_shrinks_the_cache():
    small = replace(synthetic_layout(1, 2, 20, 0.1, 40), num_kv_blocks=2 * (INPUT_LEN + OUTPUT_LEN) // 16)
    profile = synthetic_profile(pause_s=0.5)
    profile.layouts["tp1pp2"] = small
    items = workload("10:30")
    result = simulate(items, profile, "tp2pp1", SwitchOnce(profile, "tp1pp2", at=10.0))
    [_, switch] = result.timeline
    prepare = profile.switch_cost("tp2pp1", "tp1pp2").seconds - 0.5
    assert switch.layout == "tp1pp2" and 10.0 + prepare + 0.5 <= switch.t_s < 10.0 + prepare + 0.5 + 0.1
    assert result.preemptions > 0 and result.metrics.completed == len(items)
    # Requests running across the pause see it as one inter-token gap.
    assert max(gap for r in result.records for gap in r.itl) >= 0.5
    spent = result.layout_seconds()
    assert spent["tp2pp1"] == pytest.approx(switch.t_s - 0.5, abs=1e-9)
    assert sum(spent.values()) == pytest.approx(result.metrics.duration_s)


def test_simulate_cli(tmp_path, capsys):
    out = tmp_path / "sim.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--analytic", "llama-7b-4xl4", "--rate-schedule", "0.5:20,6:40", "--output-len", "32",
              "--auto", "--slo-ttft-ms", "500", "--compare-fixed", "--json", str(out)])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Layout timeline" in printed and "tp2pp2" in printed
    result = json.loads(out.read_text())
    assert result["completed"] == len(result["ttfts"]) > 0 and result["request_goodput"] is not None
    assert result["simulation"]["timeline"][0]["layout"] in result["simulation"]["runs"]
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", "--analytic", "llama-7b-4xl4", "--rate-schedule", "1:10", "--layout", "tp8pp1"])
    assert exit_info.value.code == 2 and "not in the profile" in capsys.readouterr().err


def test_the_simulator_needs_none_of_the_servers_dependencies():
    """The simulator runs where only the standard library is installed: it, the policy that drives
    it, its workloads and metrics import no HTTP client, tokenizer, numpy or torch. In a fresh
    interpreter, since this test session has imported all of them already."""
    code = ("import sys, remp.sim.simulator, remp.policy.policy, remp.bench.metrics, remp.bench.workload, "
            "remp.engine.admission; "
            "print([m for m in ('aiohttp', 'transformers', 'numpy', 'torch') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
