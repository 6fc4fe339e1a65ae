"""`remp bench switch`: the switch matrix — every ordered pair of layouts, switched live.

One server walks an Eulerian circuit of the layouts (remp.reconfig.tour), so every
(source, target) pair is switched once, in one run, under the same light steady load;
the ratios below are comparable because nothing else changes between pairs. Each switch
is then set against the two costs that bound it:

- restart: what a user pays without live switching — a fresh `remp serve` in the target
  layout, timed from launch to the first streamed token (speedup = restart / switch total);
- bandwidth floor: the KV bytes the switch moved, over the point-to-point bandwidth that
  plain torch.distributed (gloo, the transport the workers use) reaches between two local
  processes (pause / floor says how far the pause is from moving the bytes and nothing else).

The background load also checks the promise that a switch loses no request: every request
must finish with exactly --output-len tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import shlex
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp
import numpy as np

from remp.bench.host import host_info
from remp.bench.metrics import RequestRecord
from remp.bench.serve import (COMPLETIONS, REQUEST_TIMEOUT_S, BenchConfig, build_payload, load_tokenizer,
                              sample_random_requests, send_request)
from remp.bench.server_process import ServerProcess, free_port, launch_to_first_token, serve_flags
from remp.config import ModelConfig
from remp.reconfig.tour import switch_tour
from remp.topology import Topology, valid_layouts

SEED = 0
NUM_PROMPTS = 64  # distinct prompts the background load cycles through
BANDWIDTH_REPS = 7
FIXED_PROBE_BYTES = 16 * 2**20


@dataclass
class Switch:
    """One reply of POST /v1/admin/reconfigure, reduced to what the matrix reports."""

    source: str
    target: str
    outcome: str
    reason: str | None
    pause_s: float
    total_s: float
    kv_bytes_moved: int  # pre-copy included
    kv_bytes_in_pause: int
    weight_bytes_loaded: int  # copied into target shards
    live_kv_blocks: int
    preempted: int
    timings_s: dict[str, float]  # every phase the server timed (plan, prepare, drain, migrate, commit, ...)
    build_s: dict[str, float]  # of prepare, the slowest worker's build: groups, shard, model, kv

    @classmethod
    def from_reply(cls, reply: dict[str, Any]) -> Switch:
        timings = reply.get("timings_s") or {}
        return cls(
            source=str(Topology.from_dict(reply["source"])),
            target=str(Topology.from_dict(reply["target"])),
            outcome=reply["outcome"],
            reason=reply.get("reason"),
            pause_s=timings.get("pause", 0.0),
            total_s=timings.get("total", 0.0),
            kv_bytes_moved=reply["kv_bytes_moved"],
            kv_bytes_in_pause=reply["kv_bytes_in_pause"],
            weight_bytes_loaded=reply["weight_bytes_loaded"],
            live_kv_blocks=reply["live_kv_blocks"],
            preempted=len(reply["preempted_request_ids"]),
            timings_s=timings,
            build_s=reply.get("build_s") or {},
        )


@dataclass
class PairResult(Switch):
    """A switch set against a restart into its target and against the bandwidth floor."""

    restart_s: float
    speedup: float | None  # restart_s / total_s; None unless the switch committed
    floor_s: float | None  # kv_bytes_moved / bandwidth; None when no KV moved
    pause_over_floor: float | None
    # The part of the pause after the drain ("commit": the rest of the migration, the swap) over the
    # floor: how close the work after the steps have stopped comes to moving the bytes alone.
    after_drain_over_floor: float | None


@dataclass
class LoadStats:
    """The background load: a request is lost unless it streamed exactly output_len tokens."""

    issued: int
    completed: int
    lost: int
    output_tokens: int
    errors: list[str]  # distinct error messages of lost requests, first few


@dataclass
class Bandwidth:
    """Median gloo point-to-point bytes/s per probe size.

    The floor uses the probe the size of the median KV transfer, because a small message is
    latency-bound and the 16 MiB rate would promise a floor no transfer of that size can reach;
    the 16 MiB probe is the floor only when no switch moved KV, and is otherwise a reference.
    """

    bytes_per_s: dict[int, float]
    floor_probe_bytes: int

    @property
    def floor_bytes_per_s(self) -> float:
        return self.bytes_per_s[self.floor_probe_bytes]


def score(switch: Switch, restart_s: float, bandwidth: float) -> PairResult:
    """The derived columns of one pair (bandwidth in bytes/s)."""
    committed = switch.outcome == "committed" and switch.total_s > 0
    floor_s = switch.kv_bytes_moved / bandwidth if switch.kv_bytes_moved else None
    after_drain = switch.timings_s.get("commit")
    return PairResult(
        **asdict(switch),
        restart_s=restart_s,
        speedup=restart_s / switch.total_s if committed else None,
        floor_s=floor_s,
        pause_over_floor=switch.pause_s / floor_s if floor_s else None,
        after_drain_over_floor=after_drain / floor_s if floor_s and after_drain is not None else None,
    )


def summarise_load(records: list[RequestRecord], output_len: int) -> LoadStats:
    ok = [r for r in records if r.success and r.output_tokens == output_len]
    errors = {r.error or f"{r.output_tokens} tokens instead of {output_len}" for r in records
              if not (r.success and r.output_tokens == output_len)}
    return LoadStats(issued=len(records), completed=len(ok), lost=len(records) - len(ok),
                     output_tokens=sum(r.output_tokens for r in records), errors=sorted(errors)[:5])


async def steady_load(session: aiohttp.ClientSession, url: str, payloads: list[dict[str, Any]],
                      rate: float, output_len: int, stop: asyncio.Event) -> LoadStats:
    """Poisson arrivals at `rate` until `stop` is set, then wait for every request issued."""
    rng = np.random.default_rng(SEED)
    tasks: list[asyncio.Task[RequestRecord]] = []
    while not stop.is_set():
        payload = payloads[len(tasks) % len(payloads)]
        tasks.append(asyncio.create_task(send_request(session, url, COMPLETIONS, payload, len(payload["prompt"]))))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=rng.exponential(1.0 / rate))
    return summarise_load(list(await asyncio.gather(*tasks)), output_len)


async def walk_tour(session: aiohttp.ClientSession, base_url: str, tour: list[Topology],
                    settle_s: float) -> list[Switch]:
    """Switch through `tour`, settling before each switch so the load has requests in flight."""
    switches = []
    for target in tour[1:]:
        await asyncio.sleep(settle_s)
        body = target.as_dict()
        async with session.post(f"{base_url}/v1/admin/reconfigure", json=body,
                                timeout=aiohttp.ClientTimeout(total=600)) as response:
            reply = await response.json()
            if response.status != 200:
                raise RuntimeError(f"reconfigure to {target} answered HTTP {response.status}: {reply}")
        switch = Switch.from_reply(reply)
        phases = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in switch.timings_s.items())
        build = ", ".join(f"{k} {v * 1e3:.1f}" for k, v in switch.build_s.items())
        print(f"  {switch.source} -> {switch.target}: {switch.outcome}, KV {switch.kv_bytes_moved / 2**20:.2f} MiB "
              f"({switch.kv_bytes_in_pause / 2**20:.2f} in the pause; {switch.live_kv_blocks} live blocks); "
              f"ms: {phases}; build ms: {build}", flush=True)
        switches.append(switch)
    return switches


async def switch_under_load(base_url: str, headers: dict[str, str], tour: list[Topology], settle_s: float,
                            payloads: list[dict[str, Any]], rate: float,
                            output_len: int) -> tuple[list[Switch], LoadStats]:
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
                                     connector=aiohttp.TCPConnector(limit=0)) as session:
        stop = asyncio.Event()
        load = asyncio.create_task(steady_load(session, base_url + COMPLETIONS, payloads, rate, output_len, stop))
        try:
            switches = await walk_tour(session, base_url, tour, settle_s)
        finally:
            stop.set()
            stats = await load
    return switches, stats


def restart_s(model: str, layout: Topology, server_args: list[str], headers: dict[str, str],
              payload: dict[str, Any], log_path: str) -> float:
    """Launch to first streamed token of a fresh server in `layout`: the cost a restart makes a user pay."""
    server = ServerProcess(model, [*server_args, *serve_flags(layout)], log_path)
    try:
        return launch_to_first_token(server, payload, headers)
    finally:
        server.stop()


def _bandwidth_worker(rank: int, port: int, sizes: list[int], results: Any) -> None:
    """One side of the probe: rank 0 sends each buffer and waits for a 1-byte ack from rank 1."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ack = torch.zeros(1, dtype=torch.uint8)
    rates = {}
    for size in sizes:
        buf = torch.zeros(size, dtype=torch.uint8)
        times = []
        for _ in range(BANDWIDTH_REPS + 1):  # the first round trip warms the connection up
            dist.barrier()
            t0 = time.perf_counter()
            if rank == 0:
                dist.send(buf, 1)
                dist.recv(ack, 1)
            else:
                dist.recv(buf, 0)
                dist.send(ack, 0)
            times.append(time.perf_counter() - t0)
        rates[size] = size / statistics.median(times[1:])
    dist.destroy_process_group()
    if rank == 0:
        results.put(rates)


