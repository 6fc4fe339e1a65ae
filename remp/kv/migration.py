"""Which KV bytes move where when the layout changes.

A pure function of the two layouts: for every layer and every KV head a rank holds under the
new layout, the rank that holds it under the old one. Pipeline changes move whole layers,
tensor changes move head slices (and replicate a head when the new tp exceeds the KV heads);
both at once compose. A slice a rank already holds is copied locally, never sent.
"""
from __future__ import annotations

from dataclasses import dataclass

from remp.config import ModelConfig
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


def _holders(topo: Topology, model: ModelConfig, layer: int, head: int) -> list[int]:
    stage = topo.stage_of(layer, model.num_layers)
    return [topo.rank(stage, t) for t in range(topo.tp) if head in topo.kv_heads_of(t, model.num_kv_heads)]


def plan_kv_migration(model: ModelConfig, old: Topology, new: Topology) -> list[KVTransfer]:
    """Every (layer, head range) each new owner needs, from one old owner — the destination itself
    when it already holds the slice, else the first old holder. Adjacent heads with the same
    source and destination are merged into one transfer."""
    transfers: list[KVTransfer] = []
    for layer in range(model.num_layers):
        stage = new.stage_of(layer, model.num_layers)
        for t in range(new.tp):
            dst = new.rank(stage, t)
            heads = new.kv_heads_of(t, model.num_kv_heads)
            for h in heads:
                holders = _holders(old, model, layer, h)
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
