"""The admission and preemption rules (`remp.engine.admission`) on their own, and the engine's
scheduler and the simulator deciding alike through them. No workers."""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from remp.bench.metrics import RequestRecord
from remp.bench.workload import WorkItem
from remp.engine.admission import admit, make_room, requeue, shrink
from remp.engine.outputs import RequestMetrics
from remp.engine.sampling import SamplingParams
from remp.engine.scheduler import Scheduler, Sequence, SeqStatus
from remp.kv.blocks import BlockManager
from remp.policy.profile import DecodePoint, LayoutProfile, PrefillPoint, Profile
from remp.sim.simulator import Simulator, _Request


@dataclass(eq=False)
class Req:
    name: str
    num_tokens: int
    blocks: int = 0
    in_flight: bool = False


@dataclass
class Pool:
    """Counts blocks; 4 tokens a block."""

    size: int
    used: int = 0
    log: list[str] = field(default_factory=list)

    @property
    def num_free(self) -> int:
        return self.size - self.used

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // 4)


class Batch:
    """A queue and a running batch over a `Pool`, recording who was preempted."""

    def __init__(self, pool: Pool, running: list[Req], waiting: list[Req] = ()):
        self.pool, self.running, self.waiting = pool, list(running), deque(waiting)
        self.preempted: list[str] = []
        for r in self.running:
            pool.used += r.blocks

    def preempt(self, req: Req) -> None:
        self.pool.used -= req.blocks
        req.blocks = 0
        requeue(req, self.running, self.waiting)
        self.preempted.append(req.name)

    def admit(self, max_num_seqs: int = 8, budget: float = 1000, reject=None) -> list[str]:
        admitted = []
        for req, need in admit(self.waiting, self.running, max_num_seqs, budget, self.pool, reject):
            req.blocks = need
            self.pool.used += need
            admitted.append(req.name)
        return admitted


def names(reqs) -> list[str]:
    return [r.name for r in reqs]


def test_make_room_preempts_the_newest_requests_not_in_flight():
    a, b, c, d, e = (Req(n, 8, blocks=2) for n in "abcde")
    c.in_flight = e.in_flight = True  # c and e are in a step that has not returned
    batch = Batch(Pool(10), [a, b, c, d, e])
    assert batch.pool.num_free == 0
    assert make_room(a, 1, batch.pool, batch.running, batch.preempt)
    assert batch.preempted == ["d"] and names(batch.running) == ["a", "b", "c", "e"]
    assert make_room(a, 3, batch.pool, batch.running, batch.preempt)  # 2 free: b goes too
    assert batch.preempted == ["d", "b"] and names(batch.waiting) == ["b", "d"]  # the last preempted first


def test_make_room_preempts_the_request_itself_when_it_is_the_newest_that_can_give_way():
    a, b, c = (Req(n, 8, blocks=2) for n in "abc")
    a.in_flight = c.in_flight = True
    batch = Batch(Pool(6), [a, b, c])
    assert not make_room(b, 1, batch.pool, batch.running, batch.preempt)
    assert batch.preempted == ["b"] and names(batch.running) == ["a", "c"] and names(batch.waiting) == ["b"]
    assert make_room(a, 2, batch.pool, batch.running, batch.preempt)  # already free: nobody goes
    assert batch.preempted == ["b"]


def test_admit_is_first_come_first_served_and_nothing_overtakes():
    a, b, c = Req("a", 8), Req("b", 30), Req("c", 4)
    batch = Batch(Pool(8), [], [a, b, c])
    assert batch.admit() == ["a"]  # b needs 8 blocks, 6 are free: c, which fits, waits behind it
    assert names(batch.running) == ["a"] and names(batch.waiting) == ["b", "c"] and batch.pool.used == 2


def test_admit_stops_at_the_sequence_limit_and_the_token_budget():
    reqs = [Req(str(i), 8) for i in range(5)]
    batch = Batch(Pool(100), [Req("old", 4, blocks=1)], reqs)
    assert batch.admit(max_num_seqs=3) == ["0", "1"]  # the running one counts
    assert batch.admit(budget=20) == ["2", "3"]  # 8 + 8 tokens fit in 20, a third does not
    assert names(batch.running) == ["old", "0", "1", "2", "3"] and names(batch.waiting) == ["4"]


def test_admit_drops_what_reject_refuses_and_goes_on():
    a, huge, b = Req("a", 4), Req("huge", 400), Req("b", 4)
    batch = Batch(Pool(10), [], [a, huge, b])
    seen = []

    def reject(req: Req, need: int) -> bool:
        seen.append((req.name, need))
        return need > batch.pool.size

    assert batch.admit(reject=reject) == ["a", "b"] and not batch.waiting
    assert seen == [("a", 1), ("huge", 100), ("b", 1)]


def test_shrink_preempts_newest_first_until_it_fits():
    a, b, c = (Req(n, 8, blocks=2) for n in "abc")
    batch = Batch(Pool(6), [a, b, c])
    victims = shrink(batch.running, lambda: batch.pool.used <= 2, batch.preempt)
    assert names(victims) == ["c", "b"] and names(batch.running) == ["a"] and names(batch.waiting) == ["b", "c"]
    assert shrink(batch.running, lambda: True, batch.preempt) == []


def _seq(i: int, n: int) -> Sequence:
    return Sequence(i, f"r{i}", list(range(n)), SamplingParams(), 0, RequestMetrics(0.0))


def test_the_scheduler_never_preempts_a_sequence_in_flight():
    """a needs a block while b's prefill is still in the pipeline: a gives way, not b."""
    sched = Scheduler(BlockManager(3, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a, b = _seq(0, 4), _seq(1, 8)
    sched.add(a)
    [prefill_a] = sched.schedule(2)
    sched.add(b)
    assert [x.seq for x in sched.schedule(1)] == [b]  # admitted while a's prefill is in flight
    assert sched.step_done(prefill_a)
    a.output_token_ids.append(1)  # 5 tokens: a second block, none free
    assert sched.schedule(1) == []
    assert sched.running == [b] and list(sched.waiting) == [a] and a.status is SeqStatus.WAITING
    assert sched.num_preemptions == 1 and b.block_ids


def _layout(pp: int, num_kv_blocks: int) -> LayoutProfile:
    return LayoutProfile(tp=1, pp=pp, num_kv_blocks=num_kv_blocks, block_size=4, max_num_seqs=8,
                         prefill=[PrefillPoint(1, 0.01), PrefillPoint(64, 0.1)],
                         decode=[DecodePoint(1, 1, 0.01), DecodePoint(8, 64, 0.02)])


def test_the_simulator_preempts_as_the_scheduler_does():
    """The scheduler's case above in the simulator: with two pipeline stages b's prefill is
    still on its way (its first token is not out) when a needs its second block."""
    profile = Profile("made up", 2, "none", {"tp1pp2": _layout(2, 3)})
    sim = Simulator(profile, "tp1pp2")
    engine = sim.engine
    a = _Request(WorkItem(0.0, 4, 8), RequestRecord(4), generated=1, blocks=1, running=True, ready_at=0.1)
    b = _Request(WorkItem(0.0, 8, 8), RequestRecord(8), blocks=2, running=True, ready_at=0.3)
    engine.running, engine.used_blocks, sim.now = [a, b], 3, 0.1
    assert not sim._iterate()  # a gave way and cannot come back yet: nothing runs
    assert engine.running == [b] and list(engine.waiting) == [a] and engine.preemptions == 1
    assert not a.running and a.blocks == 0 and b.blocks == 2 and engine.used_blocks == 2
