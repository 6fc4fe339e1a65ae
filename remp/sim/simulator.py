"""Replay a workload against a modelled serving instance, on a fixed layout or under a `Policy`.

The model follows the engine's scheduler (`remp.engine.scheduler`) one iteration at a time,
deciding through the same admission and preemption rules (`remp.engine.admission`): the
running requests that have their previous token reserve KV blocks for the next one
(preempting the newest running request not in flight when the cache is full), then waiting
requests are admitted first-come first-served while the sequence limit and free blocks allow,
then the iteration costs the profile's prefill time for the admitted prompt tokens plus one
decode step for the running batch at its mean context. A preempted request is recomputed: it
goes back to the front of the queue and prefills its prompt and the tokens it had generated.
A request whose latest token does not exist yet (its prefill still crosses the pipeline) is
in flight, as the engine's sequence in a step that has not returned is. The profile has no
token budget, so the simulator admits without one.

With pipeline parallelism a prefill's latency spans every stage but occupies each only for
1/pp of it, so the iteration advances the clock by prefill / pp and the admitted requests get
their first token when the whole prefill is done (and decode from the next iteration after).

Every `decision_interval_s` of simulated time the load seen so far goes through the same
`LoadTracker` and `Policy.decide` the server uses. A switch behaves like the reconfiguration
transaction: the old layout keeps serving while the target is prepared (switch seconds minus
pause), then nothing runs for the pause, then the new layout's KV capacity applies (the
newest requests are preempted until the live blocks fit). Nothing here is random: the
same workload and profile always give the same result.

A data-parallel layout is modelled as one pool: its groups' KV blocks and sequence limits add up
(`LayoutProfile.total_kv_blocks`, `seq_limit`), a request needs room in one group's cache, and
the profile's step costs are the whole instance's, its sequences spread evenly over the groups.
"""
from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from remp.bench.metrics import Metrics, RequestRecord, compute_metrics
from remp.bench.workload import WorkItem
from remp.engine.admission import admit, make_room, requeue, shrink
from remp.policy.profile import LayoutProfile, Profile
from remp.policy.stats import LoadTracker

if TYPE_CHECKING:  # only annotated here
    from remp.policy.policy import Policy


@dataclass
class LayoutChange:
    """The instance serves on `layout` from `t_s` (after `pause_s` without progress)."""

    t_s: float
    layout: str
    reason: str
    pause_s: float = 0.0


@dataclass
class SimResult:
    """Every request as `remp bench serve` would have measured it, the layouts served on, and
    the aggregates in the same terms as the benchmark's."""

    records: list[RequestRecord]  # in workload order; start_offset is the arrival time
    timeline: list[LayoutChange]
    metrics: Metrics
    preemptions: int

    def layout_seconds(self) -> dict[str, float]:
        """Simulated seconds spent on each layout, pauses counted with the layout they lead to."""
        end = self.metrics.duration_s
        spans: dict[str, float] = {}
        for change, following in zip(self.timeline, [*self.timeline[1:], None]):
            until = following.t_s - following.pause_s if following else end
            spans[change.layout] = spans.get(change.layout, 0.0) + max(until - change.t_s, 0.0) + change.pause_s
        return spans


@dataclass(eq=False)
class _Request:
    item: WorkItem
    record: RequestRecord
    generated: int = 0
    blocks: int = 0
    running: bool = False
    in_flight: bool = False  # its latest token is not out yet, or it is chosen for this iteration
    ready_at: float = 0.0  # when its latest token exists, so it can decode the next one
    last_token_s: float = 0.0

    @property
    def num_tokens(self) -> int:
        return self.item.input_len + self.generated


@dataclass
class _PendingSwitch:
    target: str
    reason: str
    commit_at: float  # the end of prepare: the pause starts at the first iteration boundary after


