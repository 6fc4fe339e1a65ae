"""`remp bench chaos`: a soak of live switches with faults injected at random instants.

One `remp serve` (a pool of --pool workers) serves a steady streaming load while a driver
walks at random over the model's valid layouts, asking for each switch as soon as the last
one answered. Some switches get a fault: a random worker (serving or standby) is SIGKILLed
or SIGSTOPped a random 0..--max-delay-ms after the switch was asked for, so faults land in
every phase — prepare, pre-copy, the cut, the migration, the commit, or the serving after
it. Some switches are asked for twice at once (the second must get 409), and some clients
hang up mid-stream.

Every finished request's text is compared with its no-fault reference (the same prompt run
before any switch or fault; sampling is seeded per position, so greedy and seeded requests
alike must match exactly). The report counts switches, faults, rollbacks, replacements, the
time each fault took to recover (from the signal until the replacement serves), requests
lost (an error, a stream cut short), duplicated (tokens past max_tokens) and corrupted (any
other difference), wedges (a switch that never answered, a fault never recovered) and the
longest wait /health or a stream saw. It exits 1 if anything was lost, duplicated,
corrupted or wedged.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import statistics
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field

import httpx

from remp.bench.host import host_info
from remp.bench.server_process import ServerProcess
from remp.config import ModelConfig
from remp.topology import Topology, valid_layouts

MODEL_NAME = "chaos"
SWITCH_TIMEOUT_S = 180.0  # a switch not answered by then is a wedge
RECOVERY_TIMEOUT_S = 180.0  # a fault not recovered by then is a wedge


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="model directory (e.g. one made by `remp make-tiny-model`)")
    parser.add_argument("--switches", type=int, default=1000, help="switches to ask for (default 1000)")
    parser.add_argument("--faults", type=int, default=200, help="faults to inject among them (default 200)")
    parser.add_argument("--pool", type=int, default=4, help="worker pool size (default 4)")
    parser.add_argument("--streams", type=int, default=3, help="concurrent streaming clients (default 3)")
    parser.add_argument("--prompts", type=int, default=12, help="distinct prompts the clients cycle through")
    parser.add_argument("--output-len", type=int, default=48, help="tokens per request (default 48)")
    parser.add_argument("--max-delay-ms", type=float, default=200.0,
                        help="a fault lands 0..this many ms after its switch is asked for (default 200)")
    parser.add_argument("--in-switch-share", type=float, default=0.0,
                        help="share of faults whose delay is drawn within the median length of the recent "
                             "switches instead, so they land inside one (a switch of a small model takes tens "
                             "of ms: most faults 0..--max-delay-ms after it land in the serving after it)")
    parser.add_argument("--stop-share", type=float, default=0.3,
                        help="share of faults that SIGSTOP (hang) rather than SIGKILL (default 0.3)")
    parser.add_argument("--double-share", type=float, default=0.1,
                        help="share of switches asked for twice at once (default 0.1)")
    parser.add_argument("--disconnect-share", type=float, default=0.1,
                        help="share of requests whose client hangs up mid-stream (default 0.1)")
    parser.add_argument("--hang-timeout", type=float, default=2.0,
                        help="the server's --worker-hang-timeout: how soon a stopped worker is found (default 2)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", help="write the JSON report here")
    parser.add_argument("--server-log", help="keep the server's log here")


@dataclass
class Requests:
    finished: int = 0
    lost: int = 0
    duplicated: int = 0
    corrupted: int = 0
    disconnected: int = 0  # hung up by the client on purpose: not compared
    longest_gap_s: float = 0.0  # between two chunks of one stream, or before its first
    examples: list[str] = field(default_factory=list)  # the first few failures, for the log

    def fail(self, kind: str, detail: str) -> None:
        setattr(self, kind, getattr(self, kind) + 1)
        if len(self.examples) < 10:
            self.examples.append(f"{kind}: {detail}")


@dataclass
class Fault:
    signal: str  # "kill" | "stop"
    rank: int
    role: str  # the victim's role when the switch was asked for: "active" | "standby"
    delay_ms: float  # after the switch request
    aimed_in_switch: bool  # its delay was drawn within the recent switches' length (--in-switch-share)
    switch_outcome: str  # what the switch it came with answered
    recovery_s: float | None  # from the signal to the replacement in service; None: never (a wedge)


class Load:
    """--streams clients streaming prompts in turn and checking each text against its reference."""

    def __init__(self, url: str, prompts: list[dict], references: list[str], args, rng: random.Random):
        self.url, self.prompts, self.references, self.args = url, prompts, references, args
        self.requests = Requests()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._rng = random.Random(rng.random())
        self._threads = [threading.Thread(target=self._client, args=(i,), daemon=True) for i in range(args.streams)]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=SWITCH_TIMEOUT_S)

    def _client(self, index: int) -> None:
        with httpx.Client(timeout=httpx.Timeout(SWITCH_TIMEOUT_S, connect=10.0)) as client:
            n = index
            while not self._stop.is_set():
                i = n % len(self.prompts)
                n += 1
                with self._lock:
                    hang_up = self._rng.random() < self.args.disconnect_share
                outcome = stream(client, self.url, self.prompts[i], hang_up_after=3 if hang_up else None)
                with self._lock:
                    self._book(outcome, self.references[i], self.prompts[i]["max_tokens"])

    def _book(self, outcome: "StreamOutcome", reference: str, max_tokens: int) -> None:
        r = self.requests
        r.longest_gap_s = max(r.longest_gap_s, outcome.longest_gap_s)
        if outcome.hung_up:
            r.disconnected += 1
        elif outcome.error is not None:
            r.fail("lost", outcome.error)
        elif outcome.finishes == 0:
            r.fail("lost", "the stream ended without a finish reason")
        elif outcome.tokens > max_tokens or outcome.finishes > 1:
            r.fail("duplicated", f"{outcome.tokens} tokens, {outcome.finishes} finishes")
        elif outcome.text != reference or outcome.tokens != max_tokens:
            r.fail("corrupted", f"{outcome.text!r} != {reference!r}")
        else:
            r.finished += 1


@dataclass
class StreamOutcome:
    text: str = ""
    tokens: int = 0
    finishes: int = 0
    error: str | None = None
    hung_up: bool = False
    longest_gap_s: float = 0.0


def stream(client: httpx.Client, url: str, body: dict, hang_up_after: int | None = None) -> StreamOutcome:
    """Stream one completion; with `hang_up_after`, close the connection after that many chunks."""
    out = StreamOutcome()
    last = time.monotonic()
    chunks = 0
    done = False
    try:
        with client.stream("POST", f"{url}/v1/completions", json={**body, "stream": True,
                                                                  "stream_options": {"include_usage": True}}) as reply:
            if reply.status_code != 200:
                out.error = f"HTTP {reply.status_code}: {reply.read().decode(errors='replace')[:300]}"
                return out
            for line in reply.iter_lines():
                now = time.monotonic()
                out.longest_gap_s = max(out.longest_gap_s, now - last)
                last = now
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    out.error = f"stream error: {event['error'].get('message', '')[:300]}"
                    return out
                for choice in event.get("choices", []):
                    out.text += choice.get("text", "")
                    if choice.get("finish_reason") is not None:
                        out.finishes += 1
                if event.get("usage"):
                    out.tokens = event["usage"]["completion_tokens"]
                chunks += 1
                if hang_up_after is not None and chunks >= hang_up_after:
                    out.hung_up = True
                    return out
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    if not done:
        out.error = "the stream ended without [DONE]"
    return out


class HealthProbe:
    """GET /health every 0.25 s: the longest answer, and how many were not 200."""

    def __init__(self, url: str):
        self.url = url
        self.longest_s = 0.0
        self.unhealthy = 0
        self.probes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def _run(self) -> None:
        with httpx.Client(timeout=60.0) as client:
            while not self._stop.wait(0.25):
                t0 = time.monotonic()
                try:
                    ok = client.get(f"{self.url}/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.longest_s = max(self.longest_s, time.monotonic() - t0)
                self.probes += 1
                self.unhealthy += not ok


def make_prompts(model: ModelConfig, count: int, output_len: int, rng: random.Random) -> list[dict]:
    """Token-id prompts of 4-40 tokens; every other one greedy, the rest seeded sampling."""
    prompts = []
    for i in range(count):
        ids = [rng.randrange(model.vocab_size) for _ in range(rng.randint(4, 40))]
        body = {"model": MODEL_NAME, "prompt": ids, "max_tokens": output_len, "ignore_eos": True}
        body.update({"temperature": 0.0} if i % 2 == 0 else {"temperature": 0.8, "top_p": 0.95, "seed": 1000 + i})
        prompts.append(body)
    return prompts


def topology(client: httpx.Client, url: str) -> dict:
    return client.get(f"{url}/v1/admin/topology", timeout=60).json()


def run(args: argparse.Namespace) -> int:
    rng = random.Random(args.seed)
    model = ModelConfig.from_pretrained(args.model)
    layouts = [str(t) for t in valid_layouts(model, args.pool)]
    if len(layouts) < 2:
        raise SystemExit(f"error: {args.model} has fewer than two valid layouts on a pool of {args.pool}")
    server = ServerProcess(args.model, [
        "--served-model-name", MODEL_NAME, "--worker-pool-size", str(args.pool), "--max-model-len", "256",
        "--num-kv-blocks", "256", "--block-size", "4", "--threads-per-worker", "1",
        # float32: every text is checked against one reference whatever layout served it, and
        # float32 greedy tokens do not depend on the layout (bfloat16's may, where logits tie)
        "--dtype", "float32", "--worker-hang-timeout", str(args.hang_timeout)], log_path=args.server_log)
    server.start()
    url = server.base_url
    client = httpx.Client(timeout=SWITCH_TIMEOUT_S)
    prompts = make_prompts(model, args.prompts, args.output_len, rng)
    print(f"chaos: {args.switches} switches, {args.faults} faults, pool {args.pool}, layouts {', '.join(layouts)}; "
          f"server {url}", flush=True)
    first = [stream(client, url, p) for p in prompts]
    if failed := [o.error for o in first if o.error is not None or o.tokens != args.output_len]:
        server.stop()
        raise SystemExit(f"error: the reference run (no faults) failed: {failed[0]}")
    references = [o.text for o in first]
    load, health = Load(url, prompts, references, args, rng), HealthProbe(url)
    load.start()
    health.start()
    t_start = time.monotonic()
    faults: list[Fault] = []
    outcomes: Counter[str] = Counter()
    doubles = Counter()
    wedges: list[str] = []
    switch_s: list[float] = []  # how long the committed switches without a fault took
    current = str(Topology.from_dict(topology(client, url)))
    try:
        for n in range(args.switches):
            target = rng.choice([lay for lay in layouts if lay != current])
            body = Topology.parse(target).as_dict()
            # Spread the faults evenly over the switches (the last ones may not get one).
            fault_here = len(faults) < args.faults and rng.random() < (args.faults - len(faults)) / (args.switches - n)
            double = rng.random() < args.double_share
            try:
                before = topology(client, url)
            except httpx.HTTPError as exc:
                wedges.append(f"the server stopped answering before switch {n}: {exc}")
                break
            reply: dict = {}
            second: dict = {}
            asked = threading.Thread(target=_ask, args=(client, url, body, reply), daemon=True)
            t_asked = time.monotonic()
            asked.start()
            if double:  # the same switch again at once: one of the two must get 409
                _ask(client, url, body, second)
                doubles[second["status"]] += 1
            fault = None
            if fault_here:
                victim = rng.choice(before["workers"])
                kind = "stop" if rng.random() < args.stop_share else "kill"
                aimed = bool(switch_s) and rng.random() < args.in_switch_share
                window = statistics.median(switch_s[-20:]) if aimed else args.max_delay_ms / 1000
                delay = rng.uniform(0, window)
                time.sleep(max(0.0, t_asked + delay - time.monotonic()))
                t_fault = time.monotonic()
                os.kill(victim["pid"], signal.SIGSTOP if kind == "stop" else signal.SIGKILL)
                fault = Fault(kind, victim["rank"], victim["role"], (t_fault - t_asked) * 1000, aimed, "", None)
            asked.join(SWITCH_TIMEOUT_S)
            if asked.is_alive() or "status" not in reply:
                wedges.append(f"switch {n} to {target} never answered")
                break
            if reply["status"] == 409 and second.get("status") == 200:
                reply = second  # the second was taken first: its switch is the one that ran
            body = reply.get("body", {})
            outcome = body.get("outcome", f"HTTP {reply['status']}")
            outcomes[outcome] += 1
            if outcome == "committed" and fault is None:
                switch_s.append(body["timings_s"]["total"])
            if fault is not None:
                fault.switch_outcome = outcome
                fault.recovery_s = _await_recovery(client, url, before, victim["pid"], t_fault)
                faults.append(fault)
                if fault.recovery_s is None:
                    wedges.append(f"fault {len(faults)} ({kind} rank {fault.rank}) never recovered")
                    break
            try:
                current = str(Topology.from_dict(topology(client, url)))
            except httpx.HTTPError as exc:
                wedges.append(f"the server stopped answering after switch {n}: {exc}")
                break
            if (n + 1) % 50 == 0:
                print(f"  {n + 1} switches ({dict(outcomes)}), {len(faults)} faults, requests: "
                      f"{asdict(load.requests) | {'examples': len(load.requests.examples)}}", flush=True)
    finally:
        load.stop()
        health.stop()
        elapsed = time.monotonic() - t_start
        final = {}
        if server.proc and server.proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                final = topology(client, url)
        # The server still serves every prompt right after the soak.
        after = [stream(client, url, p) for p in prompts[:2]] if final else []
        client.close()
        server.stop()
    for outcome, reference in zip(after, references):
        load._book(outcome, reference, prompts[0]["max_tokens"])
    server_exit = server.exit_code
    report = _report(args, layouts, outcomes, doubles, faults, load.requests, health, wedges, final, elapsed,
                     server_exit)
    print(_summary(report), flush=True)
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    failed = report["requests"]["lost"] + report["requests"]["duplicated"] + report["requests"]["corrupted"]
    return 1 if failed or wedges or server_exit != 0 else 0


def _ask(client: httpx.Client, url: str, layout: dict, out: dict) -> None:
    try:
        reply = client.post(f"{url}/v1/admin/reconfigure", json=layout)
        out["status"] = reply.status_code
        out["body"] = reply.json() if reply.status_code == 200 else {"error": reply.text[:300]}
    except httpx.HTTPError as exc:
        out["status"] = f"{type(exc).__name__}: {exc}"


def _await_recovery(client: httpx.Client, url: str, before: dict, victim_pid: int, t_fault: float) -> float | None:
    """Seconds from the signal until the server has replaced the victim (its pid is gone from the
    pool, the replacement count grew) and answers /health 200; None if not within RECOVERY_TIMEOUT_S."""
    while time.monotonic() - t_fault < RECOVERY_TIMEOUT_S:
        try:
            topo = topology(client, url)
            if (topo["worker_replacements"] > before["worker_replacements"]
                    and victim_pid not in {w["pid"] for w in topo["workers"]}
                    and client.get(f"{url}/health").status_code == 200):
                return time.monotonic() - t_fault
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    return None


def _stats(values: list[float]) -> dict:
    if not values:
        return {}
    values = sorted(values)
    return {"min": values[0], "median": statistics.median(values), "p95": values[int(0.95 * (len(values) - 1))],
            "max": values[-1]}


def _report(args, layouts, outcomes, doubles, faults, requests, health, wedges, final, elapsed, server_exit) -> dict:
    startup = final.get("worker_startup_s", [])
    recoveries = [f.recovery_s for f in faults if f.recovery_s is not None]
    startup_median = statistics.median(startup) if startup else None
    by_kind = Counter(f"{f.signal} {f.role}" for f in faults)
    host = host_info()
    return {
        "cpu": host.cpu, "cores": host.cores, "cpu_flags": list(host.flags), "model": args.model, "pool": args.pool,
        "layouts": layouts,
        "seed": args.seed, "elapsed_s": elapsed, "hang_timeout_s": args.hang_timeout,
        "max_delay_ms": args.max_delay_ms,
        "switches": {"asked": sum(outcomes.values()), "outcomes": dict(outcomes),
                     "asked_twice": sum(doubles.values()), "second_answers": {str(k): v for k, v in doubles.items()}},
        "faults": {"injected": len(faults), "by_kind": dict(by_kind),
                   "with_switch_outcome": dict(Counter(f.switch_outcome for f in faults)),
                   "aimed_in_switch": dict(Counter(f.switch_outcome for f in faults if f.aimed_in_switch)),
                   "replacements": final.get("worker_replacements"),
                   "recovery_s": _stats(recoveries),
                   "recovery_s_by_signal": {s: _stats([f.recovery_s for f in faults
                                                       if f.signal == s and f.recovery_s is not None])
                                            for s in ("kill", "stop")},
                   "worker_startup_s_median": startup_median,
                   "slowest_recovery_over_startup": (max(recoveries) / startup_median
                                                     if recoveries and startup_median else None),
                   "each": [asdict(f) for f in faults]},
        "requests": {k: v for k, v in asdict(requests).items()},
        "health": {"probes": health.probes, "not_200": health.unhealthy, "longest_s": health.longest_s},
        "wedges": wedges,
        "server_exit_code": server_exit,
    }


def _summary(r: dict) -> str:
    f, q, s = r["faults"], r["requests"], r["switches"]
    rec = f["recovery_s"]
    lines = [
        f"chaos on {r['cpu']} ({r['cores']} cores), pool {r['pool']}, {r['elapsed_s']:.0f} s",
        f"switches: {s['asked']} {s['outcomes']}; asked twice {s['asked_twice']} (second got {s['second_answers']})",
        f"faults: {f['injected']} {f['by_kind']}; switch outcomes {f['with_switch_outcome']} "
        f"(of those aimed inside a switch: {f['aimed_in_switch']}); replacements {f['replacements']}",
    ]
    if rec:
        startup, ratio = f["worker_startup_s_median"], f["slowest_recovery_over_startup"]
        lines.append(f"recovery s: median {rec['median']:.2f}, p95 {rec['p95']:.2f}, max {rec['max']:.2f}; "
                     f"worker start-up median {'n/a' if startup is None else f'{startup:.2f} s'}; "
                     f"slowest / start-up {'n/a' if ratio is None else f'{ratio:.2f}x'}")
    lines += [
        f"requests: {q['finished']} exact, {q['lost']} lost, {q['duplicated']} duplicated, {q['corrupted']} corrupted, "
        f"{q['disconnected']} hung up by the client; longest wait in a stream {q['longest_gap_s']:.2f} s",
        f"/health: {r['health']['probes']} probes, {r['health']['not_200']} not 200, longest {r['health']['longest_s']:.2f} s",
        f"wedges: {len(r['wedges'])}; server exit code {r['server_exit_code']}",
    ]
    lines += [f"  {e}" for e in q["examples"]] + [f"  {w}" for w in r["wedges"]]
    return "\n".join(lines)
