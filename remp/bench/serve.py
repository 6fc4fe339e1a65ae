"""`remp bench serve`: an online-serving load generator modelled on `vllm bench serve`.

It measures a running OpenAI-compatible server from the outside, the way a
client sees it: requests arrive on a Poisson (or gamma) schedule, every
response streams, and each request records time to first token, the gaps
between streamed chunks and its end-to-end latency.  Metric names and
definitions follow vLLM's so numbers can be compared with vLLM runs directly.

Prompts are synthetic ("random" dataset): token ids drawn from the tokenizer's
vocabulary and sent as a token-id prompt, so the server sees exactly the
requested input length instead of whatever a decode/re-encode round trip
would give.  Output length is forced with ``max_tokens`` plus ``ignore_eos``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT_COMPLETIONS)

# A long benchmark at a high rate can queue requests for a long time; like
# vLLM, only give up on a request after hours, never because the server is busy.
REQUEST_TIMEOUT_S = 6 * 60 * 60

_LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")


class BenchError(RuntimeError):
    """The benchmark cannot run: bad options, unreachable server or unusable tokenizer."""


@dataclass
class BenchConfig:
    """Everything that defines one benchmark run (defaults match `vllm bench serve`)."""

    base_url: str = "http://127.0.0.1:8000"
    model: str | None = None  # None: the first id the server lists at /v1/models
    endpoint: str = COMPLETIONS
    api_key: str | None = None
    request_rate: float = math.inf  # requests per second; inf sends everything at once
    burstiness: float = 1.0  # gamma shape of inter-arrival gaps; 1.0 is Poisson
    num_prompts: int = 1000
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0  # lengths drawn uniformly from [len*(1-r), len*(1+r)]
    seed: int = 0
    max_concurrency: int | None = None
    tokenizer: str | None = None  # None: the model id, if it is a local directory
    disable_tqdm: bool = False


@dataclass
class SampleRequest:
    """One synthetic request: the exact prompt token ids and the forced output length."""

    prompt_ids: list[int]
    output_len: int


@dataclass
class RequestRecord:
    """What one streamed request measured.  Times are seconds from sending it."""

    prompt_len: int  # usage.prompt_tokens when the server reports it, else tokens sent
    success: bool = False
    error: str = ""
    ttft: float = 0.0  # arrival of the first chunk carrying generated text
    itl: list[float] = field(default_factory=list)  # gaps between later text chunks
    latency: float = 0.0  # arrival of the last text chunk
    output_tokens: int = 0  # usage.completion_tokens, else the number of text chunks
    generated_text: str = ""


@dataclass
class LatencyStats:
    """Summary of one latency distribution, in milliseconds."""

    mean_ms: float
    median_ms: float
    std_ms: float
    p90_ms: float
    p99_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        """Summarise ``seconds``; an empty sample (e.g. every request failed) gives zeros."""
        if not seconds:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0)
        ms = np.asarray(seconds, dtype=np.float64) * 1000.0
        return cls(
            mean_ms=float(np.mean(ms)),
            median_ms=float(np.median(ms)),
            std_ms=float(np.std(ms)),
            p90_ms=float(np.percentile(ms, 90)),
            p99_ms=float(np.percentile(ms, 99)),
        )


@dataclass
class Metrics:
    """Aggregates over a run; token counts and latencies cover successful requests only."""

    completed: int
    failed: int
    duration_s: float
    total_input_tokens: int
    total_output_tokens: int
    request_throughput: float  # successful requests per second
    output_throughput: float  # generated tokens per second
    total_token_throughput: float  # (input + generated) tokens per second
    ttft: LatencyStats
    tpot: LatencyStats  # (e2e - ttft) / (output_tokens - 1), requests with > 1 token
    itl: LatencyStats  # every chunk gap of every request, pooled
    e2el: LatencyStats


@dataclass
class BenchResult:
    """A finished run: its configuration, what it resolved, the aggregates and every request."""

    config: BenchConfig
    model: str
    tokenizer: str
    metrics: Metrics
    requests: list[RequestRecord]
    date: str

    def to_json(self) -> dict[str, Any]:
        """Flat, strict-JSON dict in the layout of vLLM's ``--save-result`` files.

        Aggregates are in ms (``mean_ttft_ms`` ...); the per-request arrays
        (``ttfts``, ``itls``, ``e2els``) are in seconds, as vLLM writes them.
        The API key is left out so result files can be shared.
        """
        cfg, m = self.config, self.metrics
        out: dict[str, Any] = {
            "date": self.date,
            "base_url": cfg.base_url,
            "endpoint": cfg.endpoint,
            "model_id": self.model,
            "tokenizer_id": self.tokenizer,
            "num_prompts": cfg.num_prompts,
            "input_len": cfg.input_len,
            "output_len": cfg.output_len,
            "range_ratio": cfg.range_ratio,
            "seed": cfg.seed,
            "request_rate": cfg.request_rate if math.isfinite(cfg.request_rate) else "inf",
            "burstiness": cfg.burstiness,
            "max_concurrency": cfg.max_concurrency,
            "duration": m.duration_s,
            "completed": m.completed,
            "failed": m.failed,
            "total_input_tokens": m.total_input_tokens,
            "total_output_tokens": m.total_output_tokens,
            "request_throughput": m.request_throughput,
            "output_throughput": m.output_throughput,
            "total_token_throughput": m.total_token_throughput,
        }
        for name in _LATENCY_METRICS:
            stats: LatencyStats = getattr(m, name)
            for stat in ("mean", "median", "std", "p90", "p99"):
                out[f"{stat}_{name}_ms"] = getattr(stats, f"{stat}_ms")
        out.update(
            input_lens=[r.prompt_len for r in self.requests],
            output_lens=[r.output_tokens for r in self.requests],
            ttfts=[r.ttft for r in self.requests],
            itls=[r.itl for r in self.requests],
            e2els=[r.latency for r in self.requests],
            generated_texts=[r.generated_text for r in self.requests],
            errors=[r.error for r in self.requests],
        )
        return out


def arrival_offsets(num: int, rate: float, burstiness: float, seed: int) -> np.ndarray:
    """Send time of each request in seconds after the start, the first at 0.

    Gaps are gamma distributed with shape ``burstiness`` and scale
    ``1 / (rate * burstiness)``, so the mean gap is always ``1 / rate`` while
    the variance, ``1 / (rate**2 * burstiness)``, grows as burstiness drops;
    shape 1 is the exponential gap of a Poisson process.  An infinite rate
    sends everything at once.
    """
    if math.isinf(rate):
        return np.zeros(num)
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=max(num - 1, 0))
    return np.concatenate(([0.0], np.cumsum(gaps)))[:num]


def sample_random_requests(
    tokenizer: PreTrainedTokenizerBase,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float,
    seed: int,
) -> list[SampleRequest]:
    """Seeded synthetic prompts of uniformly random tokens, like vLLM's random dataset.

    Special and added tokens are never drawn: a stray end-of-text or chat
    marker in the middle of a prompt would change what the model is asked to do.
    """
    rng = np.random.default_rng(seed)
    vocab = _sampleable_ids(tokenizer)
    input_lens = _draw_lengths(rng, input_len, range_ratio, num_prompts)
    output_lens = _draw_lengths(rng, output_len, range_ratio, num_prompts)
    return [
        SampleRequest(prompt_ids=rng.choice(vocab, size=int(n)).tolist(), output_len=int(m))
        for n, m in zip(input_lens, output_lens)
    ]


def _sampleable_ids(tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """Ids of the tokenizer's ordinary vocabulary (no special or added tokens)."""
    excluded = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    ids = sorted(set(tokenizer.get_vocab().values()) - excluded)
    if not ids:
        raise BenchError("the tokenizer has no ordinary (non-special) tokens to build prompts from")
    return np.asarray(ids, dtype=np.int64)


