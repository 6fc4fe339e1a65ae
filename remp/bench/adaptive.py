"""`remp bench adaptive`: every fixed layout against `--auto-reconfigure`, on the same workloads.

For each layout (and once more with the policy in charge), one real server runs three kinds of
load in turn: constant request rates from low to saturation, a step schedule (low -> peak ->
low) and a real trace time-scaled to this machine. Every run is measured from the outside with
`remp bench serve`'s client, with the same seeds, so the layouts see identical requests. The
report gives TTFT/TPOT/E2E p50/p99, throughput and goodput (requests meeting both SLOs) per
layout, the adaptive server's goodput over the best fixed layout's, and a timeline plot of the
load, the layout the policy chose and the latency it got.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from remp.bench.serve import BenchConfig, benchmark, load_workload
from remp.bench.server_process import ServerProcess
from remp.bench.server_process import serve_flags
from remp.bench.workload import sample_trace_path
from remp.config import ModelConfig
from remp.policy.profile import Profile
from remp.sim.simulator import simulate
from remp.topology import Topology, valid_layouts

AUTO = "auto"


@dataclass
class Workload:
    name: str
    config: dict[str, Any]  # BenchConfig fields that define the load


@dataclass
class Run:
    layout: str  # a layout name, or "auto"
    workload: str
    metrics: dict[str, Any]
    start_offsets: list[float]
    ttfts: list[float]
    e2els: list[float]
    timeline: list[tuple[float, str]] = field(default_factory=list)  # (seconds from start, layout)


def workloads(args: argparse.Namespace) -> list[Workload]:
    lengths = {"input_len": args.input_len, "output_len": args.output_len}
    out = [Workload(f"rate {r:g}", {"request_rate": r, "num_prompts": max(1, round(r * args.rate_duration)),
                                    **lengths}) for r in args.rates]
    out.append(Workload("step", {"rate_schedule": args.step_schedule, **lengths}))
    out.append(Workload("trace", {"trace": args.trace, "trace_time_scale": args.trace_time_scale,
                                  "trace_duration": args.trace_duration,
                                  "trace_length_scale": args.trace_length_scale,
                                  "trace_max_input_len": args.trace_max_input_len,
                                  "trace_max_output_len": args.trace_max_output_len}))
    return out


class LayoutWatcher:
    """Samples GET /v1/admin/topology on a thread while a run goes: the layout over time."""

    def __init__(self, base_url: str, period_s: float = 0.5):
        self.base_url, self.period_s = base_url, period_s
        self.timeline: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)

    def __enter__(self) -> "LayoutWatcher":
        self._start = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.is_set():
            try:
                topo = httpx.get(f"{self.base_url}/v1/admin/topology", timeout=5).json()
                name = str(Topology.from_dict(topo))
                if not self.timeline or self.timeline[-1][1] != name:
                    self.timeline.append((time.monotonic() - self._start, name))
            except httpx.HTTPError:
                pass
            self._stop.wait(self.period_s)


def run_layout(args: argparse.Namespace, layout: str, loads: list[Workload], log_dir: Path) -> list[Run]:
    """Start one server (fixed `layout`, or the policy starting from the first layout) and run
    every workload on it, in order."""
    if layout == AUTO:
        start = Topology.parse(args.auto_start)
        flags = ["--auto-reconfigure", "--profile", args.profile, "--slo-ttft-ms", str(args.slo_ttft_ms),
                 "--slo-tpot-ms", str(args.slo_tpot_ms), *shlex.split(args.policy_args)]
    else:
        start, flags = Topology.parse(layout), []
    server = ServerProcess(args.model, [*serve_flags(start), "--worker-pool-size",
                                        str(args.worker_pool_size), *shlex.split(args.serve_args), *flags],
                           log_path=str(log_dir / f"serve-{layout}.log"))
    runs = []
    with server:
        for load in loads:
            config = BenchConfig(base_url=server.base_url, seed=args.seed, disable_tqdm=True,
                                 goodput={"ttft": args.slo_ttft_ms, "tpot": args.slo_tpot_ms}, **load.config)
            with LayoutWatcher(server.base_url) as watcher:
                result = asyncio.run(benchmark(config))
            data = result.to_json()
            metrics = {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            runs.append(Run(layout, load.name, metrics, data["start_offsets"], data["ttfts"], data["e2els"],
                            watcher.timeline))
            m = result.metrics
            print(f"  {layout:>11} {load.name:>9}: {m.output_throughput:6.1f} tok/s, goodput "
                  f"{m.request_goodput:.3f} req/s ({100 * m.slo_attainment:.0f}% in SLO), TTFT p50 "
                  f"{m.ttft.median_ms:.0f} ms, TPOT p50 {m.tpot.median_ms:.0f} ms, layouts "
                  f"{[name for _, name in watcher.timeline]}", flush=True)
    return runs


def summarise(runs: list[Run]) -> dict[str, dict[str, Any]]:
    """Per workload: the best fixed layout by goodput and the adaptive server's ratio to it."""
    out = {}
    for name in dict.fromkeys(r.workload for r in runs):
        rows = [r for r in runs if r.workload == name]
        fixed = [r for r in rows if r.layout != AUTO]
        best = max(fixed, key=lambda r: r.metrics["request_goodput"])
        auto = next((r for r in rows if r.layout == AUTO), None)
        out[name] = {"best_fixed": best.layout, "best_fixed_goodput": best.metrics["request_goodput"],
                     "adaptive_goodput": auto and auto.metrics["request_goodput"],
                     "adaptive_over_best": auto and (auto.metrics["request_goodput"]
                                                     / best.metrics["request_goodput"]
                                                     if best.metrics["request_goodput"] else None)}
    return out


