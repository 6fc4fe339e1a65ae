"""`remp simulate`: replay a trace or rate schedule against profiled layouts, fixed or adaptive.

Only argparse and the workload module (standard library only, for the rate-schedule forms its help
names) are imported at the top so `remp --help` stays instant; the simulator (and the benchmark
module whose report and metrics it shares) load when the command runs.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from remp.bench.workload import RATE_SCHEDULE_FORMS

if TYPE_CHECKING:
    from remp.bench.workload import WorkItem
    from remp.policy.profile import Profile
    from remp.sim.simulator import SimResult


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `remp simulate` options on `parser`."""
    workload = parser.add_argument_group("workload (the same as `remp bench serve`'s)")
    source = workload.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", metavar="FILE", help="CSV or JSONL request trace (Azure, BurstGPT, JSONL); "
                        "a 10-minute Azure sample ships at remp/data/traces/azure_llm_2023_conv_10min.csv")
    source.add_argument("--rate-schedule", metavar="TEXT", help=f"arrival rate over time: {RATE_SCHEDULE_FORMS}")
    add = workload.add_argument
    add("--input-len", type=int, default=512, help="prompt tokens of --rate-schedule requests (default: %(default)s)")
    add("--output-len", type=int, default=128,
        help="output tokens of --rate-schedule requests, the mean with --output-tail (default: %(default)s)")
    add("--range-ratio", type=float, default=0.0, help="lengths uniform within +-ratio (default: %(default)s)")
    add("--output-tail", type=float, default=0.0, metavar="SIGMA",
        help="--rate-schedule output lengths lognormal with mean --output-len and log-space standard deviation "
        "SIGMA, a heavy tail (1.0: median 0.6x the mean, 3%% above 4x); 0 keeps them uniform (default: 0)")
    add("--output-cap", type=int, metavar="N", help="cap the --output-tail lengths at N (a max_tokens)")
    add("--burstiness", type=float, default=1.0,
        help="gamma shape of arrival gaps, 1 is Poisson (default: %(default)s)")
    add("--seed", type=int, default=0, help="arrival and length seed (default: %(default)s)")
    add("--time-scale", "--trace-time-scale", type=float, default=1.0, dest="time_scale",
        help="divide trace arrival times by this: 2 replays twice as fast (default: %(default)s)")
    add("--length-scale", "--trace-length-scale", type=float, default=1.0, dest="length_scale",
        help="multiply trace lengths by this (default: %(default)s)")
    add("--trace-start", type=float, default=0.0, metavar="SECONDS", help="start this far into the trace")
    add("--trace-duration", type=float, metavar="SECONDS", help="replay only this much of the trace")
    add("--max-input-len", "--trace-max-input-len", type=int, dest="max_input_len", help="clip trace prompt lengths")
    add("--max-output-len", "--trace-max-output-len", type=int, dest="max_output_len",
        help="clip trace output lengths")
    add("--num-prompts", type=int, help="at most this many requests (default: all)")

    model = parser.add_argument_group("what is served")
    where = model.add_mutually_exclusive_group(required=True)
    where.add_argument("--profile", metavar="FILE", help="a profile written by `remp profile`")
    where.add_argument("--analytic", metavar="PRESET",
                       help="a roofline-model profile MODEL-HARDWARE, models llama-7b, llama3-8b, llama3-70b and the "
                       "mixtures of experts mixtral-8x7b, qwen3-30b-a3b (with data-parallel layouts), hardware "
                       "8xh100, 4xh100, 4xl4, e.g. qwen3-30b-a3b-8xh100 (see remp.policy.analytic)")
    model.add_argument("--max-num-seqs", type=int, default=256, metavar="N",
                       help="--analytic: sequences each data-parallel group runs at once (default: %(default)s)")
    model.add_argument("--layout", help="serve on this layout, e.g. tp4pp1, tp8pp1ep, dp8tp1pp1ep (the starting one "
                       "with --auto)")
    model.add_argument("--auto", action="store_true", help="let the policy switch layouts (default start: the "
                       "layout predicted best for the workload's first --window seconds)")
    model.add_argument("--compare-fixed", action="store_true",
                       help="also replay the workload on every layout of the profile, fixed, and tabulate all runs")

    policy = parser.add_argument_group("policy (with --auto) and goodput")
    add = policy.add_argument
    add("--slo-ttft-ms", type=float, metavar="MS", help="TTFT SLO: the policy aims for it and goodput counts it")
    add("--slo-tpot-ms", type=float, metavar="MS", help="TPOT SLO: the policy aims for it and goodput counts it")
    add("--decision-interval", type=float, default=5.0, metavar="S", help="seconds between decisions (default: 5)")
    add("--window", type=float, default=30.0, metavar="S", help="load statistics window (default: 30)")
    add("--horizon", type=float, default=60.0, metavar="S", help="gain horizon a switch must pay for (default: 60)")
    add("--margin", type=float, default=0.1, help="least relative score gain to switch (default: 0.1)")
    add("--dwell", type=float, default=30.0, metavar="S", help="least time between switches (default: 30)")
    add("--confirm", type=int, default=2, help="decisions in a row a target must win (default: 2)")
    parser.add_argument("--json", dest="json_path", metavar="PATH",
                        help="write the result as `remp bench serve --json` does, plus a 'simulation' section")


