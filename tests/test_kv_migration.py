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


# Data parallelism: each group holds its own requests' KV; a switch places requests and their blocks.

def test_requests_keep_their_group_and_blocks_when_dp_does_not_change():
    from remp.kv.placement import BlockSpace, RequestKV, place_requests

    reqs = [RequestKV(0, "a", 0, (0, 1), 2, (1, 1)), RequestKV(1, "b", 1, (16, 17, 18), 2, (1, 1, 1))]
    p = place_requests(reqs, BlockSpace(16), BlockSpace(16), 2, 2)
    assert p.groups == {0: 0, 1: 1} and p.renumber == {0: 0, 1: 1, 16: 16, 17: 17, 18: 18} and not p.overflow


def test_a_smaller_pool_keeps_the_ids_that_fit_and_leaves_out_the_newest_that_do_not():
    from remp.kv.placement import BlockSpace, RequestKV, place_requests

    reqs = [RequestKV(0, "a", 0, (5, 1), 1, (1, 1)), RequestKV(1, "b", 0, (0, 2), 1, (1, 1)),
            RequestKV(2, "c", 0, (3, 4), 1, (1, 1))]
    p = place_requests(reqs, BlockSpace(8), BlockSpace(4), 1, 1)
    # ids below 4 stay put before any block is given a new id; c no longer fits
    assert p.groups == {0: 0, 1: 0} and p.overflow == [2]
    assert p.renumber == {1: 1, 0: 0, 2: 2, 5: 3}


def test_more_groups_spread_whole_requests_and_fewer_gather_them():
    from remp.kv.placement import BlockSpace, RequestKV, place_requests

    reqs = [RequestKV(k, f"r{k}", 0, tuple(range(3 * k, 3 * k + 3)), 2, (1, 1, 1)) for k in range(4)]
    spread = place_requests(reqs, BlockSpace(32), BlockSpace(32), 1, 2)
    assert spread.groups == {0: 0, 1: 1, 2: 0, 3: 1}
    assert [spread.renumber[b] for b in reqs[1].blocks] == [32, 33, 34]  # lowest free ids of group 1
    assert [spread.renumber[b] for b in reqs[2].blocks] == [6, 7, 8]  # kept: same group, free
    moved = [RequestKV(k, r.request_id, spread.groups[k], tuple(spread.renumber[b] for b in r.blocks), 2, (1, 1, 1))
             for k, r in enumerate(reqs)]
    back = place_requests(moved, BlockSpace(32), BlockSpace(16), 2, 1)
    assert back.groups == {0: 0, 1: 0, 2: 0, 3: 0} and sorted(back.renumber.values()) == list(range(12))


def test_the_pause_keeps_the_places_the_precopy_used():
    from remp.kv.placement import BlockSpace, RequestKV, place_requests

    reqs = [RequestKV(0, "a", 0, (0, 1), 1, (1, 1)), RequestKV(1, "b", 0, (2,), 0, (1,))]
    plan = place_requests(reqs, BlockSpace(8), BlockSpace(8), 1, 2)
    later = [*reqs[:1], RequestKV(1, "b", 0, (2, 3), 1, (1, 1)), RequestKV(2, "c", 0, (4,), 0, (1,))]
    final = place_requests(later, BlockSpace(8), BlockSpace(8), 1, 2, keep=plan,
                           reserved={b: plan.renumber[b] for b in (0, 1, 2)})
    assert final.groups[0] == plan.groups[0] and final.groups[1] == plan.groups[1]
    assert all(final.renumber[b] == plan.renumber[b] for b in (0, 1, 2))
    assert len(set(final.renumber.values())) == len(final.renumber)  # no two blocks share a place


def test_kv_moves_go_between_the_groups_the_requests_leave_and_join(cfg):
    from remp.kv.migration import kv_moves
    from remp.kv.placement import BlockSpace, RequestKV, place_requests

    old, new = Topology(2, 1), Topology(1, 1, dp=2)  # tp2 -> two single-rank groups
    reqs = [RequestKV(0, "a", 0, (0, 1), 2, (1, 1)), RequestKV(1, "b", 0, (2,), 1, (1,))]
    placement = place_requests(reqs, BlockSpace(16), BlockSpace(16), 1, 2)
    moves = kv_moves(cfg, old, new, reqs, placement, {0, 1, 2}, BlockSpace(16), BlockSpace(16))
    assert [(m.src_dp, m.dst_dp, m.src_blocks, m.dst_blocks) for m in moves] == [(0, 0, [0, 1], [0, 1]),
                                                                                 (0, 1, [2], [0])]
    # group 1 is rank 1 alone: it gets every head of every layer, half of them from rank 0
    to_group1 = moves[1].transfers
    assert {t.dst_rank for t in to_group1} == {1} and {t.src_rank for t in to_group1} == {0, 1}
    assert sum(t.num_heads for t in to_group1) == cfg.num_layers * cfg.num_kv_heads


@pytest.mark.parametrize("old,new", [(Topology(2, 1), Topology(1, 1, dp=2)), (Topology(1, 2, dp=2), Topology(4, 1)),
                                     (Topology(1, 1, dp=4), Topology(2, 1, dp=2))], ids=str)
def test_plan_between_groups_covers_the_target_group_from_the_source_group(cfg, old, new):
    for src_dp in range(old.dp):
        for dst_dp in range(new.dp):
            plan = plan_kv_migration(cfg, old, new, src_dp, dst_dp)
            assert all(old.coords(t.src_rank).dp_rank == src_dp and new.coords(t.dst_rank).dp_rank == dst_dp
                       for t in plan)
            covered = {(t.layer, t.dst_rank, t.dst_head + i) for t in plan for i in range(t.num_heads)}
            wanted = {(layer, new.rank(new.stage_of(layer, cfg.num_layers), tp, dst_dp), h - new.kv_heads_of(
                tp, cfg.num_kv_heads).start) for layer in range(cfg.num_layers) for tp in range(new.tp)
                for h in new.kv_heads_of(tp, cfg.num_kv_heads)}
            assert covered == wanted


def test_a_group_takes_no_more_requests_than_its_sequence_limit():
    """Two groups of two running requests become one group of --max-num-seqs 3: the newest request
    is left out (the switch preempts it) though its blocks would fit."""
    from remp.kv.placement import BlockSpace, RequestKV, place_requests

    reqs = [RequestKV(k, f"r{k}", k % 2, (16 * (k % 2) + k // 2,), 1, (1,)) for k in range(4)]
    p = place_requests(reqs, BlockSpace(16), BlockSpace(32), 2, 1, seq_limit=3)
    assert p.groups == {0: 0, 1: 0, 2: 0} and p.overflow == [3]
    assert not place_requests(reqs, BlockSpace(16), BlockSpace(32), 2, 1).overflow
