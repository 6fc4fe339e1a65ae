"""The chaos soak in its short form (`remp bench chaos`): a server switching live under a
streaming load while workers are SIGKILLed or SIGSTOPped at random instants of the switches,
clients hang up and switches are asked for twice. Every request must come back exact, every
fault recovered, nothing wedged. docs/benchmarks.md has the long run (1,000 switches)."""
from __future__ import annotations

import json
import subprocess

import pytest
from helpers import REPO, remp

pytestmark = pytest.mark.slow


def test_chaos_soak_loses_and_corrupts_nothing(tiny_gqa, tmp_path):
    out = tmp_path / "chaos.json"
    result = subprocess.run(remp("bench", "chaos", tiny_gqa, "--switches", "50", "--faults", "10", "--seed", "3",
                                 "--output", str(out), "--server-log", str(tmp_path / "serve.log")),
                            cwd=REPO, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + (tmp_path / "serve.log").read_text()[-3000:]
    report = json.loads(out.read_text())
    assert report["switches"]["asked"] >= 50
    assert report["faults"]["injected"] >= 10
    assert report["faults"]["replacements"] >= 10
    requests = report["requests"]
    assert requests["finished"] > 0
    assert requests["lost"] == requests["duplicated"] == requests["corrupted"] == 0, requests["examples"]
    assert report["wedges"] == []
    assert all(f["recovery_s"] is not None for f in report["faults"]["each"])
    assert report["server_exit_code"] == 0
