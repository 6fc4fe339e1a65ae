"""`remp bench switch`: the pure parts — layout enumeration, the derived columns, the heatmap.

The end-to-end run starts a server per layout, far too slow for the unit suite.
"""
from __future__ import annotations

import pytest

from remp.bench.metrics import RequestRecord
from remp.bench.switch import Switch, score, summarise_load, summary_line, valid_layouts, write_heatmap
from remp.config import ModelConfig
from remp.topology import Topology, TopologyError


def _switch(source: str, target: str, pause_s: float, total_s: float, kv: int, outcome: str = "committed") -> Switch:
    return Switch(source=source, target=target, outcome=outcome, reason=None, pause_s=pause_s, total_s=total_s,
                  kv_bytes_moved=kv, kv_bytes_in_pause=kv // 4, weight_bytes_loaded=3 * 2**20, live_kv_blocks=2,
                  preempted=0, timings_s={"pause": pause_s, "drain": pause_s / 4, "commit": pause_s * 3 / 4,
                                          "total": total_s}, build_s={"groups": 0.001})


def test_valid_layouts_of_tiny_gqa_on_four_workers(tiny_gqa):
    model = ModelConfig.from_pretrained(tiny_gqa)
    layouts = valid_layouts(model, 4, data_parallel=False)
    assert [str(t) for t in layouts] == ["tp1pp1", "tp1pp2", "tp1pp3", "tp1pp4", "tp2pp1", "tp2pp2", "tp4pp1"]
    for tp in range(1, 6):
        for pp in range(1, 6):
            if Topology(tp, pp) not in layouts:
                with pytest.raises(TopologyError):
                    Topology(tp, pp).validate(model, 4)


def test_score_derives_speedup_floor_and_ratio():
    row = score(_switch("tp1pp1", "tp2pp1", pause_s=0.02, total_s=0.5, kv=4 * 2**20), restart_s=10.0,
                bandwidth=2 * 2**30)
    assert row.speedup == pytest.approx(20.0)
    assert row.floor_s == pytest.approx(4 / 2048)
    assert row.pause_over_floor == pytest.approx(0.02 / (4 / 2048))
    assert row.after_drain_over_floor == pytest.approx(0.015 / (4 / 2048))


def test_score_without_kv_or_commit_has_no_floor_or_speedup():
    idle = score(_switch("tp1pp1", "tp1pp2", 0.01, 0.25, kv=0), restart_s=5.0, bandwidth=1e9)
    assert idle.speedup == pytest.approx(20.0) and idle.floor_s is None and idle.pause_over_floor is None
    rolled = score(_switch("tp1pp2", "tp1pp1", 0.0, 0.3, kv=0, outcome="rolled_back"), restart_s=5.0,
                   bandwidth=1e9)
    assert rolled.speedup is None


def test_lost_requests_are_failures_and_wrong_lengths():
    records = [RequestRecord(prompt_len=8, success=True, output_tokens=32),
               RequestRecord(prompt_len=8, success=True, output_tokens=31),
               RequestRecord(prompt_len=8, error="HTTP 500: boom")]
    load = summarise_load(records, output_len=32)
    assert (load.issued, load.completed, load.lost) == (3, 1, 2)
    assert load.errors == ["31 tokens instead of 32", "HTTP 500: boom"]
    rows = [score(_switch("a", "b", 0.01, 1.0, 0), 4.0, 1e9), score(_switch("b", "a", 0.01, 0.5, 0), 4.0, 1e9)]
    assert summary_line(rows, load).endswith("median 6.0x, worst 4.0x; pause/floor median n/a (after the drain: "
                                             "n/a); requests lost 2/3")


def test_heatmap_is_written(tmp_path):
    layouts = ["tp1pp1", "tp2pp1", "tp1pp2"]
    rows = [score(_switch(a, b, 0.01 * (i + 1), 0.2 * (i + 1), kv=i * 2**20), restart_s=8.0, bandwidth=1e9)
            for i, (a, b) in enumerate((a, b) for a in layouts for b in layouts if a != b)]
    path = tmp_path / "switch.png"
    write_heatmap(rows, layouts, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
