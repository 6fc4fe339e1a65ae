"""Tests for `remp bench serve`: arrival schedule, metric aggregation, and the client end to end.

The end-to-end tests talk over real HTTP to a small SSE-speaking stand-in for
the OpenAI API written here with aiohttp.web.  The real remp server is tested
elsewhere; these prove the client builds the right requests, parses streams
(including events split across or packed into network writes), counts tokens
and honours --max-concurrency.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from remp.bench.metrics import RequestRecord, compute_metrics
from remp.bench.serve import (
    CHAT_COMPLETIONS,
    BenchConfig,
    BenchError,
    add_arguments,
    arrival_offsets,
    benchmark,
    load_tokenizer,
    run,
    sample_random_requests,
)
from remp.bench.workload import (
    load_trace,
    parse_rate_schedule,
    sample_trace_path,
    schedule_arrivals,
)

WORDS = 40  # ordinary vocabulary w0..w39, ids 3..42


# --- arrivals -----------------------------------------------------------------


def test_poisson_arrivals_have_mean_gap_one_over_rate() -> None:
    offsets = arrival_offsets(20_000, rate=50.0, burstiness=1.0, seed=0)
    gaps = np.diff(offsets)
    assert len(offsets) == 20_000 and offsets[0] == 0.0
    assert np.all(gaps >= 0)
    assert np.mean(gaps) == pytest.approx(1 / 50, rel=0.03)
    # Exponential gaps: standard deviation equals the mean.
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(1.0, rel=0.05)


def test_burstiness_changes_variance_not_mean() -> None:
    bursty = np.diff(arrival_offsets(20_000, rate=10.0, burstiness=0.25, seed=1))
    smooth = np.diff(arrival_offsets(20_000, rate=10.0, burstiness=4.0, seed=1))
    for gaps, shape in ((bursty, 0.25), (smooth, 4.0)):
        assert np.mean(gaps) == pytest.approx(0.1, rel=0.05)
        # Gamma coefficient of variation is 1 / sqrt(shape).
        assert np.std(gaps) / np.mean(gaps) == pytest.approx(1 / math.sqrt(shape), rel=0.1)


def test_arrivals_are_seeded_and_infinite_rate_sends_at_once() -> None:
    a = arrival_offsets(100, rate=5.0, burstiness=1.0, seed=7)
    assert np.array_equal(a, arrival_offsets(100, rate=5.0, burstiness=1.0, seed=7))
    assert not np.array_equal(a, arrival_offsets(100, rate=5.0, burstiness=1.0, seed=8))
    assert np.array_equal(arrival_offsets(5, math.inf, 1.0, 0), np.zeros(5))


# --- metrics ------------------------------------------------------------------


def test_metrics_aggregate_like_vllm() -> None:
    records = [
        RequestRecord(prompt_len=10, success=True, ttft=0.1, itl=[0.05, 0.05, 0.1],
                      latency=0.3, output_tokens=4),
        RequestRecord(prompt_len=20, success=True, ttft=0.2, itl=[0.1], latency=0.3,
                      output_tokens=2),
        RequestRecord(prompt_len=30, success=True, ttft=0.4, latency=0.4, output_tokens=1),
        RequestRecord(prompt_len=99, error="HTTP 500: boom"),
    ]
    m = compute_metrics(records, duration_s=2.0)
    assert (m.completed, m.failed) == (3, 1)
    assert (m.total_input_tokens, m.total_output_tokens) == (60, 7)
    assert m.request_throughput == pytest.approx(1.5)
    assert m.output_throughput == pytest.approx(3.5)
    assert m.total_token_throughput == pytest.approx(33.5)
    # TTFT over [100, 200, 400] ms with linear-interpolated percentiles.
    assert m.ttft.mean_ms == pytest.approx(700 / 3)
    assert m.ttft.median_ms == pytest.approx(200)
    assert m.ttft.p90_ms == pytest.approx(360)
    assert m.ttft.p99_ms == pytest.approx(396)
    # TPOT = (e2e - ttft) / (tokens - 1); a 1-token request has none.
    assert m.tpot.mean_ms == pytest.approx((200 / 3 + 100) / 2)
    assert m.tpot.median_ms == pytest.approx((200 / 3 + 100) / 2)
    # ITLs of all requests pooled: [50, 50, 100, 100].
    assert (m.itl.mean_ms, m.itl.median_ms) == (pytest.approx(75), pytest.approx(75))
    assert m.e2el.mean_ms == pytest.approx(1000 / 3)
    assert m.e2el.p99_ms == pytest.approx(398)


def test_metrics_of_all_failed_run_are_zero() -> None:
    m = compute_metrics([RequestRecord(prompt_len=5, error="x")], duration_s=1.0)
    assert (m.completed, m.failed, m.total_output_tokens) == (0, 1, 0)
    assert m.ttft.mean_ms == m.tpot.p99_ms == m.itl.median_ms == m.e2el.p90_ms == 0.0


# --- dataset ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real HF tokenizer directory: word-level, 3 special tokens and one added token."""
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>"
    )
    tok.add_tokens(["<extra>"])
    out = tmp_path_factory.mktemp("tokenizer")
    tok.save_pretrained(out)
    return out


