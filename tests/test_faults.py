"""A worker that dies or hangs — mid-switch or while serving — is replaced: the switch rolls
back, the server keeps serving on the old layout, and every request finishes with the tokens it
would have had anyway. Faults are injected with REMP_FAULT_INJECT (the worker SIGKILLs or
SIGSTOPs itself at the named phase); the engine never passes it to a replacement."""
from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
import helpers
from helpers import REPO, remp, remp_server, requests_running, worker_pids
from transformers import AutoModelForCausalLM

from remp.config import EngineConfig
from remp.engine.llm_engine import LLMEngine
from remp.engine.sampling import SamplingParams
from remp.bench.server_process import free_port
from remp.executor.local import LocalExecutor, PoolLostError, WorkerError
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
    return helpers.run_batch(engine, PROMPTS, GREEDY, tag, switch_to)


@pytest.mark.parametrize("phase,rank,action,loses_kv", [
    ("prepare", 3, "kill", False),  # a standby joining the target dies: the live KV is untouched
    ("migrate", 1, "kill", True),  # a serving rank dies mid-migration: its KV is gone, requests recompute
    ("migrate", 2, "hang", False),  # a joining rank stops while KV is on its way to it
    ("prepare", 1, "hang", True),  # a serving rank stops early, maybe before any heartbeat of it was read
])
def test_lost_worker_mid_switch_rolls_back_and_is_replaced(tiny_gqa, reference, monkeypatch, phase, rank, action,
                                                           loses_kv):
    monkeypatch.setenv(FAULT_ENV, f"{phase}:{rank}:{action}")
    engine = LLMEngine(EngineConfig(dtype="float32", model=tiny_gqa, tensor_parallel_size=1, pipeline_parallel_size=2,
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


def _layout(url: str) -> dict:
    return httpx.get(f"{url}/v1/admin/topology", timeout=60).json()


def _await_replacements(url: str, count: int, timeout_s: float) -> float:
    """Seconds until the server has replaced `count` workers in all and answers /health 200."""
    t0 = time.monotonic()
    while not (_layout(url)["worker_replacements"] >= count and httpx.get(f"{url}/health").status_code == 200):
        assert time.monotonic() - t0 < timeout_s, f"not {count} replacements within {timeout_s} s"
        time.sleep(0.05)
    return time.monotonic() - t0


def test_a_worker_killed_right_after_a_switch_request_rolls_back_in_seconds(tiny_gqa, tmp_path):
    """A worker SIGKILLed 0-50 ms after POST /v1/admin/reconfigure — before, during or right after
    the prepare — is replaced within seconds (the survivors were not left in a group rendezvous
    with it, and its replacement joined at once), the switch answers, and the requests under way
    finish with their exact tokens. The server then switches again as if nothing happened."""
    with remp_server(tiny_gqa, tmp_path / "serve.log", "--served-model-name", "tiny", "--worker-pool-size", "3",
                     "--pipeline-parallel-size", "2", "--worker-hang-timeout", str(HANG_TIMEOUT_S)) as url:
        expected = completion(url, PROMPTS[0], LONG_TOKENS)
        targets = [(2, 1), (1, 3), (1, 1), (1, 2)]
        replaced = 0
        for i, (delay, victim) in enumerate([(0.0, 1), (0.003, 2), (0.01, 0), (0.05, 1)]):
            tp, pp = targets[i % len(targets)]
            pid = _layout(url)["workers"][victim]["pid"]
            with ThreadPoolExecutor(2) as pool:
                running = pool.submit(completion, url, PROMPTS[0], LONG_TOKENS)
                while requests_running(url) < 1:
                    time.sleep(0.01)
                switch = pool.submit(httpx.post, f"{url}/v1/admin/reconfigure",
                                     json={"tensor_parallel_size": tp, "pipeline_parallel_size": pp}, timeout=120)
                time.sleep(delay)
                os.kill(pid, signal.SIGKILL)
                reply = switch.result(timeout=120)
                assert reply.status_code == 200, reply.text
                assert running.result(timeout=120) == expected
            replaced += 1
            assert _await_replacements(url, replaced, 60) < 30
            body = reply.json()
            if body["outcome"] == "rolled_back":
                assert body["replaced_ranks"] == [victim] and f"rank {victim} " in body["reason"], body
            assert pid not in {w["pid"] for w in _layout(url)["workers"]}
        reply = httpx.post(f"{url}/v1/admin/reconfigure", json={"tensor_parallel_size": 1, "pipeline_parallel_size": 3},
                           timeout=120)
        assert reply.json()["outcome"] in ("committed", "unchanged"), reply.text
        assert completion(url, PROMPTS[0], LONG_TOKENS) == expected


def test_a_stopped_standby_is_found_while_the_steps_keep_coming(tiny_gqa, tmp_path):
    """A standby SIGSTOPped while requests keep the engine busy is found hung within the hang timeout
    and replaced — though step results keep arriving, so no wait on them ever lasts that long."""
    with remp_server(tiny_gqa, tmp_path / "serve.log", "--served-model-name", "tiny", "--worker-pool-size", "3",
                     "--worker-hang-timeout", "2") as url:
        expected = completion(url, PROMPTS[0], 48)
        standby = _layout(url)["workers"][2]
        assert standby["role"] == "standby"
        stop = threading.Event()
        texts: list[str] = []

        def keep_busy() -> None:  # back-to-back requests: the engine is never idle
            while not stop.is_set():
                texts.append(completion(url, PROMPTS[0], 48))

        with ThreadPoolExecutor(3) as pool:
            clients = [pool.submit(keep_busy) for _ in range(3)]
            while requests_running(url) < 1:
                time.sleep(0.01)
            os.kill(standby["pid"], signal.SIGSTOP)
            try:
                assert _await_replacements(url, 1, 30) < 15
            finally:
                stop.set()
                for client in clients:
                    client.result(timeout=120)
        assert texts and all(text == expected for text in texts)
        assert standby["pid"] not in {w["pid"] for w in _layout(url)["workers"]}


def test_health_turns_503_while_the_engine_makes_no_progress(tiny_gqa, tmp_path):
    """/health answers 503 once the engine loop has made no progress for --engine-stall-timeout (here a
    serving worker is stopped and the hang timeout is long), and 200 again when it moves on."""
    with remp_server(tiny_gqa, tmp_path / "serve.log", "--served-model-name", "tiny", "--worker-hang-timeout", "300",
                     "--engine-stall-timeout", "2") as url:
        expected = completion(url, PROMPTS[0], LONG_TOKENS)
        worker = _layout(url)["workers"][0]
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(completion, url, PROMPTS[0], LONG_TOKENS)
            while requests_running(url) < 1:
                time.sleep(0.01)
            os.kill(worker["pid"], signal.SIGSTOP)
            try:
                deadline = time.monotonic() + 20
                while (health := httpx.get(f"{url}/health", timeout=5)).status_code == 200:
                    assert time.monotonic() < deadline, "/health stayed 200 while the engine was stuck"
                    time.sleep(0.2)
                assert health.status_code == 503 and "no progress" in health.json()["reason"], health.text
            finally:
                os.kill(worker["pid"], signal.SIGCONT)
            assert running.result(timeout=120) == expected
        assert httpx.get(f"{url}/health").status_code == 200


def test_a_replacement_that_cannot_start_is_tried_again_then_the_pool_is_given_up(tiny_gqa, tmp_path):
    """A replacement that dies starting up is seen at once — not after the start timeout — and
    tried again with a fresh rendezvous; after MAX_FORMATION_ATTEMPTS the executor says so."""
    model = tmp_path / "model"
    shutil.copytree(tiny_gqa, model)
    executor = LocalExecutor(str(model), 2, "float32")
    try:
        executor.procs[1].send_signal(signal.SIGKILL)
        executor.kill(executor.failed_ranks(wait_s=30))
        (model / "config.json").rename(model / "config.json.gone")  # every new worker now fails to start
        t0 = time.monotonic()
        with pytest.raises(PoolLostError, match="config.json"):
            executor.replace(timeout_s=120)
        assert time.monotonic() - t0 < 60
        assert executor.procs[0].poll() is None  # the survivor is untouched
    finally:
        executor.shutdown()


def test_server_that_cannot_rebuild_its_pool_answers_503_and_exits_1(tiny_gqa, tmp_path):
    """When no replacement can start, the engine stops: a request waiting meanwhile gets 503 (the
    engine stopped), and `remp serve` shuts down and exits 1 instead of serving errors forever."""
    model = tmp_path / "model"
    shutil.copytree(tiny_gqa, model)
    port = free_port()
    log = tmp_path / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(remp("serve", str(model), "--port", str(port), "--served-model-name", "tiny",
                                     "--max-model-len", "256", "--num-kv-blocks", "128", "--worker-pool-size", "2"),
                                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "not healthy"
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            time.sleep(0.5)
        pid = _layout(url)["workers"][0]["pid"]
        (model / "config.json").rename(model / "config.json.gone")
        with ThreadPoolExecutor(1) as pool:
            os.kill(pid, signal.SIGKILL)
            waiting = pool.submit(httpx.post, f"{url}/v1/completions", timeout=120,
                                  json={"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 4})
            reply = waiting.result(timeout=120)
        assert reply.status_code == 503, reply.text
        assert reply.json()["error"]["code"] == "engine_stopped"
        assert proc.wait(timeout=120) == 1
        assert "could not rebuild the worker pool" in log.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
