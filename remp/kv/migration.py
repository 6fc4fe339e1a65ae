"""Which KV bytes move where when the layout changes.

A pure function of the two layouts: for every layer and every KV head a rank holds under the
new layout, the rank that holds it under the old one. Pipeline changes move whole layers,
tensor changes move head slices (and replicate a head when the new tp exceeds the KV heads);
both at once compose. A slice a rank already holds is copied locally, never sent.

With data parallelism each group holds the KV of its own requests, so the plan is per pair of
groups (`plan_kv_migration`'s src_dp, dst_dp) and applies to the blocks of the requests that go
from the one to the other (`kv_moves`, from a `remp.kv.placement.Placement`).
"""
from __future__ import annotations

from dataclasses import dataclass

from remp.config import ModelConfig
from remp.kv.placement import BlockSpace, Placement, RequestKV
from remp.topology import Topology


@dataclass(frozen=True)
class KVTransfer:
    """KV heads [src_head, src_head + num_heads) of `layer` in the source rank's local cache go
    to [dst_head, dst_head + num_heads) of the destination rank's new cache, for every live block."""

    layer: int
    src_rank: int
    dst_rank: int
    src_head: int
    dst_head: int
    num_heads: int


def _holders(topo: Topology, model: ModelConfig, layer: int, head: int, dp_rank: int) -> list[int]:
    stage = topo.stage_of(layer, model.num_layers)
    return [topo.rank(stage, t, dp_rank) for t in range(topo.tp) if head in topo.kv_heads_of(t, model.num_kv_heads)]


def plan_kv_migration(model: ModelConfig, old: Topology, new: Topology, src_dp: int = 0,
                      dst_dp: int = 0) -> list[KVTransfer]:
    """Every (layer, head range) each owner in group `dst_dp` of the new layout needs, from one
    owner in group `src_dp` of the old — the destination itself when it already holds the slice,
    else the first old holder. Adjacent heads with the same source and destination are merged
    into one transfer."""
    transfers: list[KVTransfer] = []
    for layer in range(model.num_layers):
        stage = new.stage_of(layer, model.num_layers)
        for t in range(new.tp):
            dst = new.rank(stage, t, dst_dp)
            heads = new.kv_heads_of(t, model.num_kv_heads)
            for h in heads:
                holders = _holders(old, model, layer, h, src_dp)
                src = dst if dst in holders else holders[0]
                src_t = old.coords(src).tp_rank
                src_head = h - old.kv_heads_of(src_t, model.num_kv_heads).start
                dst_head = h - heads.start
                last = transfers[-1] if transfers else None
                if (last and last.layer == layer and last.src_rank == src and last.dst_rank == dst
                        and last.src_head + last.num_heads == src_head and last.dst_head + last.num_heads == dst_head):
                    transfers[-1] = KVTransfer(layer, src, dst, last.src_head, last.dst_head, last.num_heads + 1)
                else:
                    transfers.append(KVTransfer(layer, src, dst, src_head, dst_head, 1))
    return transfers


def to_rows(transfers: list[KVTransfer]) -> list[list[int]]:
    """The transfers as the control plane carries them (JSON rows; `KVTransfer(*row)` undoes it)."""
    return [[t.layer, t.src_rank, t.dst_rank, t.src_head, t.dst_head, t.num_heads] for t in transfers]


def bytes_moved(transfers: list[KVTransfer], num_blocks: int, block_size: int, head_dim: int,
                dtype_bytes: int) -> int:
    """Bytes that cross between ranks (local copies excluded) for `num_blocks` live blocks."""
    per_head = num_blocks * 2 * block_size * head_dim * dtype_bytes
    return sum(t.num_heads * per_head for t in transfers if t.src_rank != t.dst_rank)


@dataclass(frozen=True)
class KVMove:
    """The KV of some blocks going from data-parallel group `src_dp` of the old layout to `dst_dp`
    of the new one: `transfers` between those groups' ranks, applied to every block; block
    src_blocks[i] of the old group's cache becomes dst_blocks[i] of the new group's (ids local to
    each group's cache)."""

    src_dp: int
    dst_dp: int
    transfers: list[KVTransfer]
    src_blocks: list[int]
    dst_blocks: list[int]


def kv_moves(model: ModelConfig, old: Topology, new: Topology, requests: list[RequestKV], placement: Placement,
             blocks: set[int], source: BlockSpace, target: BlockSpace, every_pair: bool = False) -> list[KVMove]:
    """The moves that carry `blocks` (global ids of the placed requests' blocks) to their places,
    one per pair of groups that has any (with `every_pair`, one per pair any placed request goes
    along, blocks or not), in (src_dp, dst_dp) order: every rank walks them in that order."""
    pairs: dict[tuple[int, int], tuple[list[int], list[int]]] = {}
    for req in requests:
        dst_dp = placement.groups.get(req.key)
        if dst_dp is None:
            continue
        if every_pair:
            pairs.setdefault((req.group, dst_dp), ([], []))
        for b in req.blocks:
            if b in blocks:
                src, dst = pairs.setdefault((req.group, dst_dp), ([], []))
                src.append(source.local(b))
                dst.append(target.local(placement.renumber[b]))
    return [KVMove(a, d, plan_kv_migration(model, old, new, a, d), src, dst)
            for (a, d), (src, dst) in sorted(pairs.items())]