def test_random_prompts_are_exact_seeded_and_free_of_special_tokens(tokenizer_dir: Path) -> None:
    tok = load_tokenizer(str(tokenizer_dir))
    ordinary = set(range(3, 3 + WORDS))
    exact = sample_random_requests(tok, 50, input_len=16, output_len=8, range_ratio=0.0, seed=3)
    assert all(len(s.prompt_ids) == 16 and s.output_len == 8 for s in exact)
    assert set().union(*(s.prompt_ids for s in exact)) == ordinary  # all drawn, none special
    ranged = sample_random_requests(tok, 200, input_len=20, output_len=10, range_ratio=0.5, seed=3)
    in_lens = {len(s.prompt_ids) for s in ranged}
    out_lens = {s.output_len for s in ranged}
    assert min(in_lens) >= 10 and max(in_lens) <= 30 and len(in_lens) > 10
    assert min(out_lens) >= 5 and max(out_lens) <= 15 and len(out_lens) > 5
    again = sample_random_requests(tok, 200, input_len=20, output_len=10, range_ratio=0.5, seed=3)
    assert again == ranged


def test_unloadable_tokenizer_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(BenchError, match="--tokenizer"):
        load_tokenizer(str(tmp_path))


# --- end to end ---------------------------------------------------------------


class FakeOpenAIServer:
    """Streams ``max_tokens`` words " w0 w1 ..." per request, over real HTTP.

    ``tokens_per_chunk`` packs several tokens into one SSE event, so a client
    that counts chunks instead of reading usage gets the wrong answer.  Every
    stream opens with an empty-text event (like a chat role chunk), packs two
    events into one write and splits another across two writes.  The request
    that arrives ``fail_nth`` (1-based) gets HTTP 500.
    """

    def __init__(self, model_id: str, usage: bool, tokens_per_chunk: int, fail_nth: int = 0):
        self.model_id = model_id
        self.usage = usage
        self.tokens_per_chunk = tokens_per_chunk
        self.fail_nth = fail_nth
        self.bodies: list[dict[str, Any]] = []
        self.failed_bodies: list[dict[str, Any]] = []
        self.in_flight = 0
        self.peak_in_flight = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.complete)
        app.router.add_post("/v1/chat/completions", self.complete)
        return app

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": self.model_id}]})

    async def complete(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.bodies.append(body)
        if len(self.bodies) == self.fail_nth:
            self.failed_bodies.append(body)
            return web.Response(status=500, text="boom")
        chat = request.path == "/v1/chat/completions"
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            words = [f" w{i}" for i in range(body["max_tokens"])]
            step = self.tokens_per_chunk
            events = [self._event(chat, "")]
            events += [self._event(chat, "".join(words[i:i + step])) for i in range(0, len(words), step)]
            if self.usage and body.get("stream_options", {}).get("include_usage"):
                prompt_tokens = len(body["prompt"]) if "prompt" in body else 0
                usage = {"prompt_tokens": prompt_tokens, "completion_tokens": len(words)}
                events.append(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
            events.append(b"data: [DONE]\n\n")
            await response.write(events[0] + events[1])  # two events in one write
            half = len(events[2]) // 2
            await response.write(events[2][:half])  # one event split across writes
            await asyncio.sleep(0.002)
            await response.write(events[2][half:])
            for event in events[3:]:
                await asyncio.sleep(0.002)
                await response.write(event)
            await response.write_eof()
            return response
        finally:
            self.in_flight -= 1

    @staticmethod
    def _event(chat: bool, text: str) -> bytes:
        choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
        return f"data: {json.dumps({'choices': [choice]})}\n\n".encode()


@contextmanager
def serving(server: FakeOpenAIServer) -> Iterator[str]:
    """Run ``server`` on 127.0.0.1 in its own thread and event loop; yields its base URL.

    A separate loop lets the synchronous CLI entry point (which calls
    asyncio.run itself) be tested against it too.
    """
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    runner = web.AppRunner(server.app())

    async def start() -> str:
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        return f"http://{host}:{port}"

    try:
        yield asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_completions_end_to_end(tokenizer_dir: Path) -> None:
    server = FakeOpenAIServer(str(tokenizer_dir), usage=True, tokens_per_chunk=2, fail_nth=3)
    with serving(server) as url:
        config = BenchConfig(base_url=url, num_prompts=8, input_len=16, output_len=8,
                             range_ratio=0.25, max_concurrency=2, disable_tqdm=True)
        result = asyncio.run(benchmark(config))

    # Model and tokenizer default to the server's first model id, a local dir.
    assert result.model == result.tokenizer == str(tokenizer_dir)
    assert len(server.bodies) == 8 and server.peak_in_flight <= 2
    for body in server.bodies:
        assert body["model"] == str(tokenizer_dir)
        assert all(isinstance(t, int) and 3 <= t < 3 + WORDS for t in body["prompt"])
        assert 12 <= len(body["prompt"]) <= 20 and 6 <= body["max_tokens"] <= 10
        assert body["ignore_eos"] is True and body["temperature"] == 0.0
        assert body["stream"] is True and body["stream_options"] == {"include_usage": True}

    m = result.metrics
    served = [b for b in server.bodies if b not in server.failed_bodies]
    assert (m.completed, m.failed) == (7, 1)
    assert m.total_input_tokens == sum(len(b["prompt"]) for b in served)
    assert m.total_output_tokens == sum(b["max_tokens"] for b in served)
    assert [r.error for r in result.requests if not r.success] == ["HTTP 500: boom"]
    for r in (r for r in result.requests if r.success):
        words = r.generated_text.split()
        assert words == [f"w{i}" for i in range(r.output_tokens)]  # usage count matches text
        assert len(r.itl) == math.ceil(r.output_tokens / 2) - 1  # one gap per 2-token chunk
        assert 0 < r.ttft <= r.latency
        assert r.latency - r.ttft == pytest.approx(sum(r.itl))
    assert m.tpot.mean_ms > 0 and m.itl.p99_ms > 0
    json.dumps(result.to_json(), allow_nan=False)  # strict JSON, inf rate included


def test_chat_cli_end_to_end_counts_chunks_without_usage(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = FakeOpenAIServer("served-name", usage=False, tokens_per_chunk=1)
    out = tmp_path / "result.json"
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with serving(server) as url:
        args = parser.parse_args([
            "--base-url", url, "--endpoint", CHAT_COMPLETIONS, "--tokenizer", str(tokenizer_dir),
            "--num-prompts", "4", "--input-len", "6", "--output-len", "5",
            "--request-rate", "200", "--seed", "1", "--json", str(out), "--disable-tqdm",
        ])
        result = run(args)

    assert [b["model"] for b in server.bodies] == ["served-name"] * 4
    for body in server.bodies:
        (message,) = body["messages"]
        assert message["role"] == "user" and len(message["content"].split()) == 6
        assert body["max_tokens"] == 5 and body["ignore_eos"] is True
    assert all(r.success and r.output_tokens == 5 and len(r.itl) == 4 for r in result.requests)
    assert result.metrics.total_output_tokens == 20

    report = capsys.readouterr().out
    assert "Serving Benchmark Result" in report and "P99 TPOT (ms):" in report
    saved = json.loads(out.read_text())
    assert saved["completed"] == 4 and saved["request_rate"] == 200.0
    assert saved["endpoint"] == CHAT_COMPLETIONS and saved["output_lens"] == [5] * 4
    assert len(saved["itls"]) == 4 and "p90_e2el_ms" in saved and "api_key" not in saved


def test_a_successful_bench_exits_0(tokenizer_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`remp bench serve` (any benchmark returning its result) exits 0, the report on stdout only."""
    from remp.cli import main

    with serving(FakeOpenAIServer("served-name", usage=True, tokens_per_chunk=1)) as url, \
            pytest.raises(SystemExit) as exit_:
        main(["bench", "serve", "--base-url", url, "--tokenizer", str(tokenizer_dir), "--num-prompts", "2",
              "--input-len", "4", "--output-len", "3", "--disable-tqdm"])
    assert exit_.value.code == 0
    captured = capsys.readouterr()
    assert "Serving Benchmark Result" in captured.out and "BenchResult" not in captured.err


def test_remote_model_id_without_tokenizer_fails_clearly(tokenizer_dir: Path) -> None:
    server = FakeOpenAIServer("org/some-model", usage=True, tokens_per_chunk=1)
    with serving(server) as url:
        with pytest.raises(BenchError, match="pass --tokenizer"):
            asyncio.run(benchmark(BenchConfig(base_url=url, num_prompts=1, disable_tqdm=True)))
    assert server.bodies == []


def _cli(url: str, tokenizer_dir: Path, json_path: Path, *options: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args([
        "--base-url", url, "--tokenizer", str(tokenizer_dir), "--json", str(json_path),
        "--disable-tqdm", *options,
    ])


def test_rate_schedule_cli_end_to_end_with_goodput(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = FakeOpenAIServer("served-name", usage=True, tokens_per_chunk=1)
    out = tmp_path / "result.json"
    schedule = "150:0.2,0:0.1,100:0.2"
    expected = schedule_arrivals(parse_rate_schedule(schedule), input_len=6, output_len=4, seed=2)
    with serving(server) as url:
        result = run(_cli(url, tokenizer_dir, out, "--rate-schedule", schedule, "--seed", "2",
                          "--input-len", "6", "--output-len", "4",
                          "--goodput", "ttft:60000", "--slo-tpot-ms", "60000"))

    assert len(server.bodies) == len(result.requests) == len(expected) > 20
    assert all(len(b["prompt"]) == 6 and b["max_tokens"] == 4 for b in server.bodies)
    saved = json.loads(out.read_text())
    offsets = saved["start_offsets"]
    assert offsets == sorted(offsets) and len(offsets) == len(expected)
    # Never sent before its scheduled arrival; nothing scheduled in the idle 0.2-0.3 s.
    assert all(sent >= item.arrival_s - 1e-3 for sent, item in zip(offsets, expected))
    assert not any(0.2 <= item.arrival_s < 0.3 for item in expected)
    assert saved["rate_schedule"] == [[150.0, 0.2], [0.0, 0.1], [100.0, 0.2]]
    assert saved["goodput"] == {"ttft": 60000.0, "tpot": 60000.0}
    assert saved["slo_attainment"] == 1.0
    assert saved["request_goodput"] == pytest.approx(saved["request_throughput"])
    report = capsys.readouterr().out
    assert "Workload: rate schedule '150:0.2,0:0.1,100:0.2'" in report
    assert "Request goodput (req/s):" in report and "Requests within SLOs (%):" in report


def test_trace_cli_end_to_end(
    tokenizer_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    server = FakeOpenAIServer("served-name", usage=True, tokens_per_chunk=2)
    out = tmp_path / "result.json"
    expected = load_trace(sample_trace_path(), time_scale=100.0, length_scale=0.02, start_s=5.0,
                          duration_s=30.0, max_input_len=12, max_output_len=6, max_requests=15)
    with serving(server) as url:
        result = run(_cli(url, tokenizer_dir, out, "--trace", sample_trace_path(),
                          "--trace-time-scale", "100", "--trace-length-scale", "0.02",
                          "--trace-start", "5", "--trace-duration", "30",
                          "--trace-max-input-len", "12", "--trace-max-output-len", "6",
                          "--num-prompts", "15"))

    assert len(expected) == 15 and len(server.bodies) == 15
    assert all(r.success for r in result.requests)
    assert [(r.prompt_len, r.output_tokens) for r in result.requests] == [
        (i.input_len, i.output_len) for i in expected]
    saved = json.loads(out.read_text())
    assert saved["num_prompts"] == 15 and saved["trace_time_scale"] == 100.0
    assert saved["request_goodput"] is None
    assert all(sent >= item.arrival_s - 1e-3 for sent, item in zip(saved["start_offsets"], expected))
    report = capsys.readouterr().out
    assert "Workload: trace " in report and "time scale 100 (replayed 100x as fast)" in report
    assert "length scale 0.02, input clipped to 12, output clipped to 6" in report
    assert "original time 5 s to 35 s" in report