def _draw_lengths(rng: np.random.Generator, length: int, ratio: float, num: int) -> np.ndarray:
    """``num`` lengths uniform on [floor(length*(1-ratio)), ceil(length*(1+ratio))], at least 1."""
    low = max(1, math.floor(length * (1 - ratio)))
    high = max(low, math.ceil(length * (1 + ratio)))
    return rng.integers(low, high + 1, size=num)


def compute_metrics(records: Sequence[RequestRecord], duration_s: float) -> Metrics:
    """Aggregate per-request records the way vLLM's ``calculate_metrics`` does."""
    ok = [r for r in records if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return Metrics(
        completed=len(ok),
        failed=len(records) - len(ok),
        duration_s=duration_s,
        total_input_tokens=total_input,
        total_output_tokens=total_output,
        request_throughput=len(ok) / duration_s,
        output_throughput=total_output / duration_s,
        total_token_throughput=(total_input + total_output) / duration_s,
        ttft=LatencyStats.of([r.ttft for r in ok]),
        tpot=LatencyStats.of(tpots),
        itl=LatencyStats.of([gap for r in ok for gap in r.itl]),
        e2el=LatencyStats.of([r.latency for r in ok]),
    )


async def _sse_data(content: aiohttp.StreamReader) -> AsyncIterator[tuple[float, str]]:
    """Yield (arrival time, payload) for every ``data:`` line of a server-sent event stream.

    Reads raw network chunks and splits lines itself rather than using
    ``readline``, which fails on lines longer than aiohttp's buffer limit.
    The timestamp is when the chunk holding the line arrived.
    """
    buffer = b""
    async for chunk in content.iter_any():
        now = time.perf_counter()
        *lines, buffer = (buffer + chunk).split(b"\n")
        for line in lines:
            line = line.strip()
            if line.startswith(b"data:"):
                yield now, line[5:].strip().decode()
    line = buffer.strip()
    if line.startswith(b"data:"):
        yield time.perf_counter(), line[5:].strip().decode()


def _chunk_text(endpoint: str, event: dict[str, Any]) -> str:
    """Generated text carried by one streamed event ('' for role, usage or empty chunks)."""
    choices = event.get("choices") or []
    if not choices:
        return ""
    if endpoint == CHAT_COMPLETIONS:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def send_request(
    session: aiohttp.ClientSession,
    url: str,
    endpoint: str,
    payload: dict[str, Any],
    prompt_len: int,
) -> RequestRecord:
    """Send one streaming request and time it; failures are recorded, never raised.

    TTFT is the first chunk with non-empty text (a leading role-only chat
    chunk is not a token).  ITLs are gaps between text chunks, so a chunk
    carrying several tokens counts as one gap, as in vLLM.
    """
    record = RequestRecord(prompt_len=prompt_len)
    parts: list[str] = []
    usage_tokens: int | None = None
    start = last = time.perf_counter()
    try:
        async with session.post(url, json=payload) as response:
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.text())[:500]}"
                return record
            async for now, data in _sse_data(response.content):
                if data == "[DONE]":
                    break
                event = json.loads(data)
                if event.get("error"):
                    record.error = f"stream error: {json.dumps(event['error'])[:500]}"
                    return record
                usage = event.get("usage") or {}
                if usage.get("completion_tokens") is not None:
                    usage_tokens = int(usage["completion_tokens"])
                if usage.get("prompt_tokens") is not None:
                    record.prompt_len = int(usage["prompt_tokens"])
                text = _chunk_text(endpoint, event)
                if not text:
                    continue
                if parts:
                    record.itl.append(now - last)
                else:
                    record.ttft = now - start
                last = now
                parts.append(text)
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        record.error = f"{type(exc).__name__}: {exc}"
        return record
    if not parts:
        record.error = "the stream ended without any generated text"
        return record
    record.success = True
    record.latency = last - start
    record.output_tokens = usage_tokens if usage_tokens is not None else len(parts)
    record.generated_text = "".join(parts)
    return record


