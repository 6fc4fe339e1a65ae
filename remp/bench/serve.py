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

Instead of a steady rate, ``--trace`` replays the arrivals and lengths of a
recorded trace (Azure LLM inference trace, BurstGPT, JSONL) and
``--rate-schedule`` follows a piecewise-constant or day-shaped rate; see
``remp.bench.workload``.  ``--goodput`` / ``--slo-ttft-ms`` / ``--slo-tpot-ms``
add vLLM's goodput: requests per second that met every latency objective.
What each request records and how runs are aggregated is ``remp.bench.metrics``,
which the simulator shares.
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

from remp.bench.metrics import GOODPUT_METRICS, LatencyStats, Metrics, RequestRecord, compute_metrics
from remp.bench.workload import (
    RATE_SCHEDULE_FORMS,
    WorkItem,
    draw_lengths,
    load_trace,
    parse_rate_schedule,
    schedule_arrivals,
)

COMPLETIONS = "/v1/completions"
CHAT_COMPLETIONS = "/v1/chat/completions"
ENDPOINTS = (COMPLETIONS, CHAT_COMPLETIONS)

# A long benchmark at a high rate can queue requests for a long time; like
# vLLM, only give up on a request after hours, never because the server is busy.
REQUEST_TIMEOUT_S = 6 * 60 * 60

_LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
DEFAULT_NUM_PROMPTS = 1000  # requests of a random-dataset run when --num-prompts is not given


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
    # Random dataset: how many requests (None: DEFAULT_NUM_PROMPTS).  Trace or
    # rate schedule: at most this many of its requests (None: all of them).
    num_prompts: int | None = None
    input_len: int = 1024
    output_len: int = 128
    range_ratio: float = 0.0  # lengths drawn uniformly from [len*(1-r), len*(1+r)]
    seed: int = 0
    max_concurrency: int | None = None
    tokenizer: str | None = None  # None: the model id, if it is a local directory
    disable_tqdm: bool = False
    trace: str | None = None  # replay this trace's arrivals and lengths instead
    trace_time_scale: float = 1.0  # 2 replays the trace twice as fast
    trace_length_scale: float = 1.0  # multiplies every prompt and output length
    trace_start: float = 0.0  # window of the original trace time, in seconds
    trace_duration: float | None = None
    trace_max_input_len: int | None = None
    trace_max_output_len: int | None = None
    rate_schedule: str | None = None  # "RATE:SECONDS,..." or a named shape (workload.RATE_SCHEDULE_FORMS)
    # --rate-schedule output lengths: lognormal with mean output_len and this log-space standard
    # deviation (0: uniform within range_ratio), capped at output_cap.
    output_tail: float = 0.0
    output_cap: int | None = None
    goodput: dict[str, float] = field(default_factory=dict)  # SLO in ms per GOODPUT_METRICS key


@dataclass
class SampleRequest:
    """One synthetic request: the exact prompt token ids and the forced output length."""

    prompt_ids: list[int]
    output_len: int