@dataclass
class _Instance:
    """The modelled engine: queue, running batch, KV blocks and the layout's profile."""

    profile: Profile
    layout: LayoutProfile
    name: str
    waiting: deque[_Request] = field(default_factory=deque)
    running: list[_Request] = field(default_factory=list)  # oldest admission first
    used_blocks: int = 0
    preemptions: int = 0

    @property
    def num_free(self) -> int:
        return self.layout.total_kv_blocks - self.used_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.layout.block_size)

    def preempt(self, req: _Request) -> None:
        self.used_blocks -= req.blocks
        req.blocks, req.running = 0, False
        requeue(req, self.running, self.waiting)
        self.preemptions += 1

    def reserve(self, req: _Request) -> bool:
        """Blocks for `req`'s next token, preempting the newest requests not in flight; False
        if `req` itself had to go."""
        need = self.blocks_needed(req.num_tokens) - req.blocks
        if need > self.num_free and not make_room(req, need, self, self.running, self.preempt):
            return False
        req.blocks += need
        self.used_blocks += need
        return True

    def admit(self, now: float) -> list[_Request]:
        """Waiting requests that fit, first come first served; those that never could fail (the
        engine refuses them when they are added: its cache holds its longest context). A request
        needs room in one data-parallel group's cache."""
        def never_fits(req: _Request, need: int) -> bool:
            if need <= self.layout.num_kv_blocks:
                return False
            req.record.error = (f"needs {need} KV blocks, more than the {self.layout.num_kv_blocks} of a group "
                                f"of {self.name}")
            req.record.latency = now - req.item.arrival_s
            return True

        admitted = []
        for req, need in admit(self.waiting, self.running, self.layout.seq_limit, math.inf, self, never_fits):
            req.blocks, req.running = need, True
            self.used_blocks += need
            admitted.append(req)
        return admitted

    def switch_to(self, name: str) -> None:
        """Serve on `name` from now; preempt the newest requests the new cache cannot hold."""
        self.name, self.layout = name, self.profile.layouts[name]
        layout = self.layout
        shrink(self.running, lambda: self.used_blocks <= layout.total_kv_blocks
               and len(self.running) <= layout.seq_limit, self.preempt)


