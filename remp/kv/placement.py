"""Where each running request's KV goes in a switch: its data-parallel group in the target
layout and the id each of its blocks takes there.

Each data-parallel group has its own block pool (its workers hold their own KV cache), so a block
is named globally by its group and its id in the group: `BlockSpace`. A switch that keeps the
number of groups keeps every request in its group; one that changes it (tp <-> dp, say) places
requests afresh, the oldest first, each in the group with the most free blocks, so whole requests
move to the group that serves them next. Within its group a block keeps its id where it fits and
is free, else takes the lowest free one. A request that does not fit the group it would go to (its
blocks, or a sequence slot under --max-num-seqs) is left out (`Placement.overflow`): the switch
preempts it, and it recomputes later.

Pure functions of the requests and the two layouts' sizes; the transaction calls `place_requests`
once while it prepares (what the pre-copy sends where) and again in the pause with the pre-copied
blocks held to their places.
"""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class BlockSpace:
    """Global KV block ids of a layout: block b of data-parallel group g is g * blocks_per_group + b."""

    blocks_per_group: int

    def group_of(self, block: int) -> int:
        return block // self.blocks_per_group

    def local(self, block: int) -> int:
        return block % self.blocks_per_group

    def to_global(self, group: int, local: int) -> int:
        return group * self.blocks_per_group + local


@dataclass(frozen=True)
class RequestKV:
    """A running request's KV blocks as a switch sees them."""

    key: int  # the engine's sequence id: ascending = older
    request_id: str
    group: int  # its data-parallel group now
    blocks: tuple[int, ...]  # global ids, in position order
    full: int  # how many leading blocks are full: never written again while the request holds them
    handouts: tuple[int, ...]  # each block's hand-out count now (a change means it was reused)


@dataclass
class Placement:
    """Each placed request's target group and each of its blocks' target global id."""

    groups: dict[int, int] = field(default_factory=dict)  # request key -> target group
    renumber: dict[int, int] = field(default_factory=dict)  # source global id -> target global id
    overflow: list[int] = field(default_factory=list)  # keys of requests left out (no room in their group), newest first


def place_requests(requests: list[RequestKV], source: BlockSpace, target: BlockSpace, source_dp: int,
                   target_dp: int, keep: Placement | None = None, reserved: dict[int, int] | None = None,
                   seq_limit: int | None = None) -> Placement:
    """Place `requests` in a target of `target_dp` groups of `target.blocks_per_group` blocks and
    at most `seq_limit` running requests each (a group's --max-num-seqs).

    A request keeps its group when the number of groups does not change, and the group `keep`
    gave it, if any; otherwise it goes to the group with the most free blocks among those with a
    free sequence slot (its own group on a tie, else the lowest). `reserved` (source id -> target
    id) holds blocks to places already decided (the pre-copied ones). Requests are placed oldest
    first; one whose blocks or sequence slot do not fit the group it would go to is left out
    (overflow)."""
    reserved = reserved or {}
    keep_groups = keep.groups if keep is not None else {}
    per_group = target.blocks_per_group
    taken = [set() for _ in range(target_dp)]
    for dst in reserved.values():
        taken[target.group_of(dst)].add(target.local(dst))
    load = [len(t) for t in taken]
    seqs = [0] * target_dp
    limit = seq_limit if seq_limit is not None else len(requests)
    placement = Placement()
    placed: list[tuple[RequestKV, int]] = []
    for req in sorted(requests, key=lambda r: r.key):  # each request's group
        fresh = sum(b not in reserved for b in req.blocks)
        if req.key in keep_groups:
            group = keep_groups[req.key]
        elif source_dp == target_dp:
            group = req.group
        else:
            group = min(range(target_dp), key=lambda g: (seqs[g] >= limit, load[g], g != req.group, g))
        if load[group] + fresh > per_group or seqs[group] >= limit:
            placement.overflow.append(req.key)
            continue
        placement.groups[req.key] = group
        load[group] += fresh
        seqs[group] += 1
        placed.append((req, group))
    rest: list[tuple[int, int]] = []
    for req, group in placed:  # blocks that keep their ids first, so none is displaced by a newcomer
        for b in req.blocks:
            local = source.local(b)
            if b in reserved:
                placement.renumber[b] = reserved[b]
            elif source.group_of(b) == group and local < per_group and local not in taken[group]:
                taken[group].add(local)
                placement.renumber[b] = target.to_global(group, local)
            else:
                rest.append((b, group))
    lowest = [0] * target_dp  # every id below it is taken: the lowest free one is at or above it
    for b, group in rest:
        while lowest[group] in taken[group]:
            lowest[group] += 1
        taken[group].add(lowest[group])
        placement.renumber[b] = target.to_global(group, lowest[group])
    placement.overflow.reverse()
    return placement