@dataclass
class BenchResult:
    """A finished run: its configuration, what it resolved, the aggregates and every request."""

    config: BenchConfig
    model: str
    tokenizer: str
    metrics: Metrics
    requests: list[RequestRecord]
    date: str
    workload: str  # what was sent and how a trace was scaled, in words

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
            "workload": self.workload,
            "trace": cfg.trace,
            "trace_time_scale": cfg.trace_time_scale,
            "trace_length_scale": cfg.trace_length_scale,
            "trace_start": cfg.trace_start,
            "trace_duration": cfg.trace_duration,
            "trace_max_input_len": cfg.trace_max_input_len,
            "trace_max_output_len": cfg.trace_max_output_len,
            "rate_schedule": (
                parse_rate_schedule(cfg.rate_schedule) if cfg.rate_schedule else None
            ),
            "output_tail": cfg.output_tail,
            "output_cap": cfg.output_cap,
            "goodput": cfg.goodput or None,
            "num_prompts": len(self.requests),
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
            "request_goodput": m.request_goodput,
            "slo_attainment": m.slo_attainment,
            "output_throughput": m.output_throughput,
            "total_token_throughput": m.total_token_throughput,
        }
        for name in _LATENCY_METRICS:
            stats: LatencyStats = getattr(m, name)
            for stat in ("mean", "median", "std", "p90", "p99"):
                out[f"{stat}_{name}_ms"] = getattr(stats, f"{stat}_ms")
        out.update(
            start_offsets=[r.start_offset for r in self.requests],
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
    input_lens = draw_lengths(rng, input_len, range_ratio, num_prompts)
    output_lens = draw_lengths(rng, output_len, range_ratio, num_prompts)
    return _random_prompts(rng, vocab, input_lens, output_lens)


def _random_prompts(
    rng: np.random.Generator,
    vocab: np.ndarray,
    input_lens: Sequence[int],
    output_lens: Sequence[int],
) -> list[SampleRequest]:
    """One prompt of ``n`` uniformly drawn ``vocab`` ids per (n, output length) pair."""
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


def parse_goodput(items: Sequence[str]) -> dict[str, float]:
    """vLLM's ``--goodput`` values, e.g. ``["ttft:500", "tpot:50"]``, as {metric: ms}."""
    slos: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition(":")
        try:
            slos[name.strip().lower()] = float(value)
        except ValueError:
            raise BenchError(
                f"--goodput takes KEY:VALUE pairs in ms, e.g. ttft:500 tpot:50; not {item!r}"
            ) from None
    return slos


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
    if config.num_prompts is not None and config.num_prompts < 1:
        raise BenchError(f"--num-prompts must be at least 1, not {config.num_prompts}")
    if config.input_len < 1 or config.output_len < 1:
        raise BenchError("--input-len and --output-len must be at least 1")
    if config.trace and config.rate_schedule:
        raise BenchError("--trace and --rate-schedule are alternatives; give one")
    if not 0.0 <= config.range_ratio < 1.0:
        raise BenchError(f"--range-ratio must be in [0, 1), not {config.range_ratio}")
    if not config.request_rate > 0:
        raise BenchError(f"--request-rate must be positive (or inf), not {config.request_rate}")
    if not (config.burstiness > 0 and math.isfinite(config.burstiness)):
        raise BenchError(f"--burstiness must be a positive number, not {config.burstiness}")
    if config.max_concurrency is not None and config.max_concurrency < 1:
        raise BenchError(f"--max-concurrency must be at least 1, not {config.max_concurrency}")
    if (config.output_tail or config.output_cap is not None) and not config.rate_schedule:
        raise BenchError("--output-tail and --output-cap shape --rate-schedule requests; give one")
    if not (config.output_tail >= 0 and math.isfinite(config.output_tail)):
        raise BenchError(f"--output-tail must be a number >= 0, not {config.output_tail}")
    if config.output_cap is not None and config.output_cap < 1:
        raise BenchError(f"--output-cap must be at least 1, not {config.output_cap}")
    for name, slo in config.goodput.items():
        if name not in GOODPUT_METRICS:
            choices = ", ".join(GOODPUT_METRICS)
            raise BenchError(f"--goodput metric must be one of {choices}, not {name!r}")
        if not (slo > 0 and math.isfinite(slo)):
            raise BenchError(f"--goodput {name} must be a positive number of ms, not {slo}")


def load_workload(config: BenchConfig) -> list[WorkItem] | None:
    """The requests of a --trace or --rate-schedule run, at most --num-prompts of them.

    None for the steady random dataset.  Called before the server is contacted,
    so a bad trace file or schedule fails at once.
    """
    try:
        if config.trace:
            return load_trace(
                config.trace,
                time_scale=config.trace_time_scale,
                length_scale=config.trace_length_scale,
                max_input_len=config.trace_max_input_len,
                max_output_len=config.trace_max_output_len,
                start_s=config.trace_start,
                duration_s=config.trace_duration,
                max_requests=config.num_prompts,
            )
        if config.rate_schedule:
            items = schedule_arrivals(
                parse_rate_schedule(config.rate_schedule),
                input_len=config.input_len,
                output_len=config.output_len,
                range_ratio=config.range_ratio,
                burstiness=config.burstiness,
                seed=config.seed,
                output_tail=config.output_tail,
                output_cap=config.output_cap,
            )
            if not items:
                raise ValueError(f"rate schedule {config.rate_schedule!r} produced no arrivals")
            return items[: config.num_prompts]
    except (OSError, ValueError) as exc:
        raise BenchError(str(exc)) from exc
    return None


def describe_workload(config: BenchConfig, items: Sequence[WorkItem] | None) -> str:
    """One line saying what is sent, including how a trace was windowed and scaled."""
    if items is None:
        return (
            f"random: {config.num_prompts or DEFAULT_NUM_PROMPTS} requests at "
            f"{config.request_rate} req/s (burstiness {config.burstiness}), "
            f"input {config.input_len} / output {config.output_len} tokens, "
            f"range ratio {config.range_ratio}"
        )
    span = items[-1].arrival_s
    sent = (
        f"{len(items)} requests over {span:.1f} s"
        f" (mean {len(items) / span if span else math.inf:.2f} req/s), mean input "
        f"{np.mean([i.input_len for i in items]):.0f} / output "
        f"{np.mean([i.output_len for i in items]):.0f} tokens"
    )
    if config.rate_schedule:
        lengths = (f"lognormal outputs (sigma {config.output_tail:g}, cap {config.output_cap}, longest "
                   f"{max(i.output_len for i in items)})" if config.output_tail
                   else f"range ratio {config.range_ratio}")
        return f"rate schedule {config.rate_schedule!r}: {sent}, burstiness {config.burstiness}, {lengths}"
    duration = config.trace_duration
    end = "the end" if duration is None else f"{config.trace_start + duration:g} s"
    limits = (("input", config.trace_max_input_len), ("output", config.trace_max_output_len))
    clip = "".join(f", {what} clipped to {limit}" for what, limit in limits if limit is not None)
    return (
        f"trace {config.trace}: {sent}; original time {config.trace_start:g} s to {end}, "
        f"time scale {config.trace_time_scale:g} (replayed {config.trace_time_scale:g}x as fast), "
        f"length scale {config.trace_length_scale:g}{clip}"
    )


def _prepare(
    config: BenchConfig, tokenizer: PreTrainedTokenizerBase, items: Sequence[WorkItem] | None
) -> tuple[list[SampleRequest], np.ndarray]:
    """Prompts and send offsets: each item's lengths, or the random dataset at a steady rate."""
    if items is None:
        num = config.num_prompts or DEFAULT_NUM_PROMPTS
        samples = sample_random_requests(
            tokenizer, num, config.input_len, config.output_len, config.range_ratio, config.seed
        )
        return samples, arrival_offsets(num, config.request_rate, config.burstiness, config.seed)
    samples = _random_prompts(
        np.random.default_rng(config.seed), _sampleable_ids(tokenizer),
        [i.input_len for i in items], [i.output_len for i in items],
    )
    return samples, np.array([i.arrival_s for i in items])


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
            sent = time.perf_counter() - start
            record = await send_request(session, url, config.endpoint, payload, prompt_len)
        record.start_offset = sent
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
    items = load_workload(config)
    workload = describe_workload(config, items)
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
        samples, offsets = _prepare(config, tokenizer, items)
        # Build (and for chat, decode) every body before the clock starts.
        payloads = [build_payload(config, model, tokenizer, s) for s in samples]
        date = datetime.now(timezone.utc).isoformat(timespec="seconds")
        records, duration = await _drive(
            session, base_url + config.endpoint, config, payloads,
            [len(s.prompt_ids) for s in samples], offsets,
        )
    return BenchResult(
        config=config,
        model=model,
        tokenizer=tokenizer_path,
        metrics=compute_metrics(records, duration, config.goodput),
        requests=records,
        date=date,
        workload=workload,
    )


def format_report(result: BenchResult) -> str:
    """The "Serving Benchmark Result" table, laid out like vLLM's."""
    m = result.metrics
    lines = [f"{' Serving Benchmark Result ':=^50}", f"Workload: {result.workload}"]

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
    if m.request_goodput is not None and m.slo_attainment is not None:
        slos = ", ".join(f"{name} <= {ms:g} ms" for name, ms in result.config.goodput.items())
        row("Request goodput (req/s):", m.request_goodput)
        row("Requests within SLOs (%):", 100.0 * m.slo_attainment)
        row("SLOs:", slos)
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
        help="requests per second; inf sends all at once; unused with --trace or --rate-schedule "
        "(default: %(default)s)")
    add("--burstiness", type=float, default=d.burstiness,
        help="gamma shape of arrival gaps: 1 is Poisson, lower is burstier; also shapes "
        "--rate-schedule arrivals (default: %(default)s)")
    add("--num-prompts", type=int,
        help=f"requests (default: {DEFAULT_NUM_PROMPTS}); with --trace or --rate-schedule, "
        "the most to send (default: all)")
    add("--input-len", type=int, default=d.input_len,
        help="prompt tokens, also of --rate-schedule requests (default: %(default)s)")
    add("--output-len", type=int, default=d.output_len,
        help="new tokens, also of --rate-schedule requests (default: %(default)s)")
    add("--range-ratio", type=float, default=d.range_ratio,
        help="draw lengths uniformly within +-ratio of the given ones (default: %(default)s)")
    add("--seed", type=int, default=d.seed, help="prompt and arrival seed (default: %(default)s)")
    add("--max-concurrency", type=int, help="most requests in flight at once (default: no limit)")
    add("--json", dest="json_path", metavar="PATH",
        help="write the results, config and per-request records (with start_offsets, each "
        "request's send time in s after the start) as JSON")
    add("--tokenizer", help="HF tokenizer directory (default: the model id, if a local directory)")
    add("--disable-tqdm", action="store_true", help="hide the progress bar")

    workload = parser.add_argument_group(
        "workload", "replay a trace or follow a rate schedule instead of a steady --request-rate; "
        "prompts are synthetic token ids of each request's length, outputs forced to its length")
    source = workload.add_mutually_exclusive_group()
    source.add_argument("--trace", metavar="FILE",
        help="CSV or JSONL trace: Azure LLM inference trace (TIMESTAMP, ContextTokens, "
        "GeneratedTokens), BurstGPT (Timestamp, Request tokens, Response tokens) or JSONL "
        "(timestamp|arrival_s, input_len|input_tokens, output_len|output_tokens); a 10-minute "
        "Azure sample ships at remp/data/traces/azure_llm_2023_conv_10min.csv")
    source.add_argument("--rate-schedule", metavar="TEXT", help=f"arrival rate over time: {RATE_SCHEDULE_FORMS}")
    add = workload.add_argument
    add("--output-tail", type=float, metavar="SIGMA", default=d.output_tail,
        help="--rate-schedule output lengths lognormal with mean --output-len and log-space standard "
        "deviation SIGMA, a heavy tail (1.0: median 0.6x the mean, 3%% above 4x); 0 keeps them uniform "
        "within --range-ratio (default: %(default)s)")
    add("--output-cap", type=int, metavar="N", help="cap the --output-tail lengths at N (a max_tokens)")
    add("--trace-time-scale", type=float, metavar="X", default=d.trace_time_scale,
        help="divide trace arrival times by this: 2 replays twice as fast (default: %(default)s)")
    add("--trace-length-scale", type=float, metavar="X", default=d.trace_length_scale,
        help="multiply trace prompt and output lengths by this, rounded, at least 1 "
        "(default: %(default)s)")
    add("--trace-start", type=float, metavar="SECONDS", default=d.trace_start,
        help="start at this many seconds of original trace time (default: %(default)s)")
    add("--trace-duration", type=float, metavar="SECONDS",
        help="replay only this many seconds of original trace time (default: to the end)")
    add("--trace-max-input-len", type=int, metavar="N",
        help="clip trace prompt lengths (after scaling) to this")
    add("--trace-max-output-len", type=int, metavar="N",
        help="clip trace output lengths (after scaling) to this")

    slo = parser.add_argument_group(
        "goodput", "requests per second that met every latency SLO, as in vLLM")
    slo.add_argument("--goodput", nargs="+", metavar="KEY:VALUE", default=[],
        help="SLOs in ms, keys ttft, tpot, e2el, e.g. --goodput ttft:500 tpot:50")
    slo.add_argument("--slo-ttft-ms", type=float, metavar="MS",
        help="TTFT SLO in ms (same as --goodput ttft:MS)")
    slo.add_argument("--slo-tpot-ms", type=float, metavar="MS",
        help="TPOT SLO in ms (same as --goodput tpot:MS)")


