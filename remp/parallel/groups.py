"""Communication groups over the worker pool.

Every pool worker, active or standby, joins one world, and at that moment every group any
layout of the pool can need: the tensor-parallel groups of every (dp, tp, pp) that fits the pool
and the stages expert parallelism exchanges tokens over (every aligned run of ranks: one group per
distinct set, layouts share them), a group over all ranks for the hidden
states a pipeline stage passes on, and another for KV migration. Forming groups is a
rendezvous, the one kind of wait that cannot see a lost peer (there is no connection to break
yet: the others wait for its key in the store). So all of it happens while the world forms —
when the engine knows that every member is up and watches them all — and never in the middle
of a switch. Joining the world is bounded by RENDEZVOUS_TIMEOUT; the groups after it, formed
within milliseconds of a world every member just joined, take DIST_TIMEOUT, which gloo also
applies to every operation on them (its point-to-point waits keep the timeout a group was
made with).

The world group itself carries no traffic. Dropping every reference to a group closes its
connections (see `Worker.reform`): a peer blocked in an exchange with a rank that left the
world then fails at once instead of waiting out DIST_TIMEOUT.
"""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from remp.topology import Topology


# How long joining the world may wait for a member. Every member is already running and told to
# join at the same moment (see LocalExecutor), so it takes milliseconds; a member lost meanwhile
# makes the others fail after this long.
RENDEZVOUS_TIMEOUT = timedelta(seconds=15)
# How long an exchange may wait for a peer. A dead peer breaks its connections at once and a
# stopped one is killed by the engine when its heartbeats stop; this bounds any wait left.
DIST_TIMEOUT = timedelta(seconds=60)


def init_world(rank: int, world_size: int, init_method: str, backend: str) -> None:
    """Join the world group at `init_method` (a file:// store), waiting at most RENDEZVOUS_TIMEOUT."""
    path = init_method.removeprefix("file://")
    store = dist.FileStore(path, world_size)
    store.set_timeout(RENDEZVOUS_TIMEOUT)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size,
                            timeout=RENDEZVOUS_TIMEOUT)


def rank_sets(pool_size: int) -> list[tuple[int, ...]]:
    """Every set of ranks that forms a group in some layout of the pool, in one order (every rank
    creates them in the same order: `new_group` is collective). Ranks are numbered stage-major,
    then data-parallel group, then tensor rank (remp.topology), so a tensor group of size n and
    a stage of dp * tp = n ranks are both an aligned run of n consecutive ranks: every such run of
    two or more ranks is a group."""
    return [tuple(range(start, start + size)) for size in range(2, pool_size + 1)
            for start in range(0, pool_size - size + 1, size)]


class Groups:
    def __init__(self, rank: int):
        """Called by every pool rank right after it joins the world (a collective)."""
        self.rank = rank
        everyone = list(range(dist.get_world_size()))
        # Hidden states between pipeline stages. Ranks are world ranks (the group spans them all).
        self.pipeline = dist.new_group(everyone, timeout=DIST_TIMEOUT)
        # KV pre-copied during a switch travels on a thread of its own while steps still pass
        # hidden states; gloo matches messages by group, peer and tag, so the two streams get
        # separate groups and cannot take each other's messages.
        self.migration = dist.new_group(everyone, timeout=DIST_TIMEOUT)
        # Tensor groups, and the stages that expert parallelism spreads experts over.
        self._runs = {ranks: dist.new_group(list(ranks), timeout=DIST_TIMEOUT) for ranks in rank_sets(len(everyone))}

    def tp_group(self, topo: Topology) -> dist.ProcessGroup | None:
        """This rank's tensor-parallel group under `topo` (None on a standby rank or when tp is 1)."""
        coords = topo.coords(self.rank)
        if coords is None or topo.tp == 1:
            return None
        return self._runs[tuple(topo.tp_group_ranks(coords.stage, coords.dp_rank))]

    def stage_group(self, topo: Topology) -> dist.ProcessGroup | None:
        """Every rank of this rank's stage under `topo` (all its data-parallel groups): where expert
        parallelism exchanges tokens. None on a standby rank or a stage of one rank."""
        coords = topo.coords(self.rank)
        if coords is None or topo.stage_size == 1:
            return None
        return self._runs[tuple(topo.stage_ranks(coords.stage))]
