"""Workloads for load generation: replayed traces and time-varying rate schedules.

A steady Poisson stream hides what real serving sees: load that swings over
minutes and hours, and prompt/output lengths that vary request by request.  This
module turns either a recorded trace (Azure LLM inference trace, BurstGPT, or a
plain JSONL file) or a piecewise-constant rate schedule into a list of
``WorkItem``s — when each request arrives and how long its prompt and output
are.  It is pure (no server, no tokenizer), so a simulator can consume the very
same workloads that ``remp bench serve`` sends.  numpy is imported only by the
functions that draw random numbers, so reading traces and the ``WorkItem`` type
need nothing beyond the standard library.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from importlib import resources
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

SAMPLE_TRACE = "azure_llm_2023_conv_10min.csv"

# Column (or JSON key) names recognised for each field, compared case-insensitively:
# Azure LLM inference traces, BurstGPT, then the plain JSONL names.
_FIELD_NAMES: dict[str, tuple[str, ...]] = {
    "timestamp": ("TIMESTAMP", "Timestamp", "arrival_s"),
    "input": ("ContextTokens", "Request tokens", "input_len", "input_tokens"),
    "output": ("GeneratedTokens", "Response tokens", "output_len", "output_tokens"),
}

_DATETIME = re.compile(
    r"(?P<base>\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2})(?:\.(?P<frac>\d+))?"
    r"(?P<tz>Z|[+-]\d{2}:?\d{2})?"
)


@dataclass
class WorkItem:
    """One request of a workload: when it arrives and its prompt and output lengths in tokens."""

    arrival_s: float  # seconds after the start of the run
    input_len: int
    output_len: int


def sample_trace_path() -> str:
    """Path of the shipped 10-minute Azure conversation trace sample (see its README)."""
    return str(resources.files("remp").joinpath("data", "traces", SAMPLE_TRACE))


def draw_lengths(rng: np.random.Generator, length: int, ratio: float, num: int) -> np.ndarray:
    """``num`` lengths uniform on [floor(length*(1-ratio)), ceil(length*(1+ratio))], at least 1."""
    low = max(1, math.floor(length * (1 - ratio)))
    high = max(low, math.ceil(length * (1 + ratio)))
    return rng.integers(low, high + 1, size=num)


def draw_tailed_lengths(rng: np.random.Generator, mean: int, sigma: float, num: int, cap: int | None = None
                        ) -> np.ndarray:
    """``num`` lognormal lengths with mean ``mean`` (before capping) and log-space standard deviation
    ``sigma``, rounded, at least 1 and at most ``cap``: most are short and a few are many times the
    mean, as generation lengths of reasoning and RL rollouts are (the longest run into the cap)."""
    import numpy as np

    mu = math.log(mean) - sigma**2 / 2
    lengths = np.maximum(1, np.rint(rng.lognormal(mu, sigma, size=num))).astype(np.int64)
    return lengths if cap is None else np.minimum(lengths, cap)


# --- traces -------------------------------------------------------------------


def load_trace(
    path: str,
    *,
    time_scale: float = 1.0,
    length_scale: float = 1.0,
    max_input_len: int | None = None,
    max_output_len: int | None = None,
    start_s: float = 0.0,
    duration_s: float | None = None,
    max_requests: int | None = None,
) -> list[WorkItem]:
    """Read a request trace (CSV or JSONL) into work items sorted by arrival.

    ``start_s`` and ``duration_s`` pick a window of the original trace time,
    counted from its first request, so the same slice can be replayed at any
    speed.  Arrivals are then re-based to 0 at the first kept request and
    divided by ``time_scale`` (2 replays twice as fast); lengths are multiplied
    by ``length_scale``, rounded and clipped to [1, max_*] so a trace recorded
    on a large model fits a small one's context.  ``max_requests`` keeps the
    first that many of the window.
    """
    _check_positive(time_scale=time_scale, length_scale=length_scale, duration_s=duration_s,
                    max_requests=max_requests, max_input_len=max_input_len,
                    max_output_len=max_output_len)
    if not (start_s >= 0 and math.isfinite(start_s)):
        raise ValueError(f"start_s must be a finite number >= 0, not {start_s}")
    rows = sorted(_read_rows(path), key=lambda row: row[0])
    if not rows:
        raise ValueError(f"trace {path} has no requests")
    first = rows[0][0]
    end = math.inf if duration_s is None else start_s + duration_s
    kept = [row for row in rows if start_s <= row[0] - first < end][:max_requests]
    if not kept:
        raise ValueError(
            f"trace {path} has no requests between {start_s} s and {end} s "
            f"(it spans {rows[-1][0] - first:.1f} s)"
        )
    base = kept[0][0]
    return [
        WorkItem(
            arrival_s=(t - base) / time_scale,
            input_len=_scale_length(n_in, length_scale, max_input_len),
            output_len=_scale_length(n_out, length_scale, max_output_len),
        )
        for t, n_in, n_out in kept
    ]


def _check_positive(**values: float | None) -> None:
    """Raise ValueError naming the first given (non-None) value that is not a positive number."""
    for name, value in values.items():
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise ValueError(f"{name} must be a positive number, not {value}")


def _scale_length(length: int, scale: float, limit: int | None) -> int:
    """``length * scale`` rounded, at least 1 token and at most ``limit``."""
    scaled = max(1, round(length * scale))
    return scaled if limit is None else min(scaled, limit)


def _read_rows(path: str) -> list[tuple[float, int, int]]:
    """(timestamp in seconds, input tokens, output tokens) of every record of the file.

    JSONL is recognised by its first non-blank character, ``{``; anything else
    is CSV.  The first record's names decide which columns are read.
    """
    with open(path, encoding="utf-8", newline="") as f:
        jsonl = f.read(4096).lstrip("\ufeff \t\r\n").startswith("{")
        f.seek(0)
        records = _jsonl_records(path, f) if jsonl else _csv_records(f)
        columns: dict[str, str] | None = None
        rows = []
        for line, record in records:
            columns = columns or _columns(path, list(record))
            try:
                rows.append((
                    _parse_time(record[columns["timestamp"]]),
                    int(float(record[columns["input"]])),
                    int(float(record[columns["output"]])),
                ))
            except (KeyError, TypeError, ValueError) as exc:
                raise ValueError(f"{path}, line {line}: cannot read {record!r}: {exc!r}") from exc
    return rows


def _csv_records(f: Any) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(line number, row by column name) for every data row of a CSV file with a header."""
    reader = csv.DictReader(f)
    for record in reader:
        yield reader.line_num, record


def _jsonl_records(path: str, f: Any) -> Iterator[tuple[int, Mapping[str, Any]]]:
    """(line number, object) for every non-blank line of a JSON-lines file."""
    for line, text in enumerate(f, start=1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}, line {line}: not JSON: {exc}") from exc
        if not isinstance(record, dict):
            raise ValueError(f"{path}, line {line}: expected a JSON object, got {text.strip()!r}")
        yield line, record


def _columns(path: str, names: list[str]) -> dict[str, str]:
    """Map each field to the column that holds it; ValueError naming what was expected."""
    by_lower = {str(name).strip().lower(): name for name in names}
    found: dict[str, str] = {}
    for field, aliases in _FIELD_NAMES.items():
        match = next((by_lower[a.lower()] for a in aliases if a.lower() in by_lower), None)
        if match is not None:
            found[field] = match
    if len(found) < len(_FIELD_NAMES):
        expected = "; ".join(
            f"{field}: one of {', '.join(repr(a) for a in aliases)}"
            for field, aliases in _FIELD_NAMES.items()
        )
        raise ValueError(
            f"{path}: unrecognised trace format (columns {names!r}); expected a CSV with a "
            f"header or JSONL, with columns (any case) {expected}"
        )
    return found


def _parse_time(value: Any) -> float:
    """Seconds from a number (BurstGPT, JSONL) or a date-time string (Azure traces).

    Azure timestamps carry 7 fractional digits ("2023-11-16 18:15:46.6805900"),
    one more than ``datetime`` parses on every Python version, so the fraction
    is read separately instead of being rejected or truncated.  A string
    without a time zone is taken as UTC; only differences between timestamps matter.
    """
    text = str(value).strip()
    match = _DATETIME.fullmatch(text)
    if match is None:
        try:
            seconds = float(text)
        except ValueError:
            seconds = math.nan
        if not math.isfinite(seconds):
            raise ValueError(f"timestamp {text!r} is neither seconds nor 'YYYY-MM-DD HH:MM:SS[.f]'")
        return seconds
    zone = (match["tz"] or "+00:00").replace("Z", "+00:00")
    if ":" not in zone:  # "+0100": Python 3.10's fromisoformat wants "+01:00"
        zone = f"{zone[:3]}:{zone[3:]}"
    moment = datetime.fromisoformat(f"{match['base'].replace(' ', 'T')}{zone}")
    return moment.timestamp() + float(f"0.{match['frac'] or 0}")


# --- rate schedules -----------------------------------------------------------


RATE_SCHEDULE_FORMS = (
    "'RATE:SECONDS,...' steps (e.g. '2:120,40:120,2:120'); "
    "'day:low=,peak=,period=[,steps=]' (a compressed day); "
    "'bursts:low=,high=,period=,burst=[,cycles=]' (bursty serving: high for burst seconds of every period); "
    "'burst:n=[,within=]' (about n requests within seconds, 1 by default, then none: an RL rollout's "
    "batch of prompts; pair it with --output-tail for a decaying tail)"
)


def parse_rate_schedule(text: str) -> list[tuple[float, float]]:
    """Parse a rate schedule: ``"RATE:SECONDS,..."`` steps or one of the named shapes
    ``"day:..."``, ``"bursts:..."``, ``"burst:..."`` (see RATE_SCHEDULE_FORMS).

    ``"1:60,4:60,1:60"`` is one minute each at 1, 4 and 1 req/s.  The shapes are built by
    ``day_schedule``, ``bursts_schedule`` and ``burst_schedule``.  Returns [(rate in req/s,
    seconds), ...].
    """
    text = text.strip()
    kind, sep, _ = text.partition(":")
    shapes = {"day": _parse_day, "bursts": _parse_bursts, "burst": _parse_burst}
    parse = shapes.get(kind.strip().lower()) if sep else None
    schedule = parse(text) if parse else _parse_steps(text)
    _check_schedule(schedule)
    return schedule


def _shape_params(text: str, keys: tuple[str, ...], required: tuple[str, ...], usage: str) -> dict[str, float]:
    """``kind:key=value,...`` -> {key: float(value)}; ValueError naming what is wrong."""
    params: dict[str, float] = {}
    for part in text.partition(":")[2].split(","):
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or key not in keys:
            raise ValueError(f"bad rate schedule {text!r}: {part.strip()!r}; expected {usage}")
        try:
            params[key] = float(value)
        except ValueError:
            raise ValueError(f"bad rate schedule {text!r}: {key}={value.strip()!r} is not a number; "
                             f"expected {usage}") from None
    missing = [k for k in required if k not in params]
    if missing:
        raise ValueError(f"bad rate schedule {text!r}: missing {', '.join(missing)}; expected {usage}")
    return params


def _parse_bursts(text: str) -> list[tuple[float, float]]:
    """``bursts:low=L,high=H,period=S,burst=B[,cycles=N]`` -> ``bursts_schedule(...)``."""
    p = _shape_params(text, ("low", "high", "period", "burst", "cycles"), ("low", "high", "period", "burst"),
                      "'bursts:low=RATE,high=RATE,period=SECONDS,burst=SECONDS[,cycles=N]'")
    return bursts_schedule(p["low"], p["high"], p["period"], p["burst"], int(p.get("cycles", 4)))


def _parse_burst(text: str) -> list[tuple[float, float]]:
    """``burst:n=N[,within=S]`` -> ``burst_schedule(N, S)``."""
    p = _shape_params(text, ("n", "within"), ("n",), "'burst:n=REQUESTS[,within=SECONDS]'")
    return burst_schedule(p["n"], p.get("within", 1.0))


def bursts_schedule(low: float, high: float, period_s: float, burst_s: float, cycles: int = 4
                    ) -> list[tuple[float, float]]:
    """Bursty serving: ``cycles`` periods of ``period_s`` seconds, each ``low`` req/s with a burst
    of ``high`` req/s for its last ``burst_s`` seconds (a base load with spikes, as a shared
    endpoint sees when a batch job or a popular client fires at once)."""
    if not (0 <= low <= high and math.isfinite(high)):
        raise ValueError(f"bursts need 0 <= low <= high, not low={low}, high={high}")
    _check_positive(period_s=period_s, burst_s=burst_s)
    if burst_s >= period_s:
        raise ValueError(f"a burst ({burst_s} s) must be shorter than its period ({period_s} s)")
    if cycles < 1:
        raise ValueError(f"bursts need cycles >= 1, not {cycles}")
    return [(low, period_s - burst_s), (high, burst_s)] * cycles


def burst_schedule(num_requests: float, within_s: float = 1.0) -> list[tuple[float, float]]:
    """About ``num_requests`` requests within ``within_s`` seconds and none after: the prompts of
    an RL rollout step submitted at once. With long, heavy-tailed outputs (``schedule_arrivals``'
    ``output_tail``) the running batch starts full and decays into a long tail."""
    _check_positive(num_requests=num_requests, within_s=within_s)
    return [(num_requests / within_s, within_s)]


def _parse_steps(text: str) -> list[tuple[float, float]]:
    """``RATE:SECONDS,...`` -> [(rate, seconds), ...]."""
    schedule = []
    for part in text.split(","):
        rate, _, seconds = part.partition(":")  # no ":" leaves seconds "", which float rejects
        try:
            schedule.append((float(rate), float(seconds)))
        except ValueError:
            raise ValueError(
                f"bad rate schedule {text!r}: {part.strip()!r} is not RATE:SECONDS; expected "
                "e.g. '1:60,4:60,1:60' or 'day:low=0.5,peak=4,period=300,steps=10'"
            ) from None
    return schedule


def _parse_day(text: str) -> list[tuple[float, float]]:
    """``day:low=L,peak=P,period=S[,steps=N]`` -> ``day_schedule(L, P, S, N)``."""
    usage = "expected 'day:low=RATE,peak=RATE,period=SECONDS[,steps=N]'"
    params: dict[str, str] = {}
    for part in text[len("day:"):].split(","):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in ("low", "peak", "period", "steps"):
            raise ValueError(f"bad day schedule {text!r}: {part.strip()!r}; {usage}")
        params[key.strip()] = value.strip()
    missing = [k for k in ("low", "peak", "period") if k not in params]
    if missing:
        raise ValueError(f"bad day schedule {text!r}: missing {', '.join(missing)}; {usage}")
    try:
        low, peak, period = (float(params[k]) for k in ("low", "peak", "period"))
        steps = int(params.get("steps", "12"))
    except ValueError:
        raise ValueError(f"bad day schedule {text!r}: a value is not a number; {usage}") from None
    return day_schedule(low, peak, period, steps)


def day_schedule(
    low: float, peak: float, period_s: float, steps: int = 12
) -> list[tuple[float, float]]:
    """A day's load in ``steps`` equal segments: ``low`` at the ends, ``peak`` in the middle.

    Rate ``low + (peak - low) * sin^2(pi * t / period_s)`` sampled at each
    segment's midpoint: a smooth rise and fall, compressed into a benchmark-sized
    period, that tests whether a server adapts to load in both directions.
    """
    if not (0 <= low <= peak and math.isfinite(peak)):
        raise ValueError(f"day schedule needs 0 <= low <= peak, not low={low}, peak={peak}")
    _check_positive(period_s=period_s)
    if steps < 1:
        raise ValueError(f"day schedule needs steps >= 1, not {steps}")
    step_s = period_s / steps
    return [
        (low + (peak - low) * math.sin(math.pi * (i + 0.5) / steps) ** 2, step_s)
        for i in range(steps)
    ]


def _check_schedule(schedule: list[tuple[float, float]]) -> None:
    """Rates must be finite and >= 0 (0 is an idle gap), durations positive, and some load."""
    if not schedule:
        raise ValueError("a rate schedule needs at least one RATE:SECONDS segment")
    for rate, seconds in schedule:
        if not (rate >= 0 and math.isfinite(rate)):
            raise ValueError(f"rate schedule rates must be finite and >= 0, not {rate}")
        _check_positive(seconds=seconds)
    if all(rate == 0 for rate, _ in schedule):
        raise ValueError("a rate schedule needs at least one segment with a positive rate")


def schedule_arrivals(
    schedule: list[tuple[float, float]],
    *,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    burstiness: float = 1.0,
    seed: int = 0,
    output_tail: float = 0.0,
    output_cap: int | None = None,
) -> list[WorkItem]:
    """Seeded arrivals whose rate follows ``schedule``, with lengths drawn like the random dataset,
    or, with ``output_tail`` > 0, output lengths lognormal with mean ``output_len`` and that
    log-space standard deviation, capped at ``output_cap`` (``draw_tailed_lengths``).

    Time-rescaling: a renewal process with unit mean rate and gamma gaps of
    shape ``burstiness`` (1 is Poisson) runs in "operational time" — the
    integral of the rate — and is mapped back to wall-clock time.  Each segment
    then gets on average ``rate * seconds`` arrivals, the burstiness carries
    across segment boundaries without a restart, and zero-rate segments stay idle.
    """
    import numpy as np

    _check_schedule(schedule)
    _check_positive(burstiness=burstiness, output_cap=output_cap)
    if not (output_tail >= 0 and math.isfinite(output_tail)):
        raise ValueError(f"output_tail must be a finite number >= 0, not {output_tail}")
    rates = np.array([rate for rate, _ in schedule], dtype=np.float64)
    seconds = np.array([s for _, s in schedule], dtype=np.float64)
    starts = np.concatenate(([0.0], np.cumsum(seconds)[:-1]))
    load_ends = np.cumsum(rates * seconds)  # expected arrivals by the end of each segment
    load_starts = load_ends - rates * seconds
    total = float(load_ends[-1])

    rng = np.random.default_rng(seed)
    chunk = int(total) + 16
    points: list[np.ndarray] = []
    reached = 0.0
    while reached < total:
        gaps = rng.gamma(shape=burstiness, scale=1.0 / burstiness, size=chunk)
        points.append(reached + np.cumsum(gaps))
        reached = float(points[-1][-1])
    load = np.concatenate(points)
    load = load[load < total]

    # First segment whose cumulative load exceeds the point: never a zero-rate one.
    segment = np.searchsorted(load_ends, load, side="right")
    arrivals = starts[segment] + (load - load_starts[segment]) / rates[segment]
    input_lens = draw_lengths(rng, input_len, range_ratio, len(arrivals))
    output_lens = (draw_tailed_lengths(rng, output_len, output_tail, len(arrivals), output_cap) if output_tail
                   else draw_lengths(rng, output_len, range_ratio, len(arrivals)))
    return [
        WorkItem(arrival_s=float(t), input_len=int(n), output_len=int(m))
        for t, n, m in zip(arrivals, input_lens, output_lens)
    ]
