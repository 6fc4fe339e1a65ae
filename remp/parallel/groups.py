"""Communication groups over the worker pool.

Every pool worker, active or standby, joins one world group at start. Tensor-parallel
groups are subgroups of it, one per pipeline stage, created the first time a layout is
used and cached by layout so returning to a layout seen before creates nothing.
`torch.distributed.new_group` is collective over the whole world, so every pool worker
calls `Groups.tp_group` for every layout in the same order — the engine broadcasts the
layout to all of them.
"""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist

from remp.topology import Topology


# How long a collective or a rendezvous may wait for a peer. A dead peer breaks its connections
# at once; this bounds the rare wait that cannot see that (a peer lost while groups are built).
DIST_TIMEOUT = timedelta(seconds=60)


def init_world(rank: int, world_size: int, init_method: str, backend: str) -> None:
    dist.init_process_group(backend=backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=DIST_TIMEOUT)


class Groups:
    def __init__(self, rank: int):
        """Called by every pool rank right after it joins the world (a collective)."""
        self.rank = rank
        self._tp: dict[tuple[int, int], list[dist.ProcessGroup]] = {}
        # KV pre-copied during a switch travels on a thread of its own while steps still pass
        # activations over the world group; gloo matches messages by group, peer and tag, so the
        # two streams get separate groups and cannot take each other's messages.
        self.migration = dist.new_group(list(range(dist.get_world_size())))

    def tp_group(self, topo: Topology) -> dist.ProcessGroup | None:
        """This rank's tensor-parallel group under `topo` (None on a standby rank)."""
        key = (topo.tp, topo.pp)
        if key not in self._tp:
            self._tp[key] = [dist.new_group(topo.tp_group_ranks(s)) for s in range(topo.pp)]
        coords = topo.coords(self.rank)
        return None if coords is None else self._tp[key][coords[0]]