def run(args: argparse.Namespace) -> int:
    """Simulate, print the report and the layout timeline, write --json; 2 on a usage error."""
    from remp.bench.serve import BenchError

    try:
        return _run(args)
    except (BenchError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from remp.bench.serve import BenchConfig, BenchResult, describe_workload, format_report, load_workload
    from remp.policy.policy import Policy
    from remp.sim.simulator import simulate
    from remp.topology import Topology

    profile = _load_profile(args)
    slos = {name: ms for name, ms in (("ttft", args.slo_ttft_ms), ("tpot", args.slo_tpot_ms)) if ms is not None}
    config = BenchConfig(
        base_url="simulated", model=profile.model, burstiness=args.burstiness, num_prompts=args.num_prompts,
        input_len=args.input_len, output_len=args.output_len, range_ratio=args.range_ratio, seed=args.seed,
        trace=args.trace, trace_time_scale=args.time_scale, trace_length_scale=args.length_scale,
        trace_start=args.trace_start, trace_duration=args.trace_duration, trace_max_input_len=args.max_input_len,
        trace_max_output_len=args.max_output_len, rate_schedule=args.rate_schedule, output_tail=args.output_tail,
        output_cap=args.output_cap, goodput=slos)
    if (args.output_tail or args.output_cap is not None) and not args.rate_schedule:
        raise ValueError("--output-tail and --output-cap shape --rate-schedule requests")
    items = load_workload(config)
    if not args.layout and not args.auto:
        raise ValueError("give --layout NAME (fixed), --auto (adaptive), or both (adaptive from NAME)")
    layout = str(Topology.parse(args.layout)) if args.layout else _initial_layout(profile, items, args.window)
    policy = Policy(profile, slo_ttft_s=_seconds(args.slo_ttft_ms), slo_tpot_s=_seconds(args.slo_tpot_ms),
                    horizon_s=args.horizon, margin=args.margin, dwell_s=args.dwell,
                    confirm=args.confirm) if args.auto else None
    mode = f"adaptive from {layout}" if policy else f"fixed {layout}"
    print(f"Simulating {profile.model} on {profile.device}, {mode}", file=sys.stderr)
    result = simulate(items, profile, layout, policy, slos, args.decision_interval, args.window)
    bench = BenchResult(config=config, model=profile.model, tokenizer="", metrics=result.metrics,
                        requests=result.records, date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                        workload=describe_workload(config, items))
    print(format_report(bench))
    print(_format_timeline(result))
    runs = {"adaptive" if policy else layout: _summary(result)}
    if args.compare_fixed:  # one run's records at a time: a burst's per-token gaps take gigabytes over many layouts
        runs.update((name, _summary(simulate(items, profile, name, None, slos)))
                    for name in profile.layouts if name not in runs)
        print(_format_comparison(runs))
    if args.json_path:
        out = bench.to_json()
        out["simulation"] = {
            "profile": args.profile or f"analytic:{args.analytic}", "device": profile.device, "mode": mode,
            "preemptions": result.preemptions, "layout_seconds": result.layout_seconds(),
            "timeline": [vars(change) for change in result.timeline],
            "runs": runs,
        }
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(out, f, allow_nan=False)
    return 0


def _seconds(ms: float | None) -> float | None:
    return None if ms is None else ms / 1000.0


def _load_profile(args: argparse.Namespace) -> Profile:
    from remp.policy.analytic import analytic_profile_for
    from remp.policy.profile import Profile

    return Profile.load(args.profile) if args.profile else analytic_profile_for(args.analytic, args.max_num_seqs)


def _initial_layout(profile: Profile, items: Sequence[WorkItem], window_s: float) -> str:
    """Where an adaptive run starts: the layout `predict` ranks best for the workload's first
    window (lowest E2E among the unsaturated, else the most capacity)."""
    from remp.policy.policy import predict
    from remp.policy.stats import LoadTracker

    tracker = LoadTracker(window_s)
    for item in items:
        if item.arrival_s > window_s:
            break
        tracker.on_arrival(item.arrival_s, item.input_len, item.output_len)
    stats = tracker.stats(window_s)
    predictions = {name: predict(layout, stats) for name, layout in profile.layouts.items()}
    return min(predictions, key=lambda n: (predictions[n].saturated, predictions[n].e2e_s,
                                           -predictions[n].max_request_rate))


def _format_timeline(result: SimResult) -> str:
    lines = [f"{' Layout timeline ':=^50}"]
    for change in result.timeline:
        pause = f" (pause {change.pause_s * 1000:.0f} ms)" if change.pause_s else ""
        lines.append(f"{change.t_s:9.1f} s  {change.layout}{pause}: {change.reason}")
    spent = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in result.layout_seconds().items())
    lines.append(f"Time per layout: {spent}; preemptions: {result.preemptions}")
    return "\n".join(lines)


