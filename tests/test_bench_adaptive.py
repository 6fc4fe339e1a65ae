"""`remp bench adaptive`'s bookkeeping: the best fixed layout per workload, the adaptive ratio,
and the workloads it builds from its flags (the runs themselves need a real model and minutes)."""
from __future__ import annotations

import pytest

from remp.bench.adaptive import AUTO, Run, add_arguments, format_table, summarise, workloads


def run(layout: str, workload: str, goodput: float) -> Run:
    metrics = {"output_throughput": 10.0, "request_goodput": goodput, "slo_attainment": 0.5}
    metrics.update({f"{s}_{m}_ms": 1.0 for s in ("median", "p99") for m in ("ttft", "tpot", "e2el")})
    return Run(layout, workload, metrics, [0.0], [0.1], [1.0])


def test_summary_picks_the_best_fixed_layout_per_workload_and_rates_adaptive_against_it():
    runs = [run("tp1pp1", "step", 0.5), run("tp1pp2", "step", 0.8), run(AUTO, "step", 1.2),
            run("tp1pp1", "trace", 0.9), run("tp1pp2", "trace", 0.3), run(AUTO, "trace", 0.9)]
    summary = summarise(runs)
    assert summary["step"]["best_fixed"] == "tp1pp2"
    assert summary["step"]["adaptive_over_best"] == pytest.approx(1.5)
    assert summary["trace"]["best_fixed"] == "tp1pp1"
    assert summary["trace"]["adaptive_over_best"] == pytest.approx(1.0)
    table = format_table(runs, summary)
    assert "best fixed tp1pp2 (0.800 req/s); adaptive 1.200 req/s = 1.50x" in table


def test_workloads_cover_rates_step_and_trace():
    import argparse

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["model", "--rates", "0.5,2", "--rate-duration", "10"])
    args.trace = "trace.csv"
    loads = workloads(args)
    assert [w.name for w in loads] == ["rate 0.5", "rate 2", "step", "trace"]
    assert loads[1].config["num_prompts"] == 20
    assert loads[2].config["rate_schedule"] == args.step_schedule
    assert loads[3].config["trace"] == "trace.csv"
