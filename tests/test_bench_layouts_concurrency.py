"""`remp bench layouts --concurrency`: its pure parts (options, run plan, serve flags, tables, plot)
and make-tiny-model's size options; no server is started."""

from __future__ import annotations

import argparse
import math

import pytest

from remp.bench.layouts import (
    LayoutRun,
    add_arguments,
    concurrency_grid,
    concurrency_prompts,
    concurrency_table,
    rate_table,
    run_plan,
    write_plot,
)
from remp.bench.server_process import serve_flags
from remp.cli import build_parser
from remp.testing.tiny_model import _build_config, _build_tokenizer, make_tiny_model
from remp.topology import Topology


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(["/model", *argv])


def test_options_parse():
    args = _parse("--concurrency", "1,2,4,8,16,32,64", "--no-hf", "--plot", "out.png",
                  "--serve-args", "--max-num-seqs 64")
    assert args.concurrency == [1, 2, 4, 8, 16, 32, 64]
    assert args.rates is None and args.no_hf and args.plot == "out.png"
    assert args.serve_args == "--max-num-seqs 64"
    assert _parse("--rates", "0.5,inf").rates == [0.5, math.inf]
    defaults = _parse()
    assert (defaults.concurrency, defaults.no_hf, defaults.plot, defaults.baseline) == (None, False, None, None)


@pytest.mark.parametrize("argv", [("--concurrency", "0,4"), ("--concurrency", "2,x"), ("--rates", "0,1")])
def test_bad_levels_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        _parse(*argv)
    assert "error" in capsys.readouterr().err


def test_run_plan():
    inf = math.inf
    assert run_plan(None, None, 32) == [(1.0, None, 32), (4.0, None, 32), (inf, None, 32)]
    assert run_plan(None, [1, 16, 64], 32) == [(inf, 1, 32), (inf, 16, 32), (inf, 64, 128)]
    assert run_plan([2.0], [4], 8) == [(2.0, None, 8), (inf, 4, 8)]
    assert [concurrency_prompts(c, 16) for c in (1, 8, 9, 64)] == [16, 16, 18, 128]


def test_serve_flags_start_the_layout():
    flags = {name: serve_flags(Topology.parse(name))
             for name in ("tp1pp1", "tp2pp1", "tp2pp1ep", "dp2tp1pp1ep", "dp2tp1pp1", "tp2pp1eprr")}
    assert flags["tp1pp1"] == ["-tp", "1", "-pp", "1", "-dp", "1"]
    assert flags["tp2pp1"] == ["-tp", "2", "-pp", "1", "-dp", "1"]
    assert flags["tp2pp1ep"] == ["-tp", "2", "-pp", "1", "-dp", "1", "--enable-expert-parallel",
                                 "--expert-placement-strategy", "linear"]
    assert flags["dp2tp1pp1ep"] == ["-tp", "1", "-pp", "1", "-dp", "2", "--enable-expert-parallel",
                                    "--expert-placement-strategy", "linear"]
    assert flags["dp2tp1pp1"] == ["-tp", "1", "-pp", "1", "-dp", "2"]
    assert flags["tp2pp1eprr"][-1] == "round_robin"
    # the flags parse back, through `remp serve`'s own parser, to the same layout
    for name, f in flags.items():
        a = build_parser().parse_args(["serve", "/model", *f])
        topo = Topology(a.tensor_parallel_size, a.pipeline_parallel_size, a.enable_expert_parallel,
                        a.data_parallel_size, a.expert_placement_strategy)
        assert str(topo) == name


def _runs() -> list[LayoutRun]:
    runs = []
    for layout, speed in (("tp1pp1", 100.0), ("tp2pp1ep", 50.0)):
        for c in (1, 4):
            runs.append(LayoutRun(layout, math.inf, speed * c, c / 2, 10.0 * c, 1000 / speed, 5000.0, 0,
                                  c, concurrency_prompts(c, 4), 20.0 * c, 1500 / speed))
    runs.append(LayoutRun("tp1pp1", 2.0, 80.0, 1.0, 30.0, 12.0, 4000.0, 0, None, 4))
    return runs


def test_concurrency_table_ratios_are_to_the_baseline_at_the_same_level():
    table = concurrency_table(_runs(), "tp1pp1")
    assert table[0].startswith("| layout | concurrency | requests | output tok/s | vs tp1pp1 |")
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in table[2:]]
    assert len(rows) == 4  # the open-loop run is not in it
    assert rows[0][:5] == ["tp1pp1", "1", "4", "100.0", "1.00x"]
    assert rows[3][:5] == ["tp2pp1ep", "4", "8", "200.0", "0.50x"]
    assert rows[3][7:9] == ["20.0", "30.0"]  # TPOT p50, p90
    assert concurrency_table(_runs(), "tp2pp1ep")[2].split("|")[5].strip() == "2.00x"


def test_grid_and_rate_table():
    grid = concurrency_grid(_runs())
    assert grid == ["| layout | c=1 | c=4 |", "|---|---|---|", "| tp1pp1 | 100 / 10 | 400 / 10 |",
                    "| tp2pp1ep | 50 / 20 | 200 / 20 |"]
    rates = rate_table(_runs(), None, 40.0)
    assert len(rates) == 3 and "| tp1pp1 | 2 | 80.0 | - | 2.00x |" in rates[2]


def test_plot_writes_a_png(tmp_path):
    from dataclasses import asdict

    result = {"host": {"cpu": "test CPU", "cores": 2}, "runs": [asdict(r) for r in _runs()]}
    path = tmp_path / "c.png"
    write_plot([result, result], str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_make_tiny_model_sizes():
    args = build_parser().parse_args(["make-tiny-model", "/d", "--arch", "mixtral", "--hidden-size", "512",
                                      "--num-layers", "8", "--intermediate-size", "1024", "--num-experts", "4"])
    assert (args.hidden_size, args.num_layers, args.intermediate_size, args.num_experts) == (512, 8, 1024, 4)
    tokenizer = _build_tokenizer()
    config = _build_config("mixtral", tokenizer, {"hidden_size": 512, "num_hidden_layers": 8,
                                                  "intermediate_size": 1024, "num_experts": 4})
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (512, 8, 1024)
    assert (config.num_local_experts, config.num_experts_per_tok, config.num_attention_heads) == (4, 2, 8)
    default = _build_config("mixtral", tokenizer)
    assert (default.hidden_size, default.num_hidden_layers, default.intermediate_size,
            default.num_local_experts) == (64, 4, 96, 8)
    qwen = _build_config("qwen3-moe", tokenizer, {"intermediate_size": 256, "num_experts": 16})
    assert (qwen.moe_intermediate_size, qwen.intermediate_size, qwen.num_experts) == (256, 256, 16)


@pytest.mark.parametrize("kwargs", [dict(variant="mixtral", hidden_size=100), dict(variant="gqa", num_experts=4),
                                    dict(variant="mixtral", num_experts=1), dict(variant="gqa", num_layers=0)])
def test_make_tiny_model_refuses_bad_sizes(kwargs, tmp_path):
    with pytest.raises(ValueError):
        make_tiny_model(tmp_path / "m", **kwargs)
    assert not (tmp_path / "m").exists()