def measure_bandwidth(sizes: list[int]) -> dict[int, float]:
    """Gloo send/recv bytes/s per size between two fresh processes on 127.0.0.1, median of several
    round trips."""
    ctx = multiprocessing.get_context("spawn")
    results = ctx.SimpleQueue()
    port = free_port()
    procs = [ctx.Process(target=_bandwidth_worker, args=(rank, port, sizes, results)) for rank in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    if any(p.exitcode for p in procs) or results.empty():
        raise RuntimeError(f"bandwidth probe failed (exit codes {[p.exitcode for p in procs]})")
    return results.get()


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "n/a" if value is None else f"{value:{spec}}{suffix}"


def format_table(rows: list[PairResult]) -> str:
    header = ("| source | target | outcome | pause ms | total ms | KV MiB moved | of it in pause | "
              "weights MiB copied | restart s | speedup | floor ms | pause/floor |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(
            f"| {r.source} | {r.target} | {r.outcome} | {r.pause_s * 1e3:.1f} | {r.total_s * 1e3:.1f} | "
            f"{r.kv_bytes_moved / 2**20:.2f} | {r.kv_bytes_in_pause / 2**20:.2f} | "
            f"{r.weight_bytes_loaded / 2**20:.1f} | {r.restart_s:.1f} | "
            f"{_fmt(r.speedup, '.1f', 'x')} | {_fmt(None if r.floor_s is None else r.floor_s * 1e3, '.2f')} | "
            f"{_fmt(r.pause_over_floor, '.1f', 'x')} |")
    return "\n".join(lines)


def summary_line(rows: list[PairResult], load: LoadStats) -> str:
    speedups = [r.speedup for r in rows if r.speedup is not None]
    ratios = [r.pause_over_floor for r in rows if r.pause_over_floor is not None]
    after_drain = [r.after_drain_over_floor for r in rows if r.after_drain_over_floor is not None]
    committed = sum(r.outcome == "committed" for r in rows)
    return (f"{committed}/{len(rows)} switches committed; speedup vs restart: median "
            f"{_fmt(statistics.median(speedups) if speedups else None, '.1f', 'x')}, worst "
            f"{_fmt(min(speedups) if speedups else None, '.1f', 'x')}; pause/floor median "
            f"{_fmt(statistics.median(ratios) if ratios else None, '.1f', 'x')} (after the drain: "
            f"{_fmt(statistics.median(after_drain) if after_drain else None, '.1f', 'x')}); "
            f"requests lost {load.lost}/{load.issued}")


def write_heatmap(rows: list[PairResult], layouts: list[str], path: str) -> None:
    """Source x target matrices of speedup and pause, annotated, in the style of ReMP's Figure 5."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    index = {name: i for i, name in enumerate(layouts)}
    speedup = np.full((len(layouts), len(layouts)), np.nan)
    pause_ms = np.full_like(speedup, np.nan)
    for r in rows:
        i, j = index[r.source], index[r.target]
        speedup[i, j] = np.nan if r.speedup is None else r.speedup
        pause_ms[i, j] = r.pause_s * 1e3
    side = 1.0 + 0.9 * len(layouts)
    fig, axes = plt.subplots(1, 2, figsize=(2 * side + 2.5, side + 0.8), constrained_layout=True)
    panels = ((speedup, "speedup vs restart (x)", "YlGn", "{:.1f}x"), (pause_ms, "pause (ms)", "OrRd", "{:.1f}"))
    for ax, (values, title, cmap_name, text) in zip(axes, panels, strict=True):
        cmap = plt.get_cmap(cmap_name).with_extremes(bad="#eeeeee")
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap)
        fig.colorbar(image, ax=ax, shrink=0.8)
        finite = values[np.isfinite(values)]
        middle = (finite.min() + finite.max()) / 2 if finite.size else 0.0
        for (i, j), v in np.ndenumerate(values):
            if np.isfinite(v):
                ax.text(j, i, text.format(v), ha="center", va="center", fontsize=8,
                        color="white" if v > middle and finite.min() < finite.max() else "black")
        ax.set_xticks(range(len(layouts)), layouts, rotation=45, ha="right")
        ax.set_yticks(range(len(layouts)), layouts)
        ax.set_xlabel("target")
        ax.set_ylabel("source")
        ax.set_title(title)
    fig.savefig(path, dpi=150)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory")
    parser.add_argument("--layouts", help="comma-separated tpXppY (default: every layout valid on the pool)")
    parser.add_argument("--worker-pool-size", type=int, default=4)
    parser.add_argument("--load-rate", type=float, default=1.0, help="req/s of the steady background load")
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--settle-s", type=float, default=1.0, help="seconds of plain serving before each switch")
    parser.add_argument("--serve-args", default="", help="extra `remp serve` flags, e.g. '--max-num-seqs 16'")
    parser.add_argument("--api-key", help="start the server with this key and send it")
    parser.add_argument("--json", help="write every measurement here")
    parser.add_argument("--heatmap", help="write a source x target heatmap PNG here")


def _layouts(args: argparse.Namespace) -> list[Topology]:
    model = ModelConfig.from_pretrained(args.model)
    if not args.layouts:
        return valid_layouts(model, args.worker_pool_size)
    layouts = [Topology.parse(name) for name in args.layouts.split(",")]
    for layout in layouts:
        layout.validate(model, args.worker_pool_size)
    return layouts


def run(args: argparse.Namespace) -> dict:
    try:
        layouts = _layouts(args)
    except ValueError as exc:
        raise SystemExit(f"remp bench switch: {exc}") from exc
    if len(set(layouts)) < 2 or args.load_rate <= 0:
        raise SystemExit("remp bench switch: needs at least two distinct layouts and a positive --load-rate")
    tour = switch_tour(layouts)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    server_args = ["--worker-pool-size", str(args.worker_pool_size), *shlex.split(args.serve_args),
                   *(["--api-key", args.api_key] if args.api_key else [])]
    tokenizer = load_tokenizer(args.model)
    payloads = [build_payload(BenchConfig(), args.model, tokenizer, s) for s in sample_random_requests(
        tokenizer, NUM_PROMPTS, args.input_len, args.output_len, 0.0, SEED)]
    logs = tempfile.mkdtemp(prefix="remp-bench-switch-")
    print(f"{len(tour) - 1} switches over {len(layouts)} layouts; server logs in {logs}", flush=True)

    server = ServerProcess(args.model, [*server_args, *serve_flags(tour[0])], os.path.join(logs, "switch.log"))
    server.start()
    try:
        switches, load = asyncio.run(switch_under_load(server.base_url, headers, tour, args.settle_s, payloads,
                                                       args.load_rate, args.output_len))
    finally:
        server.stop()

    restarts = {}
    for layout in layouts:
        restarts[str(layout)] = restart_s(args.model, layout, server_args, headers, payloads[0],
                                          os.path.join(logs, f"restart-{layout}.log"))
        print(f"  restart into {layout}: {restarts[str(layout)]:.1f} s to first token", flush=True)

    moved = [s.kv_bytes_moved for s in switches if s.kv_bytes_moved]
    floor_probe = int(statistics.median(moved)) if moved else FIXED_PROBE_BYTES
    bandwidth = Bandwidth(measure_bandwidth(sorted({floor_probe, FIXED_PROBE_BYTES})), floor_probe)
    print("  gloo point-to-point: " + ", ".join(f"{size / 2**20:.2f} MiB at {rate / 2**30:.2f} GiB/s"
                                                for size, rate in bandwidth.bytes_per_s.items()), flush=True)

    rows = [score(s, restarts[s.target], bandwidth.floor_bytes_per_s) for s in switches]
    print()
    print(format_table(rows))
    print()
    print(summary_line(rows, load))
    if load.errors:
        print("lost request errors: " + "; ".join(load.errors))
    names = [str(layout) for layout in layouts]
    if args.heatmap:
        write_heatmap(rows, names, args.heatmap)
    host = host_info()
    print(f"\n(on {host})")
    result = {
        "config": {k: v for k, v in vars(args).items() if k != "api_key"},
        "host": host.to_dict(),
        "layouts": names,
        "tour": [str(t) for t in tour],
        "bandwidth_bytes_per_s": {str(size): rate for size, rate in bandwidth.bytes_per_s.items()},
        "floor_probe_bytes": bandwidth.floor_probe_bytes,
        "floor_bandwidth_bytes_per_s": bandwidth.floor_bytes_per_s,
        "restart_s": restarts,
        "load": asdict(load),
        "pairs": [asdict(r) for r in rows],
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result
