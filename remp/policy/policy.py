"""Which layout to serve on: a steady-state prediction per layout and a switching rule.

`predict` turns a layout's profile and the recent load into the latencies and capacity that
layout would show if the load held; `Policy.decide` scores every layout from those
predictions and switches only when the gain over a horizon pays for the switch's pause, the
gain is clearly more than noise, and it has persisted. Both are pure functions of their
inputs (plus the policy's small hysteresis state), so the server and the simulator run the
same code and a test can drive them with made-up numbers.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

from remp.policy.profile import LayoutProfile, Profile
from remp.policy.stats import LoadStats
from remp.topology import Topology

_BISECT_TOLERANCE = 1e-6  # relative: a millionth of a request per second or of a batch slot


@dataclass(frozen=True)
class Prediction:
    """What a layout would show in steady state under the given load."""

    ttft_s: float  # inf when saturated
    tpot_s: float  # at the steady batch (at the largest batch it holds when saturated)
    e2e_s: float  # inf when saturated
    throughput_tok_s: float  # output tokens per second served (capped at capacity)
    max_request_rate: float  # requests per second this layout sustains at this length mix
    utilisation: float  # arrival rate / max_request_rate
    saturated: bool  # arrivals outpace what it can serve: the queue grows without bound
    batch: float  # running requests in steady state
    batch_cap: float = math.inf  # most requests it runs at once (sequence limit and KV capacity)
    in_system: float = 0.0  # requests running or waiting now (the load's latest observation)
    drain_s: float = 0.0  # until those are done on this layout (inf when it cannot keep up)

    def backlog_request_s(self, horizon_s: float) -> float:
        """Request-seconds the requests in the system now spend in it within `horizon_s`, taking
        them to finish evenly over `drain_s`."""
        if self.in_system <= 0 or self.drain_s <= 0:
            return 0.0
        if math.isinf(self.drain_s):
            return math.inf
        if self.drain_s <= horizon_s:
            return self.in_system * self.drain_s / 2
        return self.in_system * horizon_s * (1.0 - horizon_s / (2 * self.drain_s))


@dataclass(frozen=True)
class _Mix:
    """The per-request quantities `predict` needs, for one layout and length mix."""

    layout: LayoutProfile
    output_len: float
    context_len: float  # mean KV length of a decoding request: input + half the output
    prefill_s: float  # latency of one prompt's prefill
    batch_cap: float  # most requests that can run at once (sequence limit and KV capacity)

    def tpot(self, batch: float, rate: float) -> float:
        """TPOT at this batch, slowed by the prefill work arriving at `rate`.

        A share rate * prefill_s / pp of every second goes to prefill: with pp stages a prompt
        occupies each stage for only 1/pp of its latency, the other stages keep decoding.
        A running request always decodes in a batch of at least itself.
        """
        share = rate * self.prefill_s / self.layout.pp
        if share >= 1.0:
            return math.inf
        return self.layout.decode_seconds(max(batch, 1.0), self.context_len) / (1.0 - share)

    def running_s(self, batch: float, rate: float) -> float:
        """How long a request holds a running slot: its prefill, then a token per decode step."""
        return self.prefill_s + (self.output_len - 1.0) * self.tpot(batch, rate)

    def fits(self, rate: float) -> bool:
        """Whether Little's law has a solution within the batch cap: B = rate * running_s(B)."""
        return self.batch_cap >= 1.0 and rate * self.running_s(self.batch_cap, rate) <= self.batch_cap

    def drain_s(self, running: float, waiting: float, steady_batch: float, rate: float) -> float:
        """Seconds until the requests in the system now are done: the running ones halfway through
        their output, the waiting ones still to prefill and generate all of it. They decode side by
        side with the steady load, in a batch of at least themselves (up to the cap), at that batch's
        TPOT, and hold up to the cap's worth of its slots."""
        requests = running + waiting
        if requests <= 0:
            return 0.0
        batch = min(max(steady_batch, requests), self.batch_cap)
        if batch < 1.0:
            return math.inf
        tokens = running * self.output_len / 2 + waiting * self.output_len
        prefill = waiting * self.prefill_s / self.layout.pp
        return prefill + tokens * self.tpot(batch, rate) / min(requests, batch)


