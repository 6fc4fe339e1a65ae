"""A worker that dies or hangs — mid-switch or while serving — is replaced: the switch rolls
back, the server keeps serving on the old layout, and every request finishes with the tokens it
would have had anyway. Faults are injected with REMP_FAULT_INJECT (the worker SIGKILLs or
SIGSTOPs itself at the named phase); the engine never passes it to a replacement."""
from __future__ import annotations

import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from helpers import remp_server, requests_running, worker_pids
from transformers import AutoModelForCausalLM

from remp.config import EngineConfig
from remp.engine.llm_engine import LLMEngine
from remp.engine.sampling import SamplingParams
from remp.executor.local import LocalExecutor, WorkerError
from remp.executor.messages import FAULT_ENV
from remp.topology import Topology

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 99, 3, 42], list(range(30, 71)), [400, 2, 250, 7, 7, 7, 19, 11, 12, 13, 14, 15, 16, 17, 18]]
MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
SOURCE, TARGET = Topology(1, 2), Topology(2, 2)  # ranks 0, 1 serve; 2, 3 join for the target
HANG_TIMEOUT_S = 4.0
LONG_TOKENS = 240  # of the test server's 256 positions: a request that runs for a second or more


@pytest.fixture(scope="module")
def reference(tiny_gqa) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(tiny_gqa, dtype=torch.float32)
    return [hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False,
                        eos_token_id=None)[0, len(p):].tolist() for p in PROMPTS]


def run_batch(engine: LLMEngine, tag: str, switch_to: Topology | None = None):
    """Run PROMPTS to the end, switching after a few steps; returns (tokens, switch result)."""
    done = {}

    def book(outs):
        done.update({o.request_id: o for o in outs if o.finished})

    for i, p in enumerate(PROMPTS):
        engine.add_request(f"{tag}-{i}", p, GREEDY)
    for _ in range(3):
        book(engine.step())
    result = engine.reconfigure(switch_to, book) if switch_to else None
    while engine.has_unfinished():
        book(engine.step())
    return [done[f"{tag}-{i}"].token_ids for i in range(len(PROMPTS))], result


@pytest.mark.parametrize("phase,rank,action,loses_kv", [
    ("prepare", 3, "kill", False),  # a standby joining the target dies: the live KV is untouched
    ("migrate", 1, "kill", True),  # a serving rank dies mid-migration: its KV is gone, requests recompute
    ("migrate", 2, "hang", False),  # a joining rank stops while KV is on its way to it
    ("prepare", 1, "hang", True),  # a serving rank stops early, maybe before any heartbeat of it was read
])
def test_lost_worker_mid_switch_rolls_back_and_is_replaced(tiny_gqa, reference, monkeypatch, phase, rank, action,
                                                           loses_kv):
    monkeypatch.setenv(FAULT_ENV, f"{phase}:{rank}:{action}")
    engine = LLMEngine(EngineConfig(model=tiny_gqa, tensor_parallel_size=1, pipeline_parallel_size=2,
                                    worker_pool_size=4, max_model_len=128, block_size=4,
                                    worker_hang_timeout_s=HANG_TIMEOUT_S))
    try:
        old_pid = engine.executor.procs[rank].pid
        tokens, result = run_batch(engine, "a", TARGET)
        assert result.outcome == "rolled_back"
        assert result.replaced_ranks == [rank]
        assert f"rank {rank} {'exited' if action == 'kill' else 'hung'}" in result.reason, result.reason
        assert engine.topology == SOURCE
        assert engine.executor.procs[rank].pid != old_pid
        assert bool(result.preempted_request_ids) == loses_kv
        assert tokens == reference
        # The replacement is a full member: the same switch now commits, and tokens stay right.
        tokens, result = run_batch(engine, "b", TARGET)
        assert result.outcome == "committed", result.reason
        assert tokens == reference
        assert engine.stats().num_worker_replacements == 1
    finally:
        engine.shutdown()


