"""`remp profile` on a mixture of experts: one engine on a pool of 2 walks a tensor-parallel, an
expert-parallel and a data-parallel expert-parallel layout of the tiny Mixtral and writes a profile
whose layouts carry their whole topology. Costs on a shared CPU are noisy: completeness and what
each layout's limits are, not speed, are checked."""
from __future__ import annotations

import itertools
import shutil

import pytest

from remp.cli import main
from remp.policy.profile import Profile
from remp.topology import Topology

LAYOUTS = ["tp2pp1", "tp2pp1ep", "dp2tp1pp1ep"]


def test_profile_measures_tp_ep_and_dp_ep_layouts(tiny_mixtral, tmp_path):
    model = shutil.copytree(tiny_mixtral, tmp_path / "model")
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", str(model), "--worker-pool-size", "2", "--layouts", ",".join(LAYOUTS),
              "--batch-sizes", "1,4", "--context-lens", "16", "--prefill-tokens", "16,64", "--max-model-len", "128",
              "--block-size", "4", "--num-kv-blocks", "256", "--threads-per-worker", "1"])
    assert exit_info.value.code == 0
    profile = Profile.load(model / "remp_profile.json")
    assert list(profile.layouts) == LAYOUTS
    for name, lp in profile.layouts.items():
        assert lp.topology == Topology.parse(name)
        assert (lp.num_kv_blocks, lp.max_num_seqs) == (256, 32)  # one group's
        assert sorted(p.batch_size for p in lp.decode) == [1, 4]
        assert all(p.seconds > 0 for p in [*lp.prefill, *lp.decode])
    dp = profile.layouts["dp2tp1pp1ep"]
    assert (dp.ep, dp.dp, dp.kv_capacity_tokens, dp.seq_limit) == (True, 2, 2 * 256 * 4, 64)
    assert set(profile.switch) == {f"{a}->{b}" for a, b in itertools.permutations(LAYOUTS, 2)}
    assert all(c.seconds >= c.pause_seconds > 0 for c in profile.switch.values())