def simulator_error(runs: list[Run], loads: list[Workload], args: argparse.Namespace) -> list[dict[str, Any]]:
    """What `remp simulate` predicts, from the same profile, for each fixed layout on each replayed
    workload (step and trace: the same requests the server got), next to what the server did."""
    profile = Profile.load(args.profile)
    out = []
    for load in loads:
        items = load_workload(BenchConfig(seed=args.seed, **load.config))
        if items is None:
            continue
        for run in (r for r in runs if r.workload == load.name and r.layout != AUTO):
            sim = simulate(items, profile, run.layout).metrics
            real = run.metrics
            row = {"workload": load.name, "layout": run.layout}
            for key, real_value, sim_value in (("output_throughput", real["output_throughput"], sim.output_throughput),
                                               ("median_ttft_ms", real["median_ttft_ms"], sim.ttft.median_ms),
                                               ("median_tpot_ms", real["median_tpot_ms"], sim.tpot.median_ms),
                                               ("median_e2el_ms", real["median_e2el_ms"], sim.e2el.median_ms)):
                row[key] = {"real": real_value, "simulated": sim_value,
                            "error": (sim_value - real_value) / real_value if real_value else None}
            out.append(row)
    return out


def format_error_table(rows: list[dict[str, Any]]) -> str:
    keys = ("output_throughput", "median_ttft_ms", "median_tpot_ms", "median_e2el_ms")
    lines = ["simulated vs real (relative error): " + ", ".join(keys)]
    for row in rows:
        cells = [f"{row[k]['simulated']:.0f} vs {row[k]['real']:.0f} ({100 * row[k]['error']:+.0f}%)" for k in keys]
        lines.append(f"{row['workload']:>6} {row['layout']:>7}: " + "; ".join(cells))
    return "\n".join(lines)


def format_table(runs: list[Run], summary: dict[str, dict[str, Any]]) -> str:
    head = (f"{'workload':>9} {'layout':>7} {'tok/s':>6} {'goodput':>7} {'in SLO':>6} {'TTFT p50':>8} "
            f"{'p99':>7} {'TPOT p50':>8} {'p99':>6} {'E2E p50':>7} {'p99':>7}  (ms)")
    lines = [head]
    for r in runs:
        m = r.metrics
        lines.append(f"{r.workload:>9} {r.layout:>7} {m['output_throughput']:6.1f} {m['request_goodput']:7.3f} "
                     f"{100 * m['slo_attainment']:5.0f}% {m['median_ttft_ms']:8.0f} {m['p99_ttft_ms']:7.0f} "
                     f"{m['median_tpot_ms']:8.0f} {m['p99_tpot_ms']:6.0f} {m['median_e2el_ms']:7.0f} "
                     f"{m['p99_e2el_ms']:7.0f}")
    lines.append("")
    for name, s in summary.items():
        ratio = s["adaptive_over_best"]
        lines.append(f"{name:>9}: best fixed {s['best_fixed']} ({s['best_fixed_goodput']:.3f} req/s); adaptive "
                     + (f"{s['adaptive_goodput']:.3f} req/s = {ratio:.2f}x" if ratio is not None else "n/a"))
    return "\n".join(lines)


