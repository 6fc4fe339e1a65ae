"""`remp bench peer` on the tiny model: remp's restart, load and live switches are measured, and a
peer that cannot run here (no venv) is reported with the reason instead of failing the run. The
vLLM side itself needs scripts/setup_vllm.sh (minutes, GBs) and is exercised by the benchmark,
not by CI."""
from __future__ import annotations

import argparse
import json

import pytest

from remp.bench import peer

pytestmark = pytest.mark.slow


def test_peer_bench_measures_remp_and_reports_a_missing_peer(tiny_gqa, tmp_path, capsys):
    parser = argparse.ArgumentParser()
    peer.add_arguments(parser)
    out = tmp_path / "peer.json"
    args = parser.parse_args([tiny_gqa, "--peer-python", str(tmp_path / "no-venv" / "python"), "--peer-modes", "eager",
                              "--num-prompts", "4", "--input-len", "16", "--output-len", "8",
                              "--serve-args", "--max-model-len 128 --threads-per-worker 1", "--json", str(out)])
    result = peer.run(args)

    remp = result["remp"]
    assert remp["restart_s"] > 0
    assert remp["load"]["completed"] == 4 and remp["load"]["failed"] == 0
    assert remp["load"]["output_throughput"] > 0
    assert [s["target"] for s in remp["switches"]] == ["tp1pp2", "tp1pp1"]
    assert all(s["outcome"] == "committed" and s["total_s"] >= s["pause_s"] > 0 for s in remp["switches"])
    assert "not found: run scripts/setup_vllm.sh" in result["peer"]["eager"]["error"]
    assert json.loads(out.read_text())["remp"]["load"] == remp["load"]
    report = capsys.readouterr().out
    assert "| remp tp1pp1 |" in report
    # The CPU every figure holds for, in the JSON and above the table.
    host = result["host"]
    assert host["cpu"] and host["cores"] >= 1 and f"on {host['cpu']}, {host['cores']} cores" in report


def test_ratios():
    remp = {"restart_s": 10.0, "load": {"output_throughput": 60.0},
            "switches": [{"outcome": "committed", "total_s": 0.5}, {"outcome": "committed", "total_s": 1.5},
                         {"outcome": "rolled_back", "total_s": 9.0}]}
    vllm = {"restart_s": 40.0, "load": {"output_throughput": 20.0}}
    assert peer.ratios(remp, vllm) == {"throughput_remp_over_peer": 3.0, "peer_restart_over_remp_switch": 40.0,
                                       "peer_restart_over_remp_restart": 4.0}


def test_unknown_peer_mode_is_refused(tiny_gqa):
    parser = argparse.ArgumentParser()
    peer.add_arguments(parser)
    with pytest.raises(SystemExit, match="unknown --peer-modes"):
        peer.run(parser.parse_args([tiny_gqa, "--peer-modes", "jit"]))
