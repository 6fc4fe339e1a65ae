"""Helpers for end-to-end tests that run `remp` as a user would: real processes on 127.0.0.1."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from remp.bench.server_process import free_port

REPO = Path(__file__).resolve().parents[1]
MAX_MODEL_LEN = 256
STARTUP_TIMEOUT_S = 240


def remp(*args: str) -> list[str]:
    return [sys.executable, "-m", "remp.cli", *args]


def processes() -> dict[int, tuple[list[bytes], int]]:
    """pid -> (command line split at NULs, parent pid) of every live process on this machine
    (a zombie's command line is empty)."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            procs[int(entry.name)] = (cmdline, ppid)
    return procs


def serve_pids(port: int, procs: dict[int, tuple[list[bytes], int]] | None = None) -> list[int]:
    """The `remp serve --port PORT` processes among `procs` (default: running now)."""
    procs = processes() if procs is None else procs
    return [pid for pid, (cmd, _) in procs.items()
            if b"remp.cli" in cmd and b"serve" in cmd and str(port).encode() in cmd]


def worker_pids(port: int) -> dict[int, int]:
    """Rank -> pid of the worker processes of the `remp serve --port PORT` running on this machine
    (a worker's command line carries its JSON spec, rank included)."""
    procs = processes()
    servers = set(serve_pids(port, procs))
    return {json.loads(cmd[-2])["rank"]: pid for pid, (cmd, ppid) in procs.items()
            if ppid in servers and b"remp.worker.worker" in cmd}


def requests_running(url: str) -> float:
    """The server's remp:num_requests_running gauge."""
    return next(s.value for f in text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
                for s in f.samples if s.name == "remp:num_requests_running")


@contextmanager
def remp_server(model: str, log_path: Path, *extra: str) -> Iterator[str]:
    """Run `remp serve` until /health answers and yield its base URL; then SIGTERM it and
    expect a clean exit (SIGKILL to its whole session if it hangs, so no worker outlives
    the test)."""
    port = free_port()
    # float32: the tests compare tokens with transformers' float32 and across layouts (`auto` is
    # bfloat16 on CPUs with native bfloat16); a test may pass its own --dtype in `extra`.
    cmd = remp("serve", model, "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
               "--num-kv-blocks", "128", "--threads-per-worker", "1", "--dtype", "float32", *extra)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"remp serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"remp serve not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()




def transformers_greedy(model_dir: str, prompts: list[list[int]], max_tokens: int) -> list[tuple[list[int], list]]:
    """transformers' greedy continuation of each prompt and its per-step log-softmax."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    refs = []
    for p in prompts:
        out = hf.generate(torch.tensor([p]), max_new_tokens=max_tokens, do_sample=False, eos_token_id=None,
                          output_logits=True, return_dict_in_generate=True)
        refs.append((out.sequences[0, len(p):].tolist(), [torch.log_softmax(s[0].float(), -1) for s in out.logits]))
    return refs


def generate(engine, prompts: list[list[int]], params, tag: str, switch_to=(), start: int = 2, every: int = 2):
    """Run `prompts` through an in-process LLMEngine to the end. With `switch_to`, switch live to
    each layout in turn: after `start` steps, then every `every` steps (each must commit).
    Returns (the finished outputs in prompt order, the switch results)."""
    done, results = {}, []

    def book(outs):
        done.update({o.request_id: o for o in outs if o.finished})

    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}{i}", p, params)
    pending, steps = list(switch_to), 0
    while engine.has_unfinished():
        book(engine.step())
        steps += 1
        if pending and steps >= start and (steps - start) % every == 0:
            results.append(engine.reconfigure(pending.pop(0), book))
            assert results[-1].outcome == "committed", results[-1].reason
    assert not pending, "the requests ended before every switch"
    return [done[f"{tag}{i}"] for i in range(len(prompts))], results


def run_batch(engine, prompts: list[list[int]], params, tag: str, switch_to=None):
    """Run `prompts` to the end, asking for a switch to `switch_to` (whatever its outcome) after 3
    steps; returns (the token ids in prompt order, the switch result or None)."""
    done = {}

    def book(outs):
        done.update({o.request_id: o for o in outs if o.finished})

    for i, p in enumerate(prompts):
        engine.add_request(f"{tag}-{i}", p, params)
    for _ in range(3):
        book(engine.step())
    result = engine.reconfigure(switch_to, book) if switch_to else None
    while engine.has_unfinished():
        book(engine.step())
    return [done[f"{tag}-{i}"].token_ids for i in range(len(prompts))], result
