"""Summarise scripts/ab_bench.sh's runs: per revision and round, saturated output tok/s per layout
and the light-load switch medians (total, prepare, pause), then each revision's mean over rounds."""
from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def main(out: Path) -> None:
    rows: dict[str, list[dict]] = {}
    for path in sorted(out.glob("serve-*.json")):
        _, rev, rnd = path.stem.split("-")
        serve = json.loads(path.read_text())
        switch = json.loads((out / f"switch-{rev}-{rnd}.json").read_text())
        pairs = [p for p in switch["pairs"] if p["outcome"] == "committed"]
        row = {"round": int(rnd), **{f"{r['layout']} tok/s": r["output_throughput"] for r in serve["runs"]},
               **{f"switch {k} ms": 1e3 * statistics.median(p["timings_s"][k] for p in pairs)
                  for k in ("total", "prepare", "pause")},
               "switches": f"{len(pairs)}/{len(switch['pairs'])}", "lost": switch["load"]["lost"]}
        rows.setdefault(rev, []).append(row)
    print((out / "cpu.txt").read_text().strip() if (out / "cpu.txt").exists() else "")
    keys = [k for k in next(iter(rows.values()))[0] if k != "round"]
    print("| revision | round | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for rev, runs in rows.items():
        for r in sorted(runs, key=lambda r: r["round"]):
            print(f"| {rev} | {r['round']} | " + " | ".join(_fmt(r[k]) for k in keys) + " |")
    for rev, runs in rows.items():
        means = {k: statistics.mean(r[k] for r in runs) for k in keys if isinstance(runs[0][k], float)}
        print(f"| {rev} | mean | " + " | ".join(_fmt(means.get(k, "")) for k in keys) + " |")


def _fmt(v) -> str:
    return f"{v:.1f}" if isinstance(v, float) else str(v)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
