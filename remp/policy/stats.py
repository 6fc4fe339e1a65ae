"""The load a server sees, summarised over a sliding window: what the policy decides from.

`LoadTracker` is fed events with explicit timestamps and keeps no clock of its own, so the
server (wall-clock time) and the simulator (simulated time) run the very same code and a
decision replayed in the simulator sees exactly the statistics the server would have seen.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class LoadStats:
    """The recent load, as the policy's `predict` consumes it."""

    window_s: float  # span the rates and means cover
    arrival_rate: float  # requests per second
    mean_input_len: float  # prompt tokens per request
    mean_output_len: float  # generated tokens per request
    concurrency: float  # running requests (latest observation)
    queue_len: float  # waiting requests (latest observation)
    kv_usage: float  # share of the KV cache in use, 0..1 (latest observation)
    now: float


@dataclass(frozen=True)
class _Arrival:
    t: float
    input_len: int
    output_len_hint: int


@dataclass(frozen=True)
class _Finish:
    t: float
    output_len: int


@dataclass(frozen=True)
class _Observation:
    t: float
    running: int
    waiting: int
    kv_usage: float


class LoadTracker:
    """Sliding-window load statistics from arrival, finish and state events.

    Rates divide by the window, or by the time since `start` while less than a window has
    passed, so a freshly started server does not report a tenth of its real load. When the
    window holds no arrival, the lengths of the latest one are kept: an idle spell should not
    make the next request look zero tokens long. The scheduler's state is the latest
    observation in the window: what a switch now would interrupt.
    """

    def __init__(self, window_s: float, start: float = 0.0):
        if window_s <= 0:
            raise ValueError(f"window_s must be positive, not {window_s}")
        self.window_s = window_s
        self.start = start
        self._arrivals: deque[_Arrival] = deque()
        self._finishes: deque[_Finish] = deque()
        self._observation: _Observation | None = None
        self._last_arrival: _Arrival | None = None
        self._last_finish: _Finish | None = None

    def on_arrival(self, t: float, input_len: int, output_len_hint: int) -> None:
        """A request arrived; `output_len_hint` is its max_tokens (what it may generate)."""
        self._last_arrival = _Arrival(t, input_len, output_len_hint)
        self._arrivals.append(self._last_arrival)
        self._prune(t)

    def on_finish(self, t: float, output_len: int) -> None:
        """A request finished after generating `output_len` tokens (its prompt length came with
        its arrival)."""
        self._last_finish = _Finish(t, output_len)
        self._finishes.append(self._last_finish)
        self._prune(t)

    def observe(self, t: float, running: int, waiting: int, kv_usage: float) -> None:
        """A snapshot of the scheduler's state."""
        self._observation = _Observation(t, running, waiting, kv_usage)

    def stats(self, t: float) -> LoadStats:
        self._prune(t)
        span = min(self.window_s, t - self.start)
        latest = self._observation if self._observation and self._observation.t >= t - self.window_s else None
        return LoadStats(
            window_s=span,
            arrival_rate=len(self._arrivals) / span if span > 0 else 0.0,
            mean_input_len=self._mean_input_len(),
            mean_output_len=self._mean_output_len(),
            concurrency=float(latest.running) if latest else 0.0,
            queue_len=float(latest.waiting) if latest else 0.0,
            kv_usage=latest.kv_usage if latest else 0.0,
            now=t,
        )

    def _mean_input_len(self) -> float:
        if self._arrivals:
            return sum(a.input_len for a in self._arrivals) / len(self._arrivals)
        return float(self._last_arrival.input_len) if self._last_arrival else 0.0

    def _mean_output_len(self) -> float:
        """Finished requests' real output lengths; failing those, what arrivals asked for."""
        if self._finishes:
            return sum(f.output_len for f in self._finishes) / len(self._finishes)
        if self._arrivals:
            return sum(a.output_len_hint for a in self._arrivals) / len(self._arrivals)
        if self._last_finish:
            return float(self._last_finish.output_len)
        return float(self._last_arrival.output_len_hint) if self._last_arrival else 0.0

    def _prune(self, t: float) -> None:
        horizon = t - self.window_s
        for events in (self._arrivals, self._finishes):
            while events and events[0].t < horizon:
                events.popleft()
