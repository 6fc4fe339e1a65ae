"""The KV migration plan: every new owner gets every slice it needs, exactly once, from a rank
that held it; nothing already in place is sent."""
from __future__ import annotations

import itertools

import pytest

from remp.config import ModelConfig
from remp.kv.migration import bytes_moved, plan_kv_migration
from remp.topology import Topology

LAYOUTS = [Topology(1, 1), Topology(2, 1), Topology(1, 2), Topology(2, 2), Topology(4, 1), Topology(1, 4)]


@pytest.fixture(scope="module")
def cfg(tiny_gqa) -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_gqa)


@pytest.mark.parametrize("old,new", list(itertools.permutations(LAYOUTS, 2)), ids=str)
def test_plan_covers_every_new_slice_from_an_old_holder(cfg, old, new):
    plan = plan_kv_migration(cfg, old, new)
    got = {}
    for t in plan:
        s_stage, s_tp, _ = old.coords(t.src_rank)
        d_stage, d_tp, _ = new.coords(t.dst_rank)
        assert t.layer in old.layers_of(s_stage, cfg.num_layers) and t.layer in new.layers_of(d_stage, cfg.num_layers)
        src_heads = old.kv_heads_of(s_tp, cfg.num_kv_heads)
        dst_heads = new.kv_heads_of(d_tp, cfg.num_kv_heads)
        for i in range(t.num_heads):
            head = src_heads[t.src_head + i]
            assert head == dst_heads[t.dst_head + i]
            key = (t.layer, t.dst_rank, head)
            assert key not in got
            got[key] = t.src_rank
    wanted = {(layer, new.rank(new.stage_of(layer, cfg.num_layers), tp), h)
              for layer in range(cfg.num_layers) for tp in range(new.tp)
              for h in new.kv_heads_of(tp, cfg.num_kv_heads)}
    assert set(got) == wanted
    for (layer, dst, head), src in got.items():  # keep in place when the destination already held it
        coords = old.coords(dst)
        if coords and layer in old.layers_of(coords[0], cfg.num_layers) and \
                head in old.kv_heads_of(coords[1], cfg.num_kv_heads):
            assert src == dst


def test_examples(cfg):
    # tp1pp1 -> tp1pp2: layers 2,3 move from rank 0 to rank 1, both heads in one transfer each.
    moved = [t for t in plan_kv_migration(cfg, Topology(1, 1), Topology(1, 2)) if t.src_rank != t.dst_rank]
    assert [(t.layer, t.src_rank, t.dst_rank, t.num_heads) for t in moved] == [(2, 0, 1, 2), (3, 0, 1, 2)]
    # tp2pp1 -> tp4pp1: head 0 stays on rank 0 and is copied to rank 1; head 1 goes to ranks 2 and 3.
    plan = plan_kv_migration(cfg, Topology(2, 1), Topology(4, 1))
    layer0 = [(t.src_rank, t.dst_rank, t.src_head) for t in plan if t.layer == 0]
    assert layer0 == [(0, 0, 0), (0, 1, 0), (1, 2, 0), (1, 3, 0)]
    per_head = 3 * 2 * 16 * 8 * 4  # blocks * (k, v) * block_size * head_dim * bytes
    assert bytes_moved(plan, num_blocks=3, block_size=16, head_dim=8, dtype_bytes=4) == 4 * 3 * per_head
