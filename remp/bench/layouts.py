"""`remp bench layouts`: serving throughput per fixed layout vs Hugging Face transformers.

For each layout it starts a real `remp serve`, runs `remp bench serve` at each request
rate with the same seeded prompts, reads the control-plane share of step time from
/metrics, and stops the server. In the same run it times transformers' `generate` on the
same prompts, one at a time and as one batch, and prints every ratio.
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
from remp.bench.server_process import ServerProcess
from remp.topology import Topology


@dataclass
class LayoutRun:
    layout: str
    request_rate: float
    output_throughput: float
    request_throughput: float
    median_ttft_ms: float
    median_tpot_ms: float
    p99_e2el_ms: float
    failed: int


@dataclass
class LayoutSummary:
    layout: str
    startup_s: float
    control_plane_share: float  # engine + worker control-plane time / step wall time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (served and loaded into transformers)")
    parser.add_argument("--layouts", default="tp1pp1,tp3pp1,tp1pp2", help="comma-separated tpXppY")
    parser.add_argument("--rates", default="1,4,inf", help="comma-separated request rates (req/s); inf = all at once")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--hf-prompts", type=int, default=4, help="prompts for transformers one at a time")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--serve-args", default="", help="extra `remp serve` flags, e.g. '--max-num-seqs 32'")
    parser.add_argument("--json", help="write all results here")


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


def run(args: argparse.Namespace) -> dict:
    rates = [float(r) for r in args.rates.split(",")]
    host = host_info()
    print(f"host: {host}", flush=True)
    tokenizer = load_tokenizer(args.model)
    prompts = [r.prompt_ids for r in sample_random_requests(tokenizer, args.num_prompts, args.input_len,
                                                            args.output_len, 0.0, args.seed)]
    runs: list[LayoutRun] = []
    summaries: list[LayoutSummary] = []
    for name in args.layouts.split(","):
        topo = Topology.parse(name)
        tp, pp = topo.tp, topo.pp
        server = ServerProcess(args.model, ["-tp", str(tp), "-pp", str(pp), *args.serve_args.split()])
        startup = server.start()
        try:
            cp0 = _metric_sum(server.base_url, "remp:control_plane_seconds_total")
            st0 = _metric_sum(server.base_url, "remp:step_seconds_total")
            for rate in rates:
                res = asyncio.run(benchmark(BenchConfig(
                    base_url=server.base_url, model=args.model, request_rate=rate, num_prompts=args.num_prompts,
                    input_len=args.input_len, output_len=args.output_len, seed=args.seed, tokenizer=args.model,
                    disable_tqdm=True)))
                m = res.metrics
                runs.append(LayoutRun(name, rate, m.output_throughput, m.request_throughput, m.ttft.median_ms,
                                      m.tpot.median_ms, m.e2el.p99_ms, m.failed))
                print(f"{name} rate={rate:g}: {m.output_throughput:.1f} out tok/s, TTFT p50 {m.ttft.median_ms:.0f} ms, "
                      f"TPOT p50 {m.tpot.median_ms:.0f} ms, failed {m.failed}", flush=True)
            cp = _metric_sum(server.base_url, "remp:control_plane_seconds_total") - cp0
            st = _metric_sum(server.base_url, "remp:step_seconds_total") - st0
        finally:
            server.stop()
        summaries.append(LayoutSummary(name, startup, cp / st if st else math.nan))
    hf_prompts = prompts[:args.hf_prompts]
    hf_single = hf_throughput(args.model, hf_prompts, args.output_len, batched=False)
    hf_batched = hf_throughput(args.model, prompts, args.output_len, batched=True)
    print(f"\ntransformers generate: one at a time {hf_single:.1f} tok/s ({len(hf_prompts)} prompts), "
          f"batched {hf_batched:.1f} tok/s ({len(prompts)} prompts)\n")
    print("| layout | rate (req/s) | output tok/s | vs HF one-at-a-time | vs HF batched | TTFT p50 ms | TPOT p50 ms "
          "| E2E p99 ms | failed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        print(f"| {r.layout} | {r.request_rate:g} | {r.output_throughput:.1f} | "
              f"{r.output_throughput / hf_single:.2f}x | "
              f"{r.output_throughput / hf_batched:.2f}x | {r.median_ttft_ms:.0f} | {r.median_tpot_ms:.0f} | "
              f"{r.p99_e2el_ms:.0f} | {r.failed} |")
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
    return result
