"""What a serving benchmark measures per request and how it is aggregated, in vLLM's terms.

`remp bench serve` fills `RequestRecord`s from streamed responses and the simulator
(`remp.sim`) from its model; both aggregate them with `compute_metrics`. Metric names and
definitions follow vLLM's `calculate_metrics` so numbers compare with vLLM runs directly.
Stdlib only, so the simulator runs without the HTTP client, tokenizers or numpy.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

GOODPUT_METRICS = ("ttft", "tpot", "e2el")  # the SLOs vLLM's --goodput accepts, in ms


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
    start_offset: float = 0.0  # when it was sent, seconds after the start of the run


@dataclass
class LatencyStats:
    """Summary of one latency distribution, in milliseconds."""

    mean_ms: float
    median_ms: float
    std_ms: float  # population standard deviation, like numpy.std
    p90_ms: float
    p99_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> LatencyStats:
        """Summarise ``seconds``; an empty sample (e.g. every request failed) gives zeros."""
        if not seconds:
            return cls(0.0, 0.0, 0.0, 0.0, 0.0)
        ms = sorted(s * 1000.0 for s in seconds)
        n = len(ms)
        mean = math.fsum(ms) / n
        half = n // 2
        return cls(
            mean_ms=mean,
            median_ms=ms[half] if n % 2 else (ms[half - 1] + ms[half]) / 2,
            std_ms=math.sqrt(math.fsum((x - mean) ** 2 for x in ms) / n),
            p90_ms=percentile(ms, 90),
            p99_ms=percentile(ms, 99),
        )


def percentile(ordered: Sequence[float], q: float) -> float:
    """The ``q``-th percentile of the ascending, non-empty ``ordered``, interpolated linearly
    between the closest ranks as numpy.percentile's default ("linear") method does, to the bit."""
    n = len(ordered)
    rank = (n - 1) * (q / 100)
    if rank >= n - 1:
        return ordered[-1]
    low = math.floor(rank)
    weight = rank - low
    a, b = ordered[low], ordered[low + 1]
    # numpy's lerp: from the nearer end, so the result stays within [a, b]
    return b - (b - a) * (1 - weight) if weight >= 0.5 else a + (b - a) * weight


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
    # With SLOs (--goodput): requests per second that met all of them, and the
    # share of all requests (failed ones included) that did; None without SLOs.
    request_goodput: float | None = None
    slo_attainment: float | None = None


def _tpot(record: RequestRecord) -> float | None:
    """Time per output token after the first; None for a request with a single token."""
    if record.output_tokens <= 1:
        return None
    return (record.latency - record.ttft) / (record.output_tokens - 1)


def meets_slos(record: RequestRecord, slos_ms: Mapping[str, float]) -> bool:
    """Whether ``record`` succeeded within every SLO, as vLLM's goodput counts it.

    Keys are GOODPUT_METRICS, values milliseconds; a request of one token has
    no TPOT and vLLM counts it as 0, so it always meets a TPOT objective.
    """
    if not record.success:
        return False
    measured = {"ttft": record.ttft, "tpot": _tpot(record) or 0.0, "e2el": record.latency}
    return all(measured[name] <= slo / 1000.0 for name, slo in slos_ms.items())


def compute_metrics(
    records: Sequence[RequestRecord], duration_s: float, slos_ms: Mapping[str, float] | None = None
) -> Metrics:
    """Aggregate per-request records the way vLLM's ``calculate_metrics`` does.

    ``slos_ms`` (``{"ttft": 500, "tpot": 50}``) adds goodput, like vLLM's ``--goodput``.
    """
    ok = [r for r in records if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_tokens for r in ok)
    tpots = [t for t in map(_tpot, ok) if t is not None]
    good = sum(meets_slos(r, slos_ms) for r in ok) if slos_ms else None
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
        request_goodput=None if good is None else good / duration_s,
        slo_attainment=None if good is None else good / len(records),
    )