def build_payload(
    config: BenchConfig, model: str, tokenizer: PreTrainedTokenizerBase, sample: SampleRequest
) -> dict[str, Any]:
    """The body for ``sample``: greedy, exactly ``output_len`` tokens, streamed with usage."""
    body: dict[str, Any] = {
        "model": model,
        "max_tokens": sample.output_len,
        "temperature": 0.0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if config.endpoint == CHAT_COMPLETIONS:
        body["messages"] = [{"role": "user", "content": tokenizer.decode(sample.prompt_ids)}]
    else:
        body["prompt"] = sample.prompt_ids
    return body


def load_tokenizer(path: str) -> PreTrainedTokenizerBase:
    """Load the HF tokenizer at ``path``, turning any failure into a clear BenchError."""
    try:
        return AutoTokenizer.from_pretrained(path)
    # transformers reports a missing or malformed tokenizer with many exception
    # types; whichever it is, the user needs the path and the reason.
    except Exception as exc:  # noqa: BLE001
        raise BenchError(
            f"cannot load a tokenizer from {path!r} ({type(exc).__name__}: {exc}); "
            "pass --tokenizer with the path of a Hugging Face tokenizer directory"
        ) from exc


async def _first_model(session: aiohttp.ClientSession, base_url: str) -> str:
    """The first model id the server lists, used when --model is not given."""
    url = f"{base_url}/v1/models"
    try:
        async with session.get(url) as response:
            if response.status != 200:
                body = await response.text()
                raise BenchError(f"GET {url} returned HTTP {response.status}: {body}")
            listing = await response.json()
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        raise BenchError(f"cannot list models at {url}: {type(exc).__name__}: {exc}") from exc
    models = listing.get("data") or []
    if not models:
        raise BenchError(f"{url} lists no models; pass --model")
    return str(models[0]["id"])


def _default_tokenizer(model: str) -> str:
    """The tokenizer path when --tokenizer is not given: the model id, if it is a local dir."""
    if os.path.isdir(model):
        return model
    raise BenchError(
        f"model id {model!r} is not a local directory, so its tokenizer cannot be found; "
        "pass --tokenizer with the path of its Hugging Face tokenizer directory"
    )


def _validate(config: BenchConfig) -> None:
    """Reject option values that would make the run meaningless, before touching the server."""
    if config.endpoint not in ENDPOINTS:
        choices = ", ".join(ENDPOINTS)
        raise BenchError(f"--endpoint must be one of {choices}, not {config.endpoint!r}")
    if config.num_prompts < 1 or config.input_len < 1 or config.output_len < 1:
        raise BenchError("--num-prompts, --input-len and --output-len must be at least 1")
    if not 0.0 <= config.range_ratio < 1.0:
        raise BenchError(f"--range-ratio must be in [0, 1), not {config.range_ratio}")
    if not config.request_rate > 0:
        raise BenchError(f"--request-rate must be positive (or inf), not {config.request_rate}")
    if not (config.burstiness > 0 and math.isfinite(config.burstiness)):
        raise BenchError(f"--burstiness must be a positive number, not {config.burstiness}")
    if config.max_concurrency is not None and config.max_concurrency < 1:
        raise BenchError(f"--max-concurrency must be at least 1, not {config.max_concurrency}")


async def _drive(
    session: aiohttp.ClientSession,
    url: str,
    config: BenchConfig,
    payloads: Sequence[dict[str, Any]],
    prompt_lens: Sequence[int],
    offsets: np.ndarray,
) -> tuple[list[RequestRecord], float]:
    """Release requests on their arrival schedule and wait for all; returns records and duration.

    Arrivals follow the schedule regardless of --max-concurrency: a request
    that arrives while the limit is reached waits for a slot, and its
    latencies count from when it is actually sent, as in vLLM.
    """
    limit = (
        asyncio.Semaphore(config.max_concurrency)
        if config.max_concurrency
        else contextlib.nullcontext()
    )
    progress = tqdm(total=len(payloads), disable=config.disable_tqdm)

    async def one(payload: dict[str, Any], prompt_len: int) -> RequestRecord:
        async with limit:
            record = await send_request(session, url, config.endpoint, payload, prompt_len)
        progress.update(1)
        return record

    start = time.perf_counter()
    tasks = []
    for payload, prompt_len, offset in zip(payloads, prompt_lens, offsets):
        delay = start + float(offset) - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(payload, prompt_len)))
    records = list(await asyncio.gather(*tasks))
    duration = time.perf_counter() - start
    progress.close()
    return records, duration


