"""Live switches through the HTTP API and `remp reconfigure`, on a real server with a pool of 4
(2 active, 2 standby at start) and an API key."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from helpers import REPO, remp, remp_server, requests_running, serve_pids, worker_pids
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow
KEY = "admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_gqa, tmp_path_factory) -> Iterator[str]:
    with remp_server(tiny_gqa, tmp_path_factory.mktemp("logs") / "serve.log", "-tp", "1", "-pp", "2",
                     "--worker-pool-size", "4", "--api-key", KEY) as url:
        yield url


def layout(url: str) -> dict:
    return httpx.get(f"{url}/v1/admin/topology", headers=AUTH).json()


def switch(url: str, tp: int, pp: int, headers=AUTH) -> httpx.Response:
    return httpx.post(f"{url}/v1/admin/reconfigure", headers=headers, timeout=300,
                      json={"tensor_parallel_size": tp, "pipeline_parallel_size": pp})


def stream(url: str, model: str, max_tokens: int) -> str:
    body = {"model": model, "prompt": "The capital of France is", "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True}
    text = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers=AUTH, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text += [c["text"] for c in json.loads(line[6:])["choices"]]
    return "".join(text)


def stream_running(url: str, model: str, max_tokens: int) -> tuple[threading.Thread, dict]:
    """Start `stream` on a thread and return once the server runs it: the thread, and the dict
    that gets its text under "text"."""
    result: dict = {}
    reader = threading.Thread(target=lambda: result.update(text=stream(url, model, max_tokens)))
    reader.start()
    while requests_running(url) < 1:
        assert reader.is_alive(), "the stream finished before it was seen running"
        time.sleep(0.01)
    return reader, result


def test_topology_reports_active_and_standby(server):
    reply = layout(server)
    assert reply.pop("num_kv_blocks") > 0
    workers = reply.pop("workers")
    assert [(w["rank"], w["role"]) for w in workers] == [(0, "active"), (1, "active"), (2, "standby"), (3, "standby")]
    assert len({w["pid"] for w in workers}) == 4
    startup = reply.pop("worker_startup_s")
    assert len(startup) == 4 and all(s > 0 for s in startup)
    assert reply == {"tensor_parallel_size": 1, "pipeline_parallel_size": 2, "data_parallel_size": 1,
                     "enable_expert_parallel": False, "expert_placement_strategy": "linear", "worker_pool_size": 4,
                     "active_ranks": [0, 1], "standby_ranks": [2, 3], "worker_replacements": 0}


def test_stream_in_flight_survives_switches(server, tiny_gqa):
    reference = stream(server, tiny_gqa, 120)
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(text=stream(server, tiny_gqa, 120)))
    worker.start()
    replies = [switch(server, 2, 2), switch(server, 4, 1), switch(server, 1, 2)]
    worker.join(timeout=300)
    for r in replies:
        assert r.status_code == 200 and r.json()["outcome"] == "committed", r.text
    body = replies[0].json()
    timings = body["timings_s"]
    assert set(timings) >= {"plan", "prepare", "drain", "migrate", "commit", "pause", "total"}
    # The pause runs from the cut to the resume: the drain is in it.
    assert timings["pause"] == pytest.approx(timings["drain"] + timings["commit"], abs=1e-6)
    # The slowest worker's build, part by part, is a share of the prepare phase that waited for it.
    assert set(body["build_s"]) == {"groups", "shard", "model", "kv"}
    assert all(0 <= s <= body["timings_s"]["prepare"] for s in body["build_s"].values())
    assert body["source"] == {"tensor_parallel_size": 1, "pipeline_parallel_size": 2, "data_parallel_size": 1,
                              "enable_expert_parallel": False, "expert_placement_strategy": "linear"}
    assert result["text"] == reference
    assert layout(server)["tensor_parallel_size"] == 1 and layout(server)["pipeline_parallel_size"] == 2
    samples = {(s.name, s.labels.get("outcome")): s.value for f in
               text_string_to_metric_families(httpx.get(f"{server}/metrics").text) for s in f.samples}
    assert samples[("remp:reconfigurations_total", "committed")] >= 3


def test_a_switch_does_not_wait_for_the_step_under_way(server, tiny_gqa):
    """A switch asked for while a step runs starts at once, preparing beside that step. The step is
    held up by stopping its last stage's worker for HELD_S: had the switch waited for it to end,
    it would have queued for all of that."""
    held_s = 1.5
    reference = stream(server, tiny_gqa, 240)
    reader, result = stream_running(server, tiny_gqa, 240)
    last_stage = worker_pids(int(server.rsplit(":", 1)[1]))[max(layout(server)["active_ranks"])]
    os.kill(last_stage, signal.SIGSTOP)
    try:
        assert requests_running(server) == 1, "the request is mid-generation, its step cannot end"
        with ThreadPoolExecutor(1) as pool:
            reply = pool.submit(switch, server, 2, 2)
            time.sleep(held_s)
            os.kill(last_stage, signal.SIGCONT)
            reply = reply.result()
    finally:
        os.kill(last_stage, signal.SIGCONT)
    reader.join(timeout=300)
    assert reply.status_code == 200 and reply.json()["outcome"] == "committed", reply.text
    timings = reply.json()["timings_s"]
    assert timings["queued"] < held_s / 3, timings
    assert timings["total"] > held_s / 2, timings  # it did wait for that step (and that worker) to pause
    assert result["text"] == reference
    assert switch(server, 1, 2).json()["outcome"] == "committed"


@pytest.mark.parametrize("tp,pp,reason", [(3, 1, "does not divide"), (1, 5, "exceeds the 4 layers"),
                                          (4, 2, "the pool has 4")])
def test_invalid_target_is_400_and_changes_nothing(server, tp, pp, reason):
    before = layout(server)
    r = switch(server, tp, pp)
    assert r.status_code == 400 and reason in r.json()["error"]["message"]
    assert layout(server) == before


@pytest.mark.parametrize("extra,reason", [
    ({"enable_expert_parallel": True}, "needs a mixture-of-experts model"),
    ({"data_parallel_size": 4}, "dp*tp*pp = 8 workers needed but the pool has 4"),
    ({"expert_placement_strategy": "round_robin"}, "set enable_expert_parallel too"),
])
def test_an_invalid_expert_or_data_parallel_target_is_400_and_changes_nothing(server, extra, reason):
    before = layout(server)
    r = httpx.post(f"{server}/v1/admin/reconfigure", headers=AUTH, timeout=300,
                   json={"tensor_parallel_size": 2, "pipeline_parallel_size": 1, **extra})
    assert r.status_code == 400 and reason in r.json()["error"]["message"]
    assert layout(server) == before and before["enable_expert_parallel"] is False


@pytest.mark.parametrize("body", [{"tensor_parallel_size": 2}, {"tensor_parallel_size": 0, "pipeline_parallel_size": 1},
                                  {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "extra": 1},
                                  {"tensor_parallel_size": 2, "pipeline_parallel_size": 1,
                                   "enable_expert_parallel": "yes"},
                                  {"tensor_parallel_size": 1, "pipeline_parallel_size": 1, "data_parallel_size": 0},
                                  {"tensor_parallel_size": 1, "pipeline_parallel_size": 1,
                                   "expert_placement_strategy": "random"}])
def test_malformed_reconfigure_is_400(server, body):
    r = httpx.post(f"{server}/v1/admin/reconfigure", headers=AUTH, json=body)
    assert r.status_code == 400 and "error" in r.json()


def test_concurrent_switch_gets_409(server):
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=AUTH, timeout=300) as client:
            posts = [client.post(f"{server}/v1/admin/reconfigure",
                                 json={"tensor_parallel_size": tp, "pipeline_parallel_size": 1}) for tp in (4, 2, 4, 2)]
            return await asyncio.gather(*posts)

    replies = asyncio.run(burst())
    codes = sorted(r.status_code for r in replies)
    assert codes[0] == 200 and 409 in codes, [r.text for r in replies]
    winner = next(r for r in replies if r.status_code == 200).json()["target"]
    assert layout(server)["tensor_parallel_size"] == winner["tensor_parallel_size"]


def test_admin_needs_the_key(server):
    before = layout(server)
    assert switch(server, 1, 1, headers={}).status_code == 401
    assert httpx.get(f"{server}/v1/admin/topology").status_code == 401
    assert httpx.post(f"{server}/v1/admin/shutdown").status_code == 401
    assert httpx.get(f"{server}/health").status_code == 200
    assert layout(server) == before


def test_shutdown_lets_the_stream_in_flight_finish_then_exits(tiny_gqa, tmp_path):
    """POST /v1/admin/shutdown stops the server as Ctrl-C does: a stream it holds runs to the
    end with the tokens it would have had, then the process (workers included) exits 0."""
    with remp_server(tiny_gqa, tmp_path / "serve.log", "--api-key", KEY) as url:
        reference = stream(url, tiny_gqa, 120)
        reader, result = stream_running(url, tiny_gqa, 120)
        reply = httpx.post(f"{url}/v1/admin/shutdown", headers=AUTH)
        assert reply.status_code == 200 and reply.json() == {"status": "shutting down"}
        reader.join(timeout=120)
        assert result["text"] == reference
        port = int(url.rsplit(":", 1)[1])
        deadline = time.monotonic() + 60
        while serve_pids(port):
            assert time.monotonic() < deadline, "the server did not exit"
            time.sleep(0.2)


def test_cli_reconfigure(server):
    ok = subprocess.run(remp("reconfigure", "--url", server, "--tp", "1", "--pp", "4", "--api-key", KEY),
                        cwd=REPO, capture_output=True, text=True, timeout=300)
    assert ok.returncode == 0 and ok.stdout.startswith("committed: ") and "-> tp1pp4" in ok.stdout, ok.stderr
    assert "of prepare, the slowest worker's build: groups " in ok.stdout
    bad = subprocess.run(remp("reconfigure", "--url", server, "--tp", "3", "--pp", "1", "--api-key", KEY),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "HTTP 400" in bad.stderr


def test_twenty_switches_under_a_steady_stream_lose_and_duplicate_nothing(server, tiny_gqa):
    """Requests keep arriving (four at a time) while the layout flips 20 times; every request
    completes exactly once with the greedy text it gets with no switch."""
    reference = stream(server, tiny_gqa, 40)
    texts: list[str] = []
    issued: list[int] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            issued.append(1)
            try:
                texts.append(stream(server, tiny_gqa, 40))
            except BaseException as exc:  # a lost request: make the test see it
                errors.append(exc)

    clients = [threading.Thread(target=client) for _ in range(4)]
    for c in clients:
        c.start()
    try:
        for i in range(20):
            r = switch(server, *((2, 2) if i % 2 == 0 else (1, 2)))
            assert r.status_code == 200 and r.json()["outcome"] == "committed", r.text
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=300)
    assert not errors and len(texts) == len(issued) >= 4
    assert texts == [reference] * len(texts)
    finished = {(s.name, s.labels.get("finished_reason")): s.value for f in
                text_string_to_metric_families(httpx.get(f"{server}/metrics").text) for s in f.samples}
    assert finished.get(("remp:request_success_total", "abort"), 0) == 0