def _bisect(ok: Callable[[float], bool], lo: float, hi: float) -> float:
    """The boundary between `ok` (at lo) and not `ok` (at hi) of a monotone predicate."""
    while hi - lo > _BISECT_TOLERANCE * hi:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return lo


def _mix(layout: LayoutProfile, stats: LoadStats) -> _Mix:
    input_len = max(stats.mean_input_len, 1.0)
    output_len = max(stats.mean_output_len, 1.0)
    return _Mix(
        layout=layout,
        output_len=output_len,
        context_len=input_len + output_len / 2,
        prefill_s=layout.prefill_seconds(input_len),
        batch_cap=min(float(layout.seq_limit), layout.kv_capacity_tokens / (input_len + output_len)),
    )


def max_request_rate(layout: LayoutProfile, stats: LoadStats) -> float:
    """Requests per second `layout` sustains for this length mix: the rate at which the steady
    batch reaches the batch cap (or prefill alone fills every second)."""
    mix = _mix(layout, stats)
    if not mix.fits(0.0):
        return 0.0
    return _bisect(mix.fits, 0.0, layout.pp / mix.prefill_s if mix.prefill_s > 0 else 1e12)


def predict(layout: LayoutProfile, stats: LoadStats) -> Prediction:
    """Steady-state latencies and capacity of `layout` under `stats`' load.

    The model, kept simple so it stays monotone in the arrival rate:
    - Little's law for the running batch: B = rate * (prefill + (output-1) * TPOT(B)), where
      TPOT(B) is the profile's decode time at batch B and mean context input + output/2,
      divided by (1 - prefill share) because prefills interleave with decode steps. B is
      capped by max_num_seqs and by KV capacity (B * (input + output) tokens); no solution
      under the cap means saturated.
    - TTFT = prefill + half a decode step when something is already running (a new request
      waits for the step in flight) + an M/D/1 queueing wait rho / (2 (1 - rho)) * S with
      S = 1 / max_request_rate, + the time to drain the requests already waiting.
    - E2E = TTFT + (output - 1) * TPOT. Saturated layouts have infinite TTFT and E2E.
    - The requests in the system now (running and waiting, from `stats`) are not steady state:
      `drain_s` is how long this layout takes to finish them (`_Mix.drain_s`). After a burst, or
      in a batch job's tail with no arrivals, this is what tells layouts apart: the one with the
      most throughput at that concurrency drains fastest, be it high (large batches) or low.
    """
    mix = _mix(layout, stats)
    rate = stats.arrival_rate
    capacity = max_request_rate(layout, stats)
    utilisation = rate / capacity if capacity > 0 else math.inf
    in_system = stats.concurrency + stats.queue_len
    if capacity == 0 or (rate > 0 and utilisation >= 1.0):
        served = min(rate, capacity)
        return Prediction(
            ttft_s=math.inf, tpot_s=mix.tpot(mix.batch_cap, served), e2e_s=math.inf,
            throughput_tok_s=served * mix.output_len, max_request_rate=capacity,
            utilisation=utilisation, saturated=True, batch=mix.batch_cap, batch_cap=mix.batch_cap,
            in_system=in_system, drain_s=math.inf if in_system > 0 else 0.0)
    batch = _bisect(lambda b: rate * mix.running_s(b, rate) > b, 0.0, mix.batch_cap) if rate > 0 else 0.0
    tpot = mix.tpot(batch, rate)
    step_wait = (1.0 - math.exp(-batch)) * tpot / 2
    queue_wait = utilisation / (2 * (1 - utilisation)) / capacity
    drain = stats.queue_len / capacity
    ttft = mix.prefill_s + step_wait + queue_wait + drain
    return Prediction(
        ttft_s=ttft, tpot_s=tpot, e2e_s=ttft + (mix.output_len - 1) * tpot,
        throughput_tok_s=rate * mix.output_len, max_request_rate=capacity,
        utilisation=utilisation, saturated=False, batch=batch, batch_cap=mix.batch_cap, in_system=in_system,
        drain_s=mix.drain_s(stats.concurrency, stats.queue_len, batch, rate))


def _relative_gain(base: float, score: float) -> float:
    """How much better `score` is than `base`, as a share of |base|; inf from nothing or -inf."""
    return math.inf if base == 0 or math.isinf(base) else (score - base) / abs(base)


