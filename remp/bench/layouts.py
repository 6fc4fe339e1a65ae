"""`remp bench layouts`: serving throughput per fixed layout vs Hugging Face transformers.

For each layout it starts a real `remp serve`, runs `remp bench serve` at each request
rate (open loop) and at each concurrency level (closed loop: every request offered at once,
at most that many in flight) with the same seeded prompts, reads the control-plane share of
step time from /metrics, and stops the server. In the same run it times transformers'
`generate` on the same prompts, one at a time and as one batch (unless --no-hf), and prints
every ratio: to transformers, and at each concurrency level to the --baseline layout.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from remp.bench.host import host_info
from remp.bench.serve import BenchConfig, benchmark, load_tokenizer, sample_random_requests
from remp.bench.server_process import ServerProcess, serve_flags
from remp.topology import Topology


@dataclass
class LayoutRun:
    layout: str
    request_rate: float  # inf: every request offered at once
    output_throughput: float
    request_throughput: float
    median_ttft_ms: float
    median_tpot_ms: float
    p99_e2el_ms: float
    failed: int
    max_concurrency: int | None = None  # a closed-loop run: at most this many requests in flight
    num_prompts: int = 0
    p90_ttft_ms: float = math.nan
    p90_tpot_ms: float = math.nan
    date: str = ""  # when the run started (UTC), to line it up with anything else the host ran
    duration_s: float = math.nan


@dataclass
class LayoutSummary:
    layout: str
    startup_s: float
    control_plane_share: float  # engine + worker control-plane time / step wall time


def parse_rates(text: str) -> list[float]:
    """--rates: comma-separated positive request rates, `inf` for every request at once."""
    rates = [float(r) for r in text.split(",")]
    if any(not r > 0 for r in rates):
        raise argparse.ArgumentTypeError(f"request rates must be positive: {text!r}")
    return rates


def parse_concurrency(text: str) -> list[int]:
    """--concurrency: comma-separated positive integers, e.g. 1,2,4,8,16,32,64."""
    try:
        levels = [int(c) for c in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"concurrency levels are integers: {text!r}") from None
    if any(c < 1 for c in levels):
        raise argparse.ArgumentTypeError(f"concurrency levels must be at least 1: {text!r}")
    return levels


def concurrency_prompts(concurrency: int, num_prompts: int) -> int:
    """Requests of a closed-loop run: --num-prompts, and at least two per slot, so every slot
    is refilled once and the batch stays full for most of the run."""
    return max(num_prompts, 2 * concurrency)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (served and loaded into transformers)")
    parser.add_argument("--layouts", default="tp1pp1,tp3pp1,tp1pp2",
                        help="comma-separated layouts as `remp reconfigure` names them: tpXppY, with a dpN prefix "
                             "for data parallelism and an ep suffix for expert parallelism (e.g. dp2tp1pp1ep)")
    parser.add_argument("--rates", type=parse_rates,
                        help="comma-separated request rates (req/s) of open-loop (Poisson) runs of --num-prompts "
                             "requests; inf = all at once (default: 1,4,inf, or none when --concurrency is given)")
    parser.add_argument("--concurrency", type=parse_concurrency,
                        help="comma-separated closed-loop levels, e.g. 1,2,4,8,16,32,64: at each level C every "
                             "request is offered at once with at most C in flight (`remp bench serve "
                             "--request-rate inf --max-concurrency C`), max(--num-prompts, 2*C) requests; reports "
                             "output tok/s, TTFT and TPOT (median, p90) per layout and level. The server admits "
                             "--max-num-seqs (default 32) per data-parallel group: raise it in --serve-args to "
                             "run more than that")
    parser.add_argument("--baseline", help="layout the concurrency table's ratios divide by (default: the first of "
                                           "--layouts)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--hf-prompts", type=int, default=4, help="prompts for transformers one at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-hf", action="store_true",
                        help="skip transformers' generate (no ratios to it), e.g. for a sweep over concurrency "
                             "that compares layouts with each other")
    parser.add_argument("--serve-args", default="", help="extra `remp serve` flags, e.g. '--max-num-seqs 32'")
    parser.add_argument("--json", help="write all results here")
    parser.add_argument("--plot", metavar="PNG", help="with --concurrency: plot output tok/s and TPOT (median) "
                                                      "against concurrency, one line per layout")


def _metric_sum(base_url: str, name: str) -> float:
    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)


def hf_throughput(model: str, prompts: list[list[int]], output_len: int, batched: bool) -> float:
    """Output tokens/s of transformers' greedy `generate` (float32, exactly output_len tokens each)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(os.cpu_count() or 1)
    hf = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    kwargs = dict(max_new_tokens=output_len, min_new_tokens=output_len, do_sample=False,
                  pad_token_id=hf.config.eos_token_id if isinstance(hf.config.eos_token_id, int) else 0)
    groups = [prompts] if batched else [[p] for p in prompts]  # equal lengths: no padding needed
    with torch.inference_mode():
        warm = torch.tensor([prompts[0]])
        hf.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=2, do_sample=False,
                    pad_token_id=kwargs["pad_token_id"])
        t0 = time.perf_counter()
        for g in groups:
            ids = torch.tensor(g)
            hf.generate(ids, attention_mask=torch.ones_like(ids), **kwargs)
        return len(prompts) * output_len / (time.perf_counter() - t0)