def _summary(result: SimResult) -> dict[str, float | int | None]:
    """One run's headline numbers, for the comparison table and the JSON."""
    m = result.metrics
    return {
        "switches": len(result.timeline) - 1, "failed": m.failed,
        "request_throughput": m.request_throughput, "request_goodput": m.request_goodput,
        "output_throughput": m.output_throughput,
        "median_ttft_ms": m.ttft.median_ms, "p99_ttft_ms": m.ttft.p99_ms,
        "median_tpot_ms": m.tpot.median_ms, "p99_tpot_ms": m.tpot.p99_ms, "mean_e2el_ms": m.e2el.mean_ms,
    }


def _format_comparison(runs: dict[str, dict[str, float | int | None]]) -> str:
    header = (f"{'run':<12} {'switch':>6} {'req/s':>7} {'goodput':>8} {'tok/s':>8} {'TTFT p50':>9} {'p99':>9} "
              f"{'TPOT p50':>9} {'p99':>7} {'E2E mean':>9}")
    lines = [f"{' Fixed layouts vs this run (ms) ':=^{len(header)}}", header]
    for name, s in runs.items():
        goodput = "-" if s["request_goodput"] is None else f"{s['request_goodput']:.2f}"
        lines.append(f"{name:<12} {s['switches']:>6} {s['request_throughput']:>7.2f} {goodput:>8} "
                     f"{s['output_throughput']:>8.0f} {s['median_ttft_ms']:>9.0f} {s['p99_ttft_ms']:>9.0f} "
                     f"{s['median_tpot_ms']:>9.1f} {s['p99_tpot_ms']:>7.1f} {s['mean_e2el_ms']:>9.0f}")
    return "\n".join(lines)
