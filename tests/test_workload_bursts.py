"""Bursty serving and RL-rollout bursts: the rate-schedule shapes, heavy-tailed output lengths,
and `remp simulate` on a mixture-of-experts preset with them (layout names with ep and dp)."""
from __future__ import annotations

import asyncio
import json
import statistics

import pytest

from remp.bench.serve import BenchConfig, BenchError, benchmark, describe_workload, load_workload
from remp.bench.workload import (
    bursts_schedule,
    parse_rate_schedule,
    schedule_arrivals,
)
from remp.cli import build_parser, main


def test_bursts_shape():
    assert parse_rate_schedule("bursts:low=2,high=30,period=60,burst=10,cycles=2") == [
        (2.0, 50.0), (30.0, 10.0), (2.0, 50.0), (30.0, 10.0)]
    assert len(bursts_schedule(1, 5, 20, 5)) == 8  # four cycles by default
    for bad, match in (("bursts:low=2,high=1,period=60,burst=10", "low <= high"),
                       ("bursts:low=1,high=2,period=10,burst=10", "shorter than its period"),
                       ("bursts:low=1,high=2,period=10", "missing burst"),
                       ("bursts:low=1,high=2,period=10,burst=x", "not a number")):
        with pytest.raises(ValueError, match=match):
            parse_rate_schedule(bad)


def test_burst_shape_sends_about_n_requests_at_once():
    assert parse_rate_schedule("burst:n=1024,within=2") == [(512.0, 2.0)]
    assert parse_rate_schedule("burst:n=10") == [(10.0, 1.0)]
    items = schedule_arrivals(parse_rate_schedule("burst:n=1000,within=2"), input_len=64, output_len=32)
    assert abs(len(items) - 1000) < 100 and max(i.arrival_s for i in items) < 2.0
    with pytest.raises(ValueError, match="num_requests"):
        parse_rate_schedule("burst:n=0")
    with pytest.raises(ValueError, match="expected 'burst:n=REQUESTS"):
        parse_rate_schedule("burst:within=2")


def test_output_tail_is_lognormal_with_the_given_mean_and_a_cap():
    schedule = parse_rate_schedule("burst:n=20000,within=1")
    uniform = schedule_arrivals(schedule, input_len=64, output_len=1000, range_ratio=0.5, seed=1)
    tailed = schedule_arrivals(schedule, input_len=64, output_len=1000, output_tail=1.0, seed=1)
    capped = schedule_arrivals(schedule, input_len=64, output_len=1000, output_tail=1.0, output_cap=4000, seed=1)
    lengths = [i.output_len for i in tailed]
    assert statistics.mean(lengths) == pytest.approx(1000, rel=0.05)
    assert statistics.median(lengths) == pytest.approx(1000 / 1.6487, rel=0.05)  # exp(-sigma^2 / 2)
    assert max(lengths) > 8 * 1000 > 2 * max(i.output_len for i in uniform)
    assert max(i.output_len for i in capped) == 4000 and min(i.output_len for i in capped) >= 1
    assert [i.arrival_s for i in tailed] == [i.arrival_s for i in uniform]  # lengths only
    with pytest.raises(ValueError, match="output_tail"):
        schedule_arrivals(schedule, input_len=64, output_len=10, output_tail=-1.0)


def test_simulate_help_names_the_shapes_and_presets():
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command")
    text = subparsers.choices["simulate"].format_help()
    for needle in ("bursts:low=", "burst:n=", "--output-tail", "--output-cap", "mixtral-8x7b", "qwen3-30b-a3b",
                   "dp8tp1pp1ep", "--max-num-seqs"):
        assert needle in text, needle


def run_simulate(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["simulate", *args])
    return exit_info.value.code


def test_simulate_a_rollout_burst_on_a_moe_preset(tmp_path, capsys):
    out = tmp_path / "sim.json"
    code = run_simulate("--analytic", "qwen3-30b-a3b-8xh100", "--rate-schedule", "burst:n=64,within=1",
                        "--input-len", "128", "--output-len", "200", "--output-tail", "1.0", "--output-cap", "1600",
                        "--layout", "dp8tp1pp1ep", "--auto", "--json", str(out))
    assert code == 0
    printed = capsys.readouterr().out
    assert "lognormal outputs (sigma 1, cap 1600" in printed and "dp8tp1pp1ep" in printed
    result = json.loads(out.read_text())
    assert result["simulation"]["timeline"][0]["layout"] == "dp8tp1pp1ep"
    assert result["output_tail"] == 1.0 and result["output_cap"] == 1600
    assert max(result["output_lens"]) <= 1600
    # A fixed expert-parallel layout by name; a name that is not a layout, or a tail without a schedule.
    assert run_simulate("--analytic", "mixtral-8x7b-8xh100", "--rate-schedule", "2:5", "--layout", "tp8pp1ep",
                        "--max-num-seqs", "64") == 0
    assert run_simulate("--analytic", "mixtral-8x7b-8xh100", "--rate-schedule", "2:5", "--layout", "tp8") == 2
    assert "a layout is written" in capsys.readouterr().err
    assert run_simulate("--analytic", "mixtral-8x7b-8xh100", "--trace", "x.csv", "--output-tail", "1",
                        "--layout", "tp8pp1") == 2
    assert "--output-tail" in capsys.readouterr().err


def test_bench_serve_takes_the_same_tail_options():
    config = BenchConfig(rate_schedule="burst:n=50", output_len=100, output_tail=0.8, output_cap=300)
    items = load_workload(config)
    assert max(i.output_len for i in items) <= 300 and "lognormal outputs" in describe_workload(config, items)
    with pytest.raises(BenchError, match="--output-tail and --output-cap shape --rate-schedule"):
        asyncio.run(benchmark(BenchConfig(output_tail=1.0)))  # refused before any request is sent