def run_plan(rates: list[float] | None, concurrency: list[int] | None, num_prompts: int
             ) -> list[tuple[float, int | None, int]]:
    """(request rate, max concurrency, requests) of each run on one server: the open-loop rates
    (default 1,4,inf when no concurrency level is given), then the closed-loop levels."""
    if rates is None:
        rates = [] if concurrency else [1.0, 4.0, math.inf]
    return ([(r, None, num_prompts) for r in rates]
            + [(math.inf, c, concurrency_prompts(c, num_prompts)) for c in concurrency or []])


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else "-"


def rate_table(runs: list[LayoutRun], hf_single: float | None, hf_batched: float | None) -> list[str]:
    """The open-loop runs as a markdown table, with ratios to transformers' generate."""
    lines = ["| layout | rate (req/s) | output tok/s | vs HF one-at-a-time | vs HF batched | TTFT p50 ms | TPOT p50 ms "
             "| E2E p99 ms | failed |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.max_concurrency is None:
            lines.append(f"| {r.layout} | {r.request_rate:g} | {r.output_throughput:.1f} | "
                         f"{_ratio(r.output_throughput, hf_single)} | {_ratio(r.output_throughput, hf_batched)} | "
                         f"{r.median_ttft_ms:.0f} | {r.median_tpot_ms:.0f} | {r.p99_e2el_ms:.0f} | {r.failed} |")
    return lines


def concurrency_table(runs: list[LayoutRun], baseline: str) -> list[str]:
    """The closed-loop runs as a markdown table, each row's throughput also as a ratio to the
    baseline layout's at the same concurrency (measured in the same run)."""
    base = {r.max_concurrency: r.output_throughput for r in runs
            if r.max_concurrency is not None and r.layout == baseline}
    lines = [f"| layout | concurrency | requests | output tok/s | vs {baseline} | TTFT p50 ms | TTFT p90 ms "
             "| TPOT p50 ms | TPOT p90 ms | E2E p99 ms | failed |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if r.max_concurrency is not None:
            lines.append(f"| {r.layout} | {r.max_concurrency} | {r.num_prompts} | {r.output_throughput:.1f} | "
                         f"{_ratio(r.output_throughput, base.get(r.max_concurrency))} | {r.median_ttft_ms:.0f} | "
                         f"{r.p90_ttft_ms:.0f} | {r.median_tpot_ms:.1f} | {r.p90_tpot_ms:.1f} | "
                         f"{r.p99_e2el_ms:.0f} | {r.failed} |")
    return lines


def concurrency_grid(runs: list[LayoutRun]) -> list[str]:
    """Layout x concurrency markdown table of "output tok/s / TPOT p50 ms", layouts in run order."""
    closed = [r for r in runs if r.max_concurrency is not None]
    levels = sorted({r.max_concurrency for r in closed})
    layouts = list(dict.fromkeys(r.layout for r in closed))
    cell = {(r.layout, r.max_concurrency): f"{r.output_throughput:.0f} / {r.median_tpot_ms:.0f}" for r in closed}
    lines = ["| layout | " + " | ".join(f"c={c}" for c in levels) + " |", "|---|" + "---|" * len(levels)]
    for name in layouts:
        lines.append(f"| {name} | " + " | ".join(cell.get((name, c), "-") for c in levels) + " |")
    return lines


def write_plot(results: list[dict], path: str) -> None:
    """Output tok/s and median TPOT against concurrency, one line per layout, from one or more
    results of `run` (or their JSON files, loaded); the runs after the first are drawn dashed,
    dotted, ... with other markers, in the same colour per layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs_of = [[LayoutRun(**r) for r in res["runs"] if r.get("max_concurrency") is not None] for res in results]
    layouts = list(dict.fromkeys(r.layout for runs in runs_of for r in runs))
    colour = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(layouts)}
    styles, markers = ("-", "--", ":", "-."), ("o", "s", "^", "D")
    fig, (ax_tput, ax_tpot) = plt.subplots(1, 2, figsize=(11, 4.2), constrained_layout=True)
    levels: set[int] = set()
    for k, runs in enumerate(runs_of):
        for name in layouts:
            mine = sorted((r for r in runs if r.layout == name), key=lambda r: r.max_concurrency)
            if not mine:
                continue
            xs = [r.max_concurrency for r in mine]
            levels.update(xs)
            label = name if len(runs_of) == 1 else f"{name} (run {k + 1})"
            style = dict(color=colour[name], linestyle=styles[k % len(styles)], marker=markers[k % len(markers)],
                         markersize=4, fillstyle="full" if k == 0 else "none")
            ax_tput.plot(xs, [r.output_throughput for r in mine], label=label, **style)
            ax_tpot.plot(xs, [r.median_tpot_ms for r in mine], label=label, **style)
    for ax, title in ((ax_tput, "output tokens/s"), (ax_tpot, "TPOT median (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(levels), [str(c) for c in sorted(levels)])
        ax.set_xlabel("concurrency (requests in flight)")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    host = results[0].get("host", {}) if results else {}
    if host:
        fig.suptitle(f"{host.get('cpu', '?')}, {host.get('cores', '?')} cores", fontsize=10)
    ax_tput.legend(fontsize=7, ncol=1 if len(runs_of) == 1 else 2)
    fig.savefig(path, dpi=130)
    plt.close(fig)


def run(args: argparse.Namespace) -> dict:
    plan = run_plan(args.rates, args.concurrency, args.num_prompts)
    names = args.layouts.split(",")
    topologies = [Topology.parse(name) for name in names]  # a bad name fails before any server starts
    baseline = args.baseline or names[0]
    if baseline not in names:
        raise SystemExit(f"error: --baseline {baseline} is not one of --layouts {args.layouts}")
    host = host_info()
    print(f"host: {host}", flush=True)
    tokenizer = load_tokenizer(args.model)
    prompts = [r.prompt_ids for r in sample_random_requests(tokenizer, args.num_prompts, args.input_len,
                                                            args.output_len, 0.0, args.seed)]
    runs: list[LayoutRun] = []
    summaries: list[LayoutSummary] = []
    for name, topo in zip(names, topologies):
        server = ServerProcess(args.model, [*serve_flags(topo), *args.serve_args.split()])
        startup = server.start()
        try:
            cp0 = _metric_sum(server.base_url, "remp:control_plane_seconds_total")
            st0 = _metric_sum(server.base_url, "remp:step_seconds_total")
            for rate, concurrency, num_prompts in plan:
                res = asyncio.run(benchmark(BenchConfig(
                    base_url=server.base_url, model=args.model, request_rate=rate, num_prompts=num_prompts,
                    input_len=args.input_len, output_len=args.output_len, seed=args.seed, tokenizer=args.model,
                    max_concurrency=concurrency, disable_tqdm=True)))
                m = res.metrics
                runs.append(LayoutRun(name, rate, m.output_throughput, m.request_throughput, m.ttft.median_ms,
                                      m.tpot.median_ms, m.e2el.p99_ms, m.failed, concurrency, num_prompts,
                                      m.ttft.p90_ms, m.tpot.p90_ms, res.date, m.duration_s))
                load = f"rate={rate:g}" if concurrency is None else f"concurrency={concurrency}"
                print(f"{name} {load}: {m.output_throughput:.1f} out tok/s, TTFT p50 {m.ttft.median_ms:.0f} ms, "
                      f"TPOT p50 {m.tpot.median_ms:.1f} ms (p90 {m.tpot.p90_ms:.1f}), failed {m.failed}", flush=True)
            cp = _metric_sum(server.base_url, "remp:control_plane_seconds_total") - cp0
            st = _metric_sum(server.base_url, "remp:step_seconds_total") - st0
        finally:
            server.stop()
        summaries.append(LayoutSummary(name, startup, cp / st if st else math.nan))
    hf_single = hf_batched = None
    if not args.no_hf:
        hf_prompts = prompts[:args.hf_prompts]
        hf_single = hf_throughput(args.model, hf_prompts, args.output_len, batched=False)
        hf_batched = hf_throughput(args.model, prompts, args.output_len, batched=True)
        print(f"\ntransformers generate: one at a time {hf_single:.1f} tok/s ({len(hf_prompts)} prompts), "
              f"batched {hf_batched:.1f} tok/s ({len(prompts)} prompts)")
    if any(r.max_concurrency is None for r in runs):
        print("", *rate_table(runs, hf_single, hf_batched), sep="\n")
    if any(r.max_concurrency is not None for r in runs):
        print("", *concurrency_table(runs, baseline), sep="\n")
        print("\noutput tok/s / TPOT p50 ms:", *concurrency_grid(runs), sep="\n")
    print("\n| layout | start-up s | control plane share of step time |")
    print("|---|---|---|")
    for s in summaries:
        print(f"| {s.layout} | {s.startup_s:.1f} | {100 * s.control_plane_share:.2f}% |")
    print(f"\n(on {host})")
    result = {"config": vars(args), "host": host.to_dict(), "hf_single_tok_s": hf_single, "hf_batched_tok_s": hf_batched,
              "runs": [asdict(r) for r in runs], "layouts": [asdict(s) for s in summaries]}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, default=str)
    if args.plot and any(r.max_concurrency is not None for r in runs):
        write_plot([result], args.plot)
    return result
