"""Profiles keyed by the whole layout: expert-parallel and data-parallel names, the JSON round
trip, files that predate those fields, and what a data-parallel layout's limits add up to in the
policy and the simulator. No workers."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_policy import synthetic_layout

from remp.bench.workload import WorkItem
from remp.policy.policy import Policy, predict
from remp.policy.profile import DecodePoint, LayoutProfile, PrefillPoint, Profile, SwitchCost
from remp.policy.stats import LoadStats
from remp.sim.simulator import simulate
from remp.topology import Topology

DOCS = Path(__file__).resolve().parent.parent / "docs"


def layout(name: str, num_kv_blocks: int = 4096, max_num_seqs: int = 64) -> LayoutProfile:
    base = synthetic_layout(1, 1, base_ms=10, per_seq_ms=0.2, prefill_ms=20, num_kv_blocks=num_kv_blocks)
    return LayoutProfile.of(Topology.parse(name), num_kv_blocks=base.num_kv_blocks, block_size=base.block_size,
                            max_num_seqs=max_num_seqs, prefill=base.prefill, decode=base.decode)


def profile_of(*names: str) -> Profile:
    layouts = {name: layout(name) for name in names}
    switch = {f"{a}->{b}": SwitchCost(0.4, 0.1) for a in names for b in names if a != b}
    return Profile(model="synthetic-moe", pool_size=2, device="made up", layouts=layouts, switch=switch)


def test_layout_names_are_the_topology():
    assert layout("tp2pp1ep").name == "tp2pp1ep"
    assert layout("dp2tp1pp1ep").name == "dp2tp1pp1ep"
    assert layout("tp2pp1eprr").topology == Topology(2, 1, True, 1, "round_robin")
    dp = layout("dp2tp1pp1ep", num_kv_blocks=100, max_num_seqs=8)
    assert (dp.total_kv_blocks, dp.kv_capacity_tokens, dp.seq_limit) == (200, 200 * 16, 16)


def test_json_round_trip_keeps_ep_dp_and_placement(tmp_path):
    profile = profile_of("tp2pp1", "tp2pp1ep", "dp2tp1pp1ep", "tp2pp1eprr")
    path = tmp_path / "profile.json"
    profile.save(path)
    loaded = Profile.load(path)
    assert loaded == profile
    assert list(loaded.layouts) == ["tp2pp1", "tp2pp1ep", "dp2tp1pp1ep", "tp2pp1eprr"]
    assert loaded.layouts["dp2tp1pp1ep"].topology == Topology(1, 1, True, 2)
    assert loaded.switch_cost("tp2pp1", "dp2tp1pp1ep") == SwitchCost(0.4, 0.1)


def test_files_without_the_layout_fields_load_with_the_defaults(tmp_path):
    raw = json.loads((DOCS / "profile_smollm2_cpu.json").read_text())
    assert all("ep" not in lp and "dp" not in lp for lp in raw["layouts"].values())
    loaded = Profile.load(DOCS / "profile_smollm2_cpu.json")
    assert set(loaded.layouts) == set(raw["layouts"])
    for name, lp in loaded.layouts.items():
        assert (lp.ep, lp.dp, lp.placement, lp.name) == (False, 1, "linear", name)
    raw["layouts"]["tp1pp2"] = raw["layouts"]["tp1pp1"]  # a key that is not its layout's name
    (tmp_path / "bad.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="holds the costs of tp1pp1"):
        Profile.load(tmp_path / "bad.json")


def test_policy_and_simulator_take_ep_and_dp_layouts():
    """A data-parallel layout runs dp x max_num_seqs sequences with dp x the KV: the prediction's
    batch cap and the simulator's admission both count every group."""
    profile = profile_of("tp2pp1", "tp2pp1ep", "dp2tp1pp1ep")
    stats = LoadStats(window_s=30, arrival_rate=0.0, mean_input_len=100, mean_output_len=100,
                      concurrency=100, queue_len=0, kv_usage=0.1, now=0)
    assert predict(profile.layouts["dp2tp1pp1ep"], stats).batch_cap == 128
    assert predict(profile.layouts["tp2pp1ep"], stats).batch_cap == 64
    policy = Policy(profile, valid_layouts=[Topology(2, 1, True), "dp2tp1pp1ep"])
    assert policy.candidates == ["tp2pp1ep", "dp2tp1pp1ep"]
    items = [WorkItem(arrival_s=0.0, input_len=100, output_len=20) for _ in range(100)]
    one_group = sorted(r.ttft for r in simulate(items, profile, "tp2pp1ep").records)
    assert one_group[63] == pytest.approx(one_group[0]) and one_group[64] > one_group[63]  # 64 at once
    two_groups = sorted(r.ttft for r in simulate(items, profile, "dp2tp1pp1ep").records)
    assert two_groups[-1] == pytest.approx(two_groups[0])  # all 100 at once


def test_a_data_parallel_layout_profile_is_the_whole_instance():
    """Its decode points go up to every group's sequences together."""
    lp = LayoutProfile.of(Topology(1, 1, True, 4), num_kv_blocks=10, block_size=16, max_num_seqs=32,
                          prefill=[PrefillPoint(16, 0.01)], decode=[DecodePoint(128, 100, 0.05)])
    assert lp.seq_limit == 128 and lp.decode_seconds(128, 100) == pytest.approx(0.05)