def plot_timeline(runs: list[Run], workload: str, path: Path) -> None:
    """Load (arrivals per 5 s), the adaptive server's layout, and E2E latency of every layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in runs if r.workload == workload]
    auto = next((r for r in rows if r.layout == AUTO), None)
    fig, (ax_load, ax_layout, ax_lat) = plt.subplots(3, 1, figsize=(9, 7), sharex=True)
    offsets = rows[0].start_offsets
    span = max(offsets) + 5
    bins = [5 * i for i in range(int(span // 5) + 2)]
    ax_load.hist(offsets, bins=bins, weights=[1 / 5] * len(offsets), color="grey")
    ax_load.set_ylabel("arrivals (req/s)")
    if auto is not None and auto.timeline:
        names = sorted({n for _, n in auto.timeline})
        xs = [t for t, _ in auto.timeline] + [max(auto.start_offsets[-1] + auto.e2els[-1], span)]
        ys = [names.index(n) for _, n in auto.timeline]
        ax_layout.step(xs, ys + ys[-1:], where="post")
        ax_layout.set_yticks(range(len(names)), names)
    ax_layout.set_ylabel("adaptive layout")
    for r in rows:
        ax_lat.scatter(r.start_offsets, r.e2els, s=6, label=r.layout)
    ax_lat.set_ylabel("E2E latency (s)")
    ax_lat.set_xlabel("seconds from the start of the workload")
    ax_lat.legend(fontsize=7, ncol=3)
    fig.suptitle(f"remp bench adaptive: {workload}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add = parser.add_argument
    add("model", help="Hugging Face model directory")
    add("--worker-pool-size", type=int, default=4)
    add("--layouts", help="comma-separated fixed layouts, e.g. tp2pp1,tp2pp1ep,dp2tp1pp1ep (default: every valid "
        "one)")
    add("--profile", help="profile for --auto-reconfigure (default: MODEL/remp_profile.json)")
    add("--auto-start", default="tp1pp1", help="the adaptive server's first layout (default: %(default)s)")
    add("--policy-args", default="--policy-interval 2 --policy-window 10 --policy-dwell 10",
        help="extra `remp serve` flags for the adaptive server (default: %(default)s)")
    add("--serve-args", default="", help="extra `remp serve` flags for every server")
    add("--rates", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 1.0, 2.5],
        help="constant request rates (default 0.25,1,2.5)")
    add("--rate-duration", type=float, default=30.0, help="seconds of each constant rate (default 30)")
    add("--step-schedule", default="0.3:30,2.5:30,0.3:30", help="RATE:SECONDS,... (default: %(default)s)")
    add("--input-len", type=int, default=128)
    add("--output-len", type=int, default=32)
    add("--trace", default=None, help="trace file (default: the shipped 10-minute Azure sample)")
    add("--trace-time-scale", type=float, default=0.2, help="default 0.2: five times slower than real")
    add("--trace-duration", type=float, default=18.0, help="seconds of the original trace (default 18)")
    add("--trace-length-scale", type=float, default=0.125)
    add("--trace-max-input-len", type=int, default=512)
    add("--trace-max-output-len", type=int, default=64)
    add("--slo-ttft-ms", type=float, default=3000.0)
    add("--slo-tpot-ms", type=float, default=250.0)
    add("--seed", type=int, default=0)
    add("--output-dir", default="docs", help="where the JSON and PNGs go (default: %(default)s)")
    add("--name", default="smollm2", help="file name stem (default: %(default)s)")


def run(args: argparse.Namespace) -> dict:
    args.trace = args.trace or sample_trace_path()
    args.profile = args.profile or str(Path(args.model) / "remp_profile.json")
    if not Path(args.profile).is_file():
        raise SystemExit(f"remp bench adaptive: no profile at {args.profile}; run `remp profile` first")
    layouts = ([str(Topology.parse(name)) for name in args.layouts.split(",")] if args.layouts
               else [str(t) for t in valid_layouts(ModelConfig.from_pretrained(args.model), args.worker_pool_size)])
    out_dir = Path(args.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loads = workloads(args)
    runs: list[Run] = []
    for layout in [*layouts, AUTO]:
        print(f"{layout}:", flush=True)
        runs += run_layout(args, layout, loads, out_dir)
    summary = summarise(runs)
    print(format_table(runs, summary))
    errors = simulator_error(runs, loads, args)
    print(format_error_table(errors))
    report = {"args": {k: v for k, v in vars(args).items() if k != "run"}, "summary": summary,
              "simulator_error": errors, "runs": [r.__dict__ for r in runs]}
    (out_dir / f"bench_adaptive_{args.name}.json").write_text(json.dumps(report, indent=1))
    for name in ("step", "trace"):
        plot_timeline(runs, name, out_dir / f"bench_adaptive_{args.name}_{name}.png")
    return report
