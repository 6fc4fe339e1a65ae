"""Which requests hold KV blocks: the admission and preemption rules of continuous batching.

The engine's `Scheduler` and the simulator's modelled instance (`remp.sim.simulator`) both
decide through these functions, so a simulated run admits and preempts as the engine does.
Each keeps its own requests and block accounting (block ids in the engine, counts in the
simulator) and is reached through two small protocols; the functions here only choose who
runs, who waits and who gives way, and move requests between the queue and the running batch.

The rules:

* A running request that needs more blocks than are free takes them from the newest running
  request that is not in flight (a step holding it has not returned yet, or it is already
  chosen for the step being built, whose blocks that step will write). When the newest such
  request is the one in need, it gives way itself.
* Preemption is by recompute: the victim's blocks are freed and it rejoins the front of the
  queue, to prefill its tokens so far again when it is admitted next.
* Waiting requests are admitted first come first served from the front of the queue while the
  running batch is under its sequence limit and the next request's tokens fit both the step's
  token budget and the free blocks. The first that does not fit stops admission: nothing
  behind it overtakes it.

Stdlib only: the simulator imports it without the engine's dependencies.
"""
from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol, TypeVar


class Request(Protocol):
    """A request as the rules see it."""

    in_flight: bool  # held by a step not yet returned, or chosen for the step being built

    @property
    def num_tokens(self) -> int:
        """Its prompt and the tokens generated so far: what a prefill of it computes."""


class BlockPool(Protocol):
    """The KV blocks of one instance, as the rules see them."""

    @property
    def num_free(self) -> int: ...

    def blocks_needed(self, num_tokens: int) -> int: ...


R = TypeVar("R", bound=Request)


def make_room(seq: R, need: int, pool: BlockPool, running: list[R], preempt: Callable[[R], None]) -> bool:
    """Preempt until `need` blocks are free for the running request `seq`: each time the newest
    running request that is not in flight (`seq` itself when it is that one). `preempt` frees
    a victim's blocks and requeues it (see `requeue`). False if `seq` itself was preempted."""
    while need > pool.num_free:
        victim = next((s for s in reversed(running) if not s.in_flight), seq)
        preempt(victim)
        if victim is seq:
            return False
    return True


def requeue(seq: R, running: list[R], waiting: deque[R]) -> None:
    """Move a preempted `seq` from the running batch to the front of the queue."""
    running.remove(seq)
    waiting.appendleft(seq)


def admit(waiting: deque[R], running: list[R], max_num_seqs: int, budget: float, pool: BlockPool,
          reject: Callable[[R, int], bool] | None = None) -> Iterator[tuple[R, int]]:
    """Admit waiting requests first come first served; yields (request, blocks it needs).

    Each admitted request is already moved from the front of `waiting` to the end of `running`
    (the newest) when it is yielded; the caller gives it its blocks before asking for the next,
    which is checked against the blocks then free. `budget` is how many tokens the step still
    takes. `reject(request, blocks)`, when given, sees the front request first and drops it from
    the queue when it returns True (one that can never run).
    """
    while waiting and len(running) < max_num_seqs:
        seq = waiting[0]
        n = seq.num_tokens
        need = pool.blocks_needed(n)
        if reject is not None and reject(seq, need):
            waiting.popleft()
            continue
        if n > budget or need > pool.num_free:
            return
        waiting.popleft()
        running.append(seq)
        budget -= n
        yield seq, need


def shrink(running: list[R], fits: Callable[[], bool], preempt: Callable[[R], None]) -> list[R]:
    """Preempt the newest running requests until `fits()` (a smaller cache or batch after a
    layout switch); returns them, newest first."""
    preempted = []
    while running and not fits():
        victim = running[-1]
        preempt(victim)
        preempted.append(victim)
    return preempted