async def benchmark(config: BenchConfig) -> BenchResult:
    """Run one benchmark against ``config.base_url`` and return every measurement.

    Raises BenchError if the options are invalid, the server cannot be
    listed, or no tokenizer can be loaded; failed requests are counted, not raised.
    """
    _validate(config)
    base_url = config.base_url.rstrip("/")
    headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else {}
    async with aiohttp.ClientSession(
        headers=headers,
        timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S),
        connector=aiohttp.TCPConnector(limit=0),  # concurrency is limited by _drive, not the pool
    ) as session:
        model = config.model or await _first_model(session, base_url)
        tokenizer_path = config.tokenizer or _default_tokenizer(model)
        tokenizer = load_tokenizer(tokenizer_path)
        samples = sample_random_requests(
            tokenizer, config.num_prompts, config.input_len, config.output_len,
            config.range_ratio, config.seed,
        )
        # Build (and for chat, decode) every body before the clock starts.
        payloads = [build_payload(config, model, tokenizer, s) for s in samples]
        offsets = arrival_offsets(
            config.num_prompts, config.request_rate, config.burstiness, config.seed
        )
        date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        records, duration = await _drive(
            session, base_url + config.endpoint, config, payloads,
            [len(s.prompt_ids) for s in samples], offsets,
        )
    return BenchResult(
        config=config,
        model=model,
        tokenizer=tokenizer_path,
        metrics=compute_metrics(records, duration),
        requests=records,
        date=date,
    )