@dataclass(frozen=True)
class Decision:
    """The outcome of one `Policy.decide`: a layout to switch to (None: stay) and why."""

    target: str | None
    reason: str  # one line with the numbers behind it; logged and exported by the server
    scores: dict[str, float]  # per layout, in the unit of the regime named in `reason`
    predictions: dict[str, Prediction]


@dataclass(frozen=True)
class _Regime:
    """One way of scoring layouts: higher is better; the switch cost is in score * seconds."""

    name: str
    unit: str  # of score * seconds, for the reason
    scores: dict[str, float]


class Policy:
    """Chooses the layout to serve on from load statistics, with hysteresis.

    Scores, in the first regime that applies:
    - capacity: every layout is saturated, so serve as many requests as possible; score =
      max_request_rate; a switch costs the requests the pause does not serve.
    - goodput (SLOs given and some layout is predicted to meet them): score = rate x the
      predicted share of requests meeting the SLOs; a switch costs the requests whose SLOs
      the pause breaks.
    - latency: score = -(rate x E2E + the request-seconds the requests in the system now still
      spend in it within the horizon, per second of the horizon): latency accrued per second by
      the arrivals and by the requests already running or waiting (which is all there is in a
      batch job's tail); a switch costs the request-seconds the pause adds.
    A switch to the layout with the largest net gain (score gain x horizon - switch cost) is
    proposed when that net gain is positive and the relative score gain exceeds `margin`, at
    the estimated arrival rate and at both ends of its confidence interval (+-
    `rate_confidence_z` standard errors; 0 turns this off); it is returned once the same
    target has been proposed `confirm` decisions in a row and `dwell_s` has passed since the
    last switch.
    """

    def __init__(
        self,
        profile: Profile,
        slo_ttft_s: float | None = None,
        slo_tpot_s: float | None = None,
        horizon_s: float = 60.0,
        margin: float = 0.1,
        dwell_s: float = 30.0,
        confirm: int = 2,
        valid_layouts: Iterable[str | Topology] | None = None,
        rate_confidence_z: float = 2.0,
    ):
        allowed = None if valid_layouts is None else {str(v) for v in valid_layouts}
        self.candidates = [n for n in profile.layouts if allowed is None or n in allowed]
        if not self.candidates:
            raise ValueError(f"no layout is both in the profile ({', '.join(profile.layouts)}) and allowed")
        for name in self.candidates:
            Topology.parse(name)  # a profile's keys are layout names; refuse anything else
        if confirm < 1:
            raise ValueError(f"confirm must be at least 1, not {confirm}")
        self.profile = profile
        self.slo_ttft_s = slo_ttft_s
        self.slo_tpot_s = slo_tpot_s
        self.horizon_s = horizon_s
        self.margin = margin
        self.dwell_s = dwell_s
        self.confirm = confirm
        self.rate_confidence_z = rate_confidence_z
        self._last_switch = -math.inf
        self._proposed: str | None = None
        self._streak = 0

    def on_switched(self, now: float, target: str) -> None:
        """The server (or simulator) committed a switch to `target` at `now`."""
        del target  # the next decide() is told the current layout; only the time matters here
        self._last_switch = now
        self._proposed, self._streak = None, 0

    def decide(self, stats: LoadStats, current: str, now: float) -> Decision:
        if current not in self.profile.layouts:
            self._proposed, self._streak = None, 0
            return Decision(None, f"stay on {current}: it is not in the profile, so nothing can be "
                            f"predicted for it", {}, {})
        predictions = self._predict(stats, current)
        regime = self._regime(stats, predictions)
        options = self._options(regime, stats, predictions, current)
        band = self._rate_band(stats) if options else []
        for edge in band:
            edge_predictions = self._predict(edge, current)
            edge_options = self._options(self._regime(edge, edge_predictions), edge, edge_predictions, current)
            options = {t: o for t, o in options.items() if t in edge_options}
        if not options:
            self._proposed, self._streak = None, 0
            reason = self._stay_reason(regime, stats, predictions, current)
            if band:
                reason += (f"; a switch would pay at {stats.arrival_rate:.3g} req/s but not over its "
                           f"{band[0].arrival_rate:.3g}-{band[1].arrival_rate:.3g} req/s uncertainty")
            return Decision(None, reason, regime.scores, predictions)
        target = max(options, key=lambda t: (options[t][0] - options[t][1], regime.scores[t]))
        gain, cost = options[target]
        self._streak = self._streak + 1 if target == self._proposed else 1
        self._proposed = target
        why = (f"{self._load(stats)}; {regime.name} regime: {current} -> {target} "
               f"{self._compare(regime, predictions, current, target)}; gain {gain:.3g} {regime.unit} over "
               f"{self.horizon_s:g} s > switch cost {cost:.3g}")
        if self._streak < self.confirm:
            return Decision(None, f"hold on {current}: {why}; confirming ({self._streak}/{self.confirm})",
                            regime.scores, predictions)
        since = now - self._last_switch
        if since < self.dwell_s:
            return Decision(None, f"hold on {current}: {why}; dwell {since:.0f} s of {self.dwell_s:g} s since "
                            f"the last switch", regime.scores, predictions)
        return Decision(target, f"switch: {why}", regime.scores, predictions)

    def _predict(self, stats: LoadStats, current: str) -> dict[str, Prediction]:
        return {n: predict(self.profile.layouts[n], stats) for n in dict.fromkeys([current, *self.candidates])}

    def _rate_band(self, stats: LoadStats) -> list[LoadStats]:
        """The load at the low and high ends of the arrival rate's confidence interval.

        A rate counted from n arrivals has a relative standard error of about 1 / sqrt(n)
        (Poisson), so a switch that only pays at the estimate may be chasing noise; one that
        pays at both ends does not flap when the load sits near a boundary.
        """
        if self.rate_confidence_z == 0:
            return []
        error = self.rate_confidence_z / math.sqrt(max(stats.arrival_rate * stats.window_s, 1.0))
        return [replace(stats, arrival_rate=stats.arrival_rate * max(1.0 - error, 0.0)),
                replace(stats, arrival_rate=stats.arrival_rate * (1.0 + error))]

    # scoring

    def _regime(self, stats: LoadStats, predictions: dict[str, Prediction]) -> _Regime:
        if all(p.saturated for p in predictions.values()):
            return _Regime("capacity", "requests", {n: p.max_request_rate for n, p in predictions.items()})
        if self.slo_ttft_s is not None or self.slo_tpot_s is not None:
            goodput = {n: 0.0 if p.saturated else stats.arrival_rate * self._attainment(p.ttft_s, p.tpot_s)
                       for n, p in predictions.items()}
            if max(goodput.values()) > 0:
                return _Regime("goodput", "requests", goodput)
        return _Regime("latency", "request-s",
                       {n: -math.inf if p.saturated
                        else -(stats.arrival_rate * p.e2e_s + p.backlog_request_s(self.horizon_s) / self.horizon_s)
                        for n, p in predictions.items()})

    def _attainment(self, ttft_s: float, tpot_s: float) -> float:
        """Predicted share of requests within the SLOs.

        The predictions are means and single requests scatter around them, so a layout whose
        mean sits on the SLO meets it about half the time: the share falls linearly from 1 at
        half the SLO to 0 at 1.5 times it, per SLO, and the two SLOs are taken as independent.
        """
        share = 1.0
        for predicted, slo in ((ttft_s, self.slo_ttft_s), (tpot_s, self.slo_tpot_s)):
            if slo is not None:
                share *= min(1.0, max(0.0, 1.5 - predicted / slo))
        return share

    def _switch_cost(self, regime: _Regime, stats: LoadStats, predictions: dict[str, Prediction], source: str,
                     target: str) -> float:
        """What switching `source` -> `target` costs, in the regime's unit: its pause, and the
        running requests the target cannot hold (more than its sequence limit or KV capacity),
        which it preempts to recompute later, losing what they had generated."""
        current = predictions[source]
        pause = self.profile.switch_cost(source, target).pause_seconds
        in_system = stats.concurrency + stats.queue_len
        preempted = max(0.0, min(stats.concurrency, current.batch_cap) - predictions[target].batch_cap)
        if regime.name == "capacity":
            return current.max_request_rate * pause + preempted
        if regime.name == "goodput":
            # Everyone in the system or arriving during the pause waits out (part of) it: count
            # those whose SLOs the extra wait breaks, plus what the layout would have served.
            paused = self._attainment(current.ttft_s + pause, current.tpot_s + pause / self._decode_tokens(stats))
            lost = self._attainment(current.ttft_s, current.tpot_s) - paused
            return (regime.scores[source] * pause + (in_system + stats.arrival_rate * pause) * lost
                    + preempted * self._attainment(current.ttft_s, current.tpot_s))
        # Requests in the system wait the whole pause; arrivals during it wait half of it on average;
        # a preempted request generates again the half of its output it had, at the current TPOT.
        redo = preempted * stats.mean_output_len / 2 * current.tpot_s if current.tpot_s < math.inf else 0.0
        return in_system * pause + stats.arrival_rate * pause * pause / 2 + redo

    @staticmethod
    def _decode_tokens(stats: LoadStats) -> float:
        """Decode steps over which a pause spreads in one request's TPOT."""
        return max(stats.mean_output_len - 1.0, 1.0)

    def _options(self, regime: _Regime, stats: LoadStats, predictions: dict[str, Prediction],
                 current: str) -> dict[str, tuple[float, float]]:
        """(gain over the horizon, switch cost) of every target worth switching to."""
        base = regime.scores[current]
        options = {}
        for target in self.candidates:
            score = regime.scores[target]
            if target == current or score <= base:
                continue
            gain = (score - base) * self.horizon_s
            cost = self._switch_cost(regime, stats, predictions, current, target)
            if gain > cost and _relative_gain(base, score) > self.margin:
                options[target] = (gain, cost)
        return options

    # reasons

    @staticmethod
    def _load(stats: LoadStats) -> str:
        return (f"load {stats.arrival_rate:.3g} req/s, in {stats.mean_input_len:.0f} / out "
                f"{stats.mean_output_len:.0f} tokens, {stats.concurrency:.0f} running, {stats.queue_len:.0f} waiting")

    def _describe(self, regime: _Regime, p: Prediction) -> str:
        if regime.name == "capacity":
            return f"{p.max_request_rate:.3g} req/s capacity"
        if p.saturated:
            return "saturated"
        if regime.name == "goodput":
            return (f"TTFT {p.ttft_s * 1e3:.0f} ms, TPOT {p.tpot_s * 1e3:.1f} ms, "
                    f"{100 * self._attainment(p.ttft_s, p.tpot_s):.0f}% within SLOs")
        drain = f", {p.in_system:.0f} in system done in {p.drain_s:.3g} s" if p.in_system > 0 else ""
        return f"E2E {p.e2e_s:.3g} s (TTFT {p.ttft_s * 1e3:.0f} ms, TPOT {p.tpot_s * 1e3:.1f} ms{drain})"

    def _compare(self, regime: _Regime, predictions: dict[str, Prediction], current: str, target: str) -> str:
        return f"({self._describe(regime, predictions[current])} -> {self._describe(regime, predictions[target])})"

    def _stay_reason(self, regime: _Regime, stats: LoadStats, predictions: dict[str, Prediction],
                     current: str) -> str:
        others = [n for n in self.candidates if n != current]
        runner_up = max(others, key=lambda n: regime.scores[n], default=None)
        if runner_up is None:
            return f"stay on {current}: {self._load(stats)}; it is the only layout allowed"
        if regime.scores[runner_up] <= regime.scores[current]:
            return (f"stay on {current}: {self._load(stats)}; {regime.name} regime: best layout "
                    f"({self._describe(regime, predictions[current])}; next {runner_up}: "
                    f"{self._describe(regime, predictions[runner_up])})")
        base, score = regime.scores[current], regime.scores[runner_up]
        gain = (score - base) * self.horizon_s
        cost = self._switch_cost(regime, stats, predictions, current, runner_up)
        relative = _relative_gain(base, score)
        relative = f" by {100 * relative:.1f}%" if math.isfinite(relative) else ""
        return (f"stay on {current}: {self._load(stats)}; {regime.name} regime: {runner_up} is better{relative} "
                f"{self._compare(regime, predictions, current, runner_up)}, margin {100 * self.margin:g}%; gain "
                f"{gain:.3g} {regime.unit} over {self.horizon_s:g} s vs switch cost {cost:.3g}")
