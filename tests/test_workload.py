"""Tests for remp.bench.workload (traces, rate schedules), latency statistics and goodput; no
server involved."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import numpy as np
import pytest

from remp.bench.metrics import LatencyStats, percentile
from remp.bench.metrics import RequestRecord, compute_metrics, meets_slos
from remp.bench.serve import BenchConfig, BenchError, benchmark, parse_goodput
from remp.bench.workload import (
    WorkItem,
    day_schedule,
    load_trace,
    parse_rate_schedule,
    sample_trace_path,
    schedule_arrivals,
)

SAMPLE_ROWS = 2867  # rows of the shipped sample: the trace's first 600 s


def arrivals(items: list[WorkItem]) -> np.ndarray:
    return np.array([i.arrival_s for i in items])


# --- traces -------------------------------------------------------------------


def test_shipped_sample_is_the_first_ten_minutes() -> None:
    items = load_trace(sample_trace_path())
    t = arrivals(items)
    assert len(items) == SAMPLE_ROWS
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0) and 599 < t[-1] < 600
    # First rows: 18:15:46.6805900 (374, 44), then 18:15:50.9951690 (396, 109).
    assert (items[0].input_len, items[0].output_len) == (374, 44)
    assert items[1] == WorkItem(pytest.approx(4.314579, abs=1e-6), 396, 109)
    assert Path(sample_trace_path()).with_name("README.md").read_text().count("CC BY 4.0") == 1


def test_trace_time_scale_window_and_cap() -> None:
    full = arrivals(load_trace(sample_trace_path()))
    fast = arrivals(load_trace(sample_trace_path(), time_scale=2.0))
    assert fast == pytest.approx(full / 2)
    window = load_trace(sample_trace_path(), start_s=60, duration_s=60, time_scale=4.0)
    in_window = full[(full >= 60) & (full < 120)]
    assert len(window) == len(in_window)
    assert arrivals(window) == pytest.approx((in_window - in_window[0]) / 4)
    assert len(load_trace(sample_trace_path(), start_s=60, max_requests=5)) == 5


def test_trace_lengths_are_scaled_rounded_and_clipped() -> None:
    raw = load_trace(sample_trace_path())
    items = load_trace(sample_trace_path(), length_scale=0.1, max_input_len=50, max_output_len=10)
    assert (items[0].input_len, items[0].output_len) == (37, 4)  # 37.4 and 4.4, rounded
    for item, orig in zip(items, raw):
        assert item.input_len == min(50, max(1, round(orig.input_len * 0.1)))
        assert item.output_len == min(10, max(1, round(orig.output_len * 0.1)))
    assert max(i.input_len for i in items) == 50 and min(i.output_len for i in items) >= 1


def test_burstgpt_csv(tmp_path: Path) -> None:
    path = tmp_path / "burstgpt.csv"
    path.write_text(
        "Timestamp,Model,Request tokens,Response tokens,Total tokens,Log Type\n"
        "5,ChatGPT,472,18,490,Conversation log\n"
        "45.5,GPT-4,1087,0,1087,Conversation log\n"  # a failed request: no response tokens
        "12,ChatGPT,300,120,420,API log\n"  # out of order: sorted by arrival
    )
    items = load_trace(str(path), time_scale=0.5)
    assert items == [WorkItem(0.0, 472, 18), WorkItem(14.0, 300, 120), WorkItem(81.0, 1087, 1)]


def test_jsonl_with_either_key_names(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    lines = [
        {"arrival_s": 10.0, "input_tokens": 8, "output_tokens": 3},
        {"arrival_s": 10.25, "input_tokens": 16, "output_tokens": 5},
    ]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    assert load_trace(str(path)) == [WorkItem(0.0, 8, 3), WorkItem(0.25, 16, 5)]
    other = tmp_path / "other.jsonl"
    other.write_text('{"timestamp": "2024-05-01 10:00:00.5", "input_len": 4, "output_len": 2}\n'
                     '{"timestamp": "2024-05-01 10:00:01.75", "input_len": 6, "output_len": 1}\n')
    assert load_trace(str(other)) == [WorkItem(0.0, 4, 2), WorkItem(1.25, 6, 1)]


def test_bad_traces_fail_clearly(tmp_path: Path) -> None:
    unknown = tmp_path / "unknown.csv"
    unknown.write_text("time,prompt,completion\n1,2,3\n")
    with pytest.raises(ValueError, match=r"unknown\.csv.*unrecognised.*ContextTokens.*Request tokens"):
        load_trace(str(unknown))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"arrival_s": 0, "input_len": 4, "output_len": 2}\nnot json\n')
    with pytest.raises(ValueError, match=r"broken\.jsonl, line 2"):
        load_trace(str(broken))
    bad_time = tmp_path / "bad_time.csv"
    bad_time.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\nyesterday,1,2\n")
    with pytest.raises(ValueError, match=r"bad_time\.csv, line 2.*yesterday"):
        load_trace(str(bad_time))
    with pytest.raises(ValueError, match="no requests between 700"):
        load_trace(sample_trace_path(), start_s=700)
    with pytest.raises(ValueError, match="time_scale"):
        load_trace(sample_trace_path(), time_scale=0)


# --- rate schedules -----------------------------------------------------------


def test_parse_step_and_day_schedules() -> None:
    assert parse_rate_schedule("1:60,4:60,1:60") == [(1.0, 60.0), (4.0, 60.0), (1.0, 60.0)]
    assert parse_rate_schedule(" 0.5:10, 0:5 ") == [(0.5, 10.0), (0.0, 5.0)]
    day = parse_rate_schedule("day:low=0.5,peak=4,period=300,steps=10")
    assert day == day_schedule(0.5, 4.0, 300.0, 10)
    assert len(parse_rate_schedule("day:low=1,peak=2,period=60")) == 12  # default steps


def test_day_schedule_rises_to_peak_and_falls_back() -> None:
    day = day_schedule(1.0, 5.0, 120.0, steps=12)
    rates = [rate for rate, _ in day]
    assert sum(seconds for _, seconds in day) == pytest.approx(120.0)
    assert rates == pytest.approx(rates[::-1])  # symmetric
    assert np.all(np.diff(rates[:6]) > 0) and 1.0 < min(rates) < 1.1 and 4.9 < max(rates) <= 5.0
    # Midpoint sampling: the first segment is centred on t = 5 s of the 120 s period.
    assert rates[0] == pytest.approx(1.0 + 4.0 * math.sin(math.pi * 5 / 120) ** 2)


@pytest.mark.parametrize("text, message", [
    ("", "not RATE:SECONDS"),
    ("1:60,fast:10", "'fast:10' is not RATE:SECONDS"),
    ("1:60,2", "'2' is not RATE:SECONDS"),
    ("1:-5", "seconds must be a positive number"),
    ("-1:5", "finite and >= 0"),
    ("0:10,0:5", "at least one segment with a positive rate"),
    ("day:low=1,peak=4", "missing period"),
    ("day:low=1,peak=4,period=60,shape=2", "'shape=2'"),
    ("day:low=1,peak=x,period=60", "not a number"),
    ("day:low=5,peak=1,period=60", "low <= peak"),
    ("day:low=0,peak=0,period=60", "positive rate"),
])
def test_bad_rate_schedules_fail_clearly(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rate_schedule(text)


SCHEDULE = [(2.0, 500.0), (8.0, 125.0), (0.0, 50.0), (4.0, 250.0)]  # 1000, 1000, 0, 1000 expected


@pytest.mark.parametrize("burstiness, tolerance", [(1.0, 0.1), (4.0, 0.06)])
def test_schedule_arrivals_follow_each_segments_rate(burstiness: float, tolerance: float) -> None:
    items = schedule_arrivals(SCHEDULE, input_len=100, output_len=20, burstiness=burstiness, seed=0)
    t = arrivals(items)
    assert np.all(np.diff(t) >= 0) and t[0] >= 0 and t[-1] < 925
    edges = np.cumsum([0.0] + [seconds for _, seconds in SCHEDULE])
    counts, _ = np.histogram(t, bins=edges)
    for (rate, seconds), count in zip(SCHEDULE, counts):
        assert count == pytest.approx(rate * seconds, rel=tolerance, abs=0)
    assert {(i.input_len, i.output_len) for i in items} == {(100, 20)}


def test_schedule_arrivals_are_seeded_and_draw_lengths_in_range() -> None:
    kwargs = {"input_len": 20, "output_len": 10, "range_ratio": 0.5}
    a = schedule_arrivals([(5.0, 20.0), (1.0, 20.0)], seed=3, **kwargs)
    assert a == schedule_arrivals([(5.0, 20.0), (1.0, 20.0)], seed=3, **kwargs)
    assert a != schedule_arrivals([(5.0, 20.0), (1.0, 20.0)], seed=4, **kwargs)
    assert all(10 <= i.input_len <= 30 and 5 <= i.output_len <= 15 for i in a)
    assert len({i.input_len for i in a}) > 5


# --- goodput ------------------------------------------------------------------


def test_goodput_counts_requests_within_every_slo_like_vllm() -> None:
    records = [
        RequestRecord(prompt_len=1, success=True, ttft=0.1, latency=0.3, output_tokens=4),  # TPOT 67
        RequestRecord(prompt_len=1, success=True, ttft=0.1, latency=0.15, output_tokens=2),  # good
        RequestRecord(prompt_len=1, success=True, ttft=0.2, latency=0.25, output_tokens=2),  # TTFT
        RequestRecord(prompt_len=1, success=True, ttft=0.1, latency=0.1, output_tokens=1),  # good
        RequestRecord(prompt_len=1, error="HTTP 500"),
    ]
    slos = {"ttft": 150.0, "tpot": 60.0}
    assert [meets_slos(r, slos) for r in records] == [False, True, False, True, False]
    m = compute_metrics(records, duration_s=2.0, slos_ms=slos)
    assert m.request_goodput == pytest.approx(1.0)  # 2 good requests in 2 s
    assert m.slo_attainment == pytest.approx(0.4)  # of all 5, the failed one included
    assert meets_slos(records[0], {"e2el": 300.0}) and not meets_slos(records[0], {"e2el": 299.0})
    plain = compute_metrics(records, duration_s=2.0)
    assert plain.request_goodput is None and plain.slo_attainment is None


@pytest.mark.parametrize("n", [1, 2, 3, 10, 11, 99, 100, 101, 1000, 4097])
def test_latency_stats_are_numpys(n: int) -> None:
    """The stdlib statistics give what numpy gives: percentiles and medians to the bit, means
    and standard deviations to rounding (summed exactly here, pairwise by numpy)."""
    seconds = np.random.default_rng(n).lognormal(-3.0, 1.0, size=n).tolist()
    stats = LatencyStats.of(seconds)
    ms = np.asarray(seconds) * 1000.0
    assert stats.median_ms == float(np.median(ms))
    assert (stats.p90_ms, stats.p99_ms) == (float(np.percentile(ms, 90)), float(np.percentile(ms, 99)))
    assert stats.mean_ms == pytest.approx(float(np.mean(ms)), rel=1e-13)
    assert stats.std_ms == pytest.approx(float(np.std(ms)), rel=1e-12)
    assert percentile(sorted(seconds), 50) == float(np.percentile(seconds, 50))


def test_goodput_options_parse_and_validate() -> None:
    assert parse_goodput(["ttft:500", "TPOT:50", "e2el:2000"]) == {
        "ttft": 500.0, "tpot": 50.0, "e2el": 2000.0}
    with pytest.raises(BenchError, match="KEY:VALUE"):
        parse_goodput(["ttft=500"])


@pytest.mark.parametrize("options, message", [
    ({"goodput": {"itl": 5.0}}, "one of ttft, tpot, e2el"),
    ({"goodput": {"ttft": -1.0}}, "positive"),
    ({"trace": "/nonexistent/trace.csv"}, "/nonexistent/trace.csv"),
    ({"trace": sample_trace_path(), "rate_schedule": "1:10"}, "alternatives"),
    ({"rate_schedule": "1:10,x"}, "not RATE:SECONDS"),
])
def test_bad_workload_options_fail_before_contacting_the_server(
    options: dict[str, object], message: str
) -> None:
    config = BenchConfig(base_url="http://127.0.0.1:9", **options)  # nothing listens there
    with pytest.raises(BenchError, match=message):
        asyncio.run(benchmark(config))