def format_report(result: BenchResult) -> str:
    """The "Serving Benchmark Result" table, laid out like vLLM's."""
    m = result.metrics
    lines = [f"{' Serving Benchmark Result ':=^50}"]

    def row(label: str, value: float | int | str) -> None:
        text = f"{value:.2f}" if isinstance(value, float) else str(value)
        lines.append(f"{label:<40} {text:<10}")

    row("Successful requests:", m.completed)
    row("Failed requests:", m.failed)
    if result.config.max_concurrency is not None:
        row("Maximum request concurrency:", result.config.max_concurrency)
    row("Benchmark duration (s):", m.duration_s)
    row("Total input tokens:", m.total_input_tokens)
    row("Total generated tokens:", m.total_output_tokens)
    row("Request throughput (req/s):", m.request_throughput)
    row("Output token throughput (tok/s):", m.output_throughput)
    row("Total token throughput (tok/s):", m.total_token_throughput)
    sections = (
        ("ttft", "TTFT", "Time to First Token"),
        ("tpot", "TPOT", "Time per Output Token (excl. 1st token)"),
        ("itl", "ITL", "Inter-token Latency"),
        ("e2el", "E2EL", "End-to-end Latency"),
    )
    for name, short, title in sections:
        stats: LatencyStats = getattr(m, name)
        lines.append(f"{title:-^50}")
        row(f"Mean {short} (ms):", stats.mean_ms)
        row(f"Median {short} (ms):", stats.median_ms)
        row(f"P90 {short} (ms):", stats.p90_ms)
        row(f"P99 {short} (ms):", stats.p99_ms)
    lines.append("=" * 50)
    first_error = next((r.error for r in result.requests if not r.success), None)
    if first_error:
        lines.append(f"First error: {first_error}")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Register the `remp bench serve` options on ``parser``."""
    d = BenchConfig()
    add = parser.add_argument
    add("--base-url", default=d.base_url, help="server root (default: %(default)s)")
    add("--model", help="model id to request (default: the first id from GET /v1/models)")
    add("--endpoint", default=d.endpoint, choices=ENDPOINTS, help="API (default: %(default)s)")
    add("--api-key", help="sent as 'Authorization: Bearer <key>'")
    add("--request-rate", type=float, default=d.request_rate,
        help="requests per second; inf sends all at once (default: %(default)s)")
    add("--burstiness", type=float, default=d.burstiness,
        help="gamma shape of arrival gaps: 1 is Poisson, lower is burstier (default: %(default)s)")
    add("--num-prompts", type=int, default=d.num_prompts, help="requests (default: %(default)s)")
    add("--input-len", type=int, default=d.input_len, help="prompt tokens (default: %(default)s)")
    add("--output-len", type=int, default=d.output_len, help="new tokens (default: %(default)s)")
    add("--range-ratio", type=float, default=d.range_ratio,
        help="draw lengths uniformly within +-ratio of the given ones (default: %(default)s)")
    add("--seed", type=int, default=d.seed, help="prompt and arrival seed (default: %(default)s)")
    add("--max-concurrency", type=int, help="most requests in flight at once (default: no limit)")
    add("--json", dest="json_path", metavar="PATH",
        help="write the results, config and per-request records as JSON")
    add("--tokenizer", help="HF tokenizer directory (default: the model id, if a local directory)")
    add("--disable-tqdm", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> BenchResult:
    """Run `remp bench serve` from parsed arguments: benchmark, print the table, write --json."""
    config = BenchConfig(
        base_url=args.base_url,
        model=args.model,
        endpoint=args.endpoint,
        api_key=args.api_key,
        request_rate=args.request_rate,
        burstiness=args.burstiness,
        num_prompts=args.num_prompts,
        input_len=args.input_len,
        output_len=args.output_len,
        range_ratio=args.range_ratio,
        seed=args.seed,
        max_concurrency=args.max_concurrency,
        tokenizer=args.tokenizer,
        disable_tqdm=args.disable_tqdm,
    )
    print(f"Traffic request rate: {config.request_rate}", file=sys.stderr)
    print(f"Burstiness factor: {config.burstiness}", file=sys.stderr)
    print(f"Maximum request concurrency: {config.max_concurrency}", file=sys.stderr)
    try:
        result = asyncio.run(benchmark(config))
    except BenchError as exc:
        raise SystemExit(f"remp bench serve: {exc}") from exc
    print(format_report(result))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(result.to_json(), f, allow_nan=False)
    return result