def completion(url: str, prompt: list[int], max_tokens: int = MAX_TOKENS) -> str:
    reply = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": prompt, "max_tokens": max_tokens,
                                                     "temperature": 0, "ignore_eos": True}, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def test_server_replaces_a_worker_killed_while_idle_and_mid_switch(tiny_gqa, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULT_ENV, "migrate:1:kill")
    with remp_server(tiny_gqa, tmp_path / "serve.log", "--served-model-name", "tiny", "--worker-pool-size", "4",
                     "--pipeline-parallel-size", "2", "--worker-hang-timeout", str(HANG_TIMEOUT_S)) as url:
        expected = completion(url, PROMPTS[1])
        expected_long = completion(url, PROMPTS[0], LONG_TOKENS)
        # Killed while idle: replaced before the next request needs it.
        pids = worker_pids(int(url.rsplit(":", 1)[1]))
        assert sorted(pids) == [0, 1, 2, 3]
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 120
        while 'remp:worker_replacements_total{model_name="tiny"} 1.0' not in httpx.get(f"{url}/metrics").text:
            assert time.monotonic() < deadline, "the dead worker was not replaced"
            time.sleep(0.2)
        assert httpx.get(f"{url}/health").status_code == 200
        assert completion(url, PROMPTS[1]) == expected
        # Killed mid-switch (rank 1 serves and dies as KV starts to move) with a request in
        # flight: 200 with the rollback and the replacement; the request recomputes and finishes.
        # The switch starts once the request runs, and the request is long enough to still hold
        # KV when the switch moves it (with none live, no KV moves and the fault never fires).
        with ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(completion, url, PROMPTS[0], LONG_TOKENS)
            while requests_running(url) < 1:
                assert not in_flight.done(), "the request finished before the switch began"
                time.sleep(0.02)
            reply = httpx.post(f"{url}/v1/admin/reconfigure",
                               json={"tensor_parallel_size": 2, "pipeline_parallel_size": 2}, timeout=300)
            assert in_flight.result() == expected_long
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["outcome"] == "rolled_back" and body["replaced_ranks"] == [1], body
        topo = httpx.get(f"{url}/v1/admin/topology").json()
        assert (topo["tensor_parallel_size"], topo["pipeline_parallel_size"]) == (1, 2)
        assert completion(url, PROMPTS[1]) == expected
        assert 'remp:worker_replacements_total{model_name="tiny"} 2.0' in httpx.get(f"{url}/metrics").text


def test_a_lost_peer_is_found_when_a_survivor_reports_it_first(tiny_gqa):
    """A survivor reports a killed peer (its connection reset) while the peer is still being torn
    down: `failed_ranks(wait_s=...)` gives the exit time to show, so the engine replaces the rank
    instead of taking the report for a failure of the survivor's own and stopping."""
    executor = LocalExecutor(tiny_gqa, 2, "float32")
    try:
        executor.procs[1].send_signal(signal.SIGKILL)
        assert executor.failed_ranks(wait_s=30) == [1]
    finally:
        executor.shutdown()


def test_a_command_to_a_worker_whose_process_is_gone_fails_instead_of_waiting(tiny_gqa):
    """The rollback of a switch that lost a worker sends Abort to every rank, maybe before the
    engine saw the exit (a survivor's report can come first). A gone worker's command socket has
    no connection left: the send must fail, naming it, not wait for a reconnection forever."""
    executor = LocalExecutor(tiny_gqa, 2, "float32")
    try:
        executor.procs[1].send_signal(signal.SIGKILL)
        executor.procs[1].wait(timeout=30)
        time.sleep(0.5)  # the command socket drops its connection to the gone process
        outcome = {}

        def abort() -> None:
            try:
                executor.abort(timeout_s=30)
            except WorkerError as exc:
                outcome["error"] = str(exc)

        sender = threading.Thread(target=abort, daemon=True)
        sender.start()
        sender.join(timeout=60)
        assert not sender.is_alive(), "the Abort to the gone worker is still waiting to be sent"
        assert "rank 1 took no command" in outcome.get("error", ""), outcome
        assert executor.failed_ranks() == [1]
    finally:
        executor.shutdown()
