"""`remp profile`: one engine on a pool of 2 walks three layouts of the tiny model and writes a
profile next to the model that loads back with every layout, point and ordered switch in it.
Costs on a shared CPU are noisy, so only completeness and positivity are checked."""
from __future__ import annotations

import dataclasses
import itertools
import shutil

import pytest

from remp.cli import main
from remp.config import ModelConfig
from remp.policy.profile import Profile
from remp.topology import Topology, valid_layouts

LAYOUTS = ["tp1pp1", "tp1pp2", "tp2pp1"]
BATCH_SIZES = [1, 4]
CONTEXT_LENS = [16, 48]
PREFILL_TOKENS = [16, 64]


def run_cli(*args: str) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["profile", *args])
    return exit_info.value.code


def test_valid_layouts(tiny_gqa):
    model = ModelConfig.from_pretrained(tiny_gqa)  # 8 query / 2 KV heads, 4 layers
    assert [str(t) for t in valid_layouts(model, 4)] == [
        "tp1pp1", "tp1pp2", "tp1pp3", "tp1pp4", "tp2pp1", "tp2pp2", "tp4pp1",
        "dp2tp1pp1", "dp2tp1pp2", "dp2tp2pp1", "dp3tp1pp1", "dp4tp1pp1"]
    smollm2 = dataclasses.replace(model, num_heads=9, num_kv_heads=3, num_layers=30)
    assert valid_layouts(smollm2, 4, data_parallel=False) == [Topology(1, 1), Topology(1, 2), Topology(1, 3),
                                                              Topology(1, 4), Topology(3, 1)]


def test_profile_cli_writes_complete_profile(tiny_gqa, tmp_path):
    model = shutil.copytree(tiny_gqa, tmp_path / "model")
    code = run_cli(str(model), "--worker-pool-size", "2", "--layouts", ",".join(LAYOUTS),
                   "--batch-sizes", ",".join(map(str, BATCH_SIZES)), "--context-lens", ",".join(map(str, CONTEXT_LENS)),
                   "--prefill-tokens", ",".join(map(str, PREFILL_TOKENS)), "--max-model-len", "128",
                   "--block-size", "4", "--num-kv-blocks", "256", "--threads-per-worker", "1")
    assert code == 0
    profile = Profile.load(model / "remp_profile.json")
    assert (profile.model, profile.pool_size) == ("model", 2)
    assert list(profile.layouts) == LAYOUTS
    for name, lp in profile.layouts.items():
        assert lp.name == name
        assert (lp.num_kv_blocks, lp.block_size, lp.max_num_seqs) == (256, 4, 32)
        assert sorted(p.num_tokens for p in lp.prefill) == PREFILL_TOKENS
        assert sorted(p.batch_size for p in lp.decode) == sorted(BATCH_SIZES * len(CONTEXT_LENS))
        assert min(p.context_len for p in lp.decode) >= min(CONTEXT_LENS)
        assert all(p.seconds > 0 for p in [*lp.prefill, *lp.decode])
        assert lp.prefill_seconds(32) > 0 and lp.decode_seconds(2, 32) > 0
    assert set(profile.switch) == {f"{a}->{b}" for a, b in itertools.permutations(LAYOUTS, 2)}
    assert all(c.seconds >= c.pause_seconds > 0 for c in profile.switch.values())


def test_profile_cli_rejects_invalid_layout(tiny_gqa, tmp_path, capsys):
    assert run_cli(tiny_gqa, "--worker-pool-size", "4", "--layouts", "tp1pp1,tp3pp1",
                   "--output", str(tmp_path / "p.json")) == 2
    assert "does not divide" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()