class Simulator:
    """One run: feed it a workload with `run`. Use `simulate` unless you need the pieces."""

    def __init__(self, profile: Profile, layout: str, policy: Policy | None = None,
                 decision_interval_s: float = 5.0, window_s: float = 30.0):
        if layout not in profile.layouts:
            raise ValueError(f"layout {layout} is not in the profile ({', '.join(profile.layouts)})")
        if decision_interval_s <= 0:
            raise ValueError(f"decision_interval_s must be positive, not {decision_interval_s}")
        self.engine = _Instance(profile, profile.layouts[layout], layout)
        self.policy = policy
        self.interval = decision_interval_s
        self.tracker = LoadTracker(window_s)
        self.timeline = [LayoutChange(0.0, layout, "adaptive: initial layout" if policy else "fixed layout")]
        self.now = 0.0
        self.next_decision = decision_interval_s
        self.switch: _PendingSwitch | None = None

    def run(self, workload: Sequence[WorkItem]) -> list[RequestRecord]:
        requests = [_Request(item, RequestRecord(prompt_len=item.input_len, start_offset=item.arrival_s))
                    for item in workload]
        arrivals = deque(sorted(requests, key=lambda r: r.item.arrival_s))
        engine = self.engine
        while arrivals or engine.waiting or engine.running:
            self._control()
            while arrivals and arrivals[0].item.arrival_s <= self.now:
                self._arrive(arrivals.popleft())
            if not self._iterate():
                self.now = self._next_event(arrivals)
        return [r.record for r in requests]

    def _arrive(self, req: _Request) -> None:
        req.ready_at = req.item.arrival_s
        self.engine.waiting.append(req)
        self.tracker.on_arrival(req.item.arrival_s, req.item.input_len, req.item.output_len)

    def _iterate(self) -> bool:
        """One engine step at `now`; False when nothing could run yet."""
        engine, now = self.engine, self.now
        for req in engine.running:
            req.in_flight = req.ready_at > now
        decoding: list[_Request] = []
        for req in [r for r in engine.running if not r.in_flight]:
            if req.running and engine.reserve(req):  # not preempted for an older one
                req.in_flight = True
                decoding.append(req)
        admitted = engine.admit(now)
        if not decoding and not admitted:
            return False
        layout = engine.layout
        prefill_s = layout.prefill_seconds(sum(r.num_tokens for r in admitted)) if admitted else 0.0
        step_s = prefill_s / layout.pp
        if decoding:
            step_s += layout.decode_seconds(len(decoding), sum(r.num_tokens for r in decoding) / len(decoding))
        for req in decoding:
            self._token(req, now + step_s)
        for req in admitted:
            self._token(req, now + max(prefill_s, step_s))
        self.now = now + step_s
        return True

    def _token(self, req: _Request, t: float) -> None:
        record = req.record
        if req.generated == 0:
            record.ttft = t - req.item.arrival_s
        else:
            record.itl.append(t - req.last_token_s)
        req.generated += 1
        req.last_token_s = req.ready_at = t
        if req.generated >= req.item.output_len:
            self._finish(req)

    def _finish(self, req: _Request) -> None:
        engine, record = self.engine, req.record
        engine.running.remove(req)
        engine.used_blocks -= req.blocks
        req.blocks, req.running = 0, False
        record.success = True
        record.latency = req.last_token_s - req.item.arrival_s
        record.output_tokens = req.generated
        self.tracker.on_finish(req.last_token_s, req.generated)

    def _next_event(self, arrivals: deque[_Request]) -> float:
        """When something can next happen while the engine has nothing to run."""
        times = [r.ready_at for r in self.engine.running]
        if arrivals:
            times.append(arrivals[0].item.arrival_s)
        if self.switch:
            times.append(self.switch.commit_at)
        elif self.policy:
            times.append(self.next_decision)
        return max(min(times, default=self.now), self.now)

    # control: the policy loop and the reconfiguration transaction

    def _control(self) -> None:
        if self.switch and self.now >= self.switch.commit_at:
            self._commit(self.switch)
        elif self.policy and not self.switch and self.now >= self.next_decision:
            self._decide(self.policy)

    def _decide(self, policy: Policy) -> None:
        engine, now = self.engine, self.now
        self.next_decision = now + self.interval - (now - self.next_decision) % self.interval
        usage = engine.used_blocks / engine.layout.total_kv_blocks
        self.tracker.observe(now, len(engine.running), len(engine.waiting), usage)
        decision = policy.decide(self.tracker.stats(now), engine.name, now)
        if decision.target:
            cost = engine.profile.switch_cost(engine.name, decision.target)
            self.switch = _PendingSwitch(decision.target, decision.reason, now + cost.seconds - cost.pause_seconds)

    def _commit(self, switch: _PendingSwitch) -> None:
        engine = self.engine
        pause = engine.profile.switch_cost(engine.name, switch.target).pause_seconds
        self.now += pause
        engine.switch_to(switch.target)
        for req in engine.running:
            req.ready_at = max(req.ready_at, self.now)
        self.timeline.append(LayoutChange(self.now, switch.target, switch.reason, pause))
        self.switch = None
        if self.policy:
            self.policy.on_switched(self.now, switch.target)


def simulate(
    workload: Sequence[WorkItem],
    profile: Profile,
    layout: str,
    policy: Policy | None = None,
    slos_ms: Mapping[str, float] | None = None,
    decision_interval_s: float = 5.0,
    window_s: float = 30.0,
) -> SimResult:
    """Replay `workload` on `layout` (the starting one when a `policy` may switch).

    `slos_ms` ({"ttft": 500, "tpot": 50}, like `remp bench serve --goodput`) adds goodput to
    the metrics; the policy has SLOs of its own.
    """
    sim = Simulator(profile, layout, policy, decision_interval_s, window_s)
    records = sim.run(workload)
    duration = max((r.start_offset + r.latency for r in records), default=0.0)
    return SimResult(records=records, timeline=sim.timeline,
                     metrics=compute_metrics(records, duration or math.inf, slos_ms),
                     preemptions=sim.engine.preemptions)