def _slos(args: argparse.Namespace) -> dict[str, float]:
    """--goodput pairs and the --slo-*-ms shorthands as one {metric: ms}; conflicts are errors."""
    slos = parse_goodput(args.goodput)
    for name, ms in (("ttft", args.slo_ttft_ms), ("tpot", args.slo_tpot_ms)):
        if ms is None:
            continue
        if slos.get(name, ms) != ms:
            raise BenchError(f"--slo-{name}-ms {ms:g} contradicts --goodput {name}:{slos[name]:g}")
        slos[name] = ms
    return slos


def run(args: argparse.Namespace) -> BenchResult:
    """Run `remp bench serve` from parsed arguments: benchmark, print the table, write --json."""
    try:
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
            trace=args.trace,
            trace_time_scale=args.trace_time_scale,
            trace_length_scale=args.trace_length_scale,
            trace_start=args.trace_start,
            trace_duration=args.trace_duration,
            trace_max_input_len=args.trace_max_input_len,
            trace_max_output_len=args.trace_max_output_len,
            rate_schedule=args.rate_schedule,
            output_tail=args.output_tail,
            output_cap=args.output_cap,
            goodput=_slos(args),
        )
        source = "--trace" if config.trace else "--rate-schedule" if config.rate_schedule else None
        rate = f"set by {source}" if source else config.request_rate
        print(f"Traffic request rate: {rate}", file=sys.stderr)
        print(f"Burstiness factor: {config.burstiness}", file=sys.stderr)
        print(f"Maximum request concurrency: {config.max_concurrency}", file=sys.stderr)
        result = asyncio.run(benchmark(config))
    except BenchError as exc:
        raise SystemExit(f"remp bench serve: {exc}") from exc
    print(format_report(result))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as f:
            json.dump(result.to_json(), f, allow_nan=False)
    return result
