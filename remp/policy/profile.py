"""What each layout costs: the measured (or analytic) profile the policy and the simulator
predict from.

A profile holds, per layout, the wall time of one prefill step as a function of the prompt
tokens in it, and the wall time for every running sequence to advance one token (the TPOT at
that batch) as a function of batch size and context length — both as sample points, read back
by piecewise-linear interpolation (linear extrapolation past the last point, because step cost
grows roughly linearly in tokens once the matmuls are large). It also holds each layout's KV
capacity and the measured cost of switching between layouts, so a decision can weigh the gain
against the pause. `remp profile` writes it; `analytic_profile` builds one for machines we do not
have, from a roofline model.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path


def _interp(xs: list[float], ys: list[float], x: float) -> float:
    """Piecewise-linear through (xs, ys), sorted by x; linear extrapolation at both ends."""
    if len(xs) == 1:
        return ys[0] * (x / xs[0] if xs[0] else 1.0)
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
    return max(0.0, y0 + (y1 - y0) * (x - x0) / (x1 - x0))


@dataclass
class PrefillPoint:
    num_tokens: int  # prompt tokens in the step, summed over its sequences
    seconds: float  # wall time until every sequence in it has its first token


@dataclass
class DecodePoint:
    batch_size: int
    context_len: int  # tokens already in each sequence's KV
    seconds: float  # wall time for every one of the batch_size sequences to gain one token


@dataclass
class LayoutProfile:
    tp: int
    pp: int
    num_kv_blocks: int
    block_size: int
    max_num_seqs: int
    prefill: list[PrefillPoint]
    decode: list[DecodePoint]

    @property
    def name(self) -> str:
        return f"tp{self.tp}pp{self.pp}"

    @property
    def kv_capacity_tokens(self) -> int:
        return self.num_kv_blocks * self.block_size

    @cached_property
    def _prefill_table(self) -> tuple[list[float], list[float]]:
        pts = sorted(self.prefill, key=lambda p: p.num_tokens)
        return [p.num_tokens for p in pts], [p.seconds for p in pts]

    @cached_property
    def _decode_table(self) -> list[tuple[float, list[float], list[float]]]:
        """Per measured batch size (ascending): its contexts and seconds, sorted by context.
        Built once: the policy and the simulator read it thousands of times per decision."""
        rows: dict[int, list[DecodePoint]] = {}
        for p in self.decode:
            rows.setdefault(p.batch_size, []).append(p)
        table = []
        for b in sorted(rows):
            pts = sorted(rows[b], key=lambda p: p.context_len)
            table.append((float(b), [p.context_len for p in pts], [p.seconds for p in pts]))
        return table

    def prefill_seconds(self, num_tokens: float) -> float:
        return _interp(*self._prefill_table, num_tokens)

    def decode_seconds(self, batch_size: float, context_len: float) -> float:
        """TPOT at this batch: interpolate over context within each measured batch size,
        then across batch sizes."""
        sizes = [b for b, _, _ in self._decode_table]
        per_size = [_interp(xs, ys, context_len) for _, xs, ys in self._decode_table]
        return _interp(sizes, per_size, batch_size)


@dataclass
class SwitchCost:
    seconds: float  # whole transaction, most of it (prepare) overlapped with serving
    pause_seconds: float  # time in which no token is produced


@dataclass
class Profile:
    model: str
    pool_size: int
    device: str  # what it was measured on, in words ("cpu, 2 cores", "analytic: 8x H100")
    layouts: dict[str, LayoutProfile]
    switch: dict[str, SwitchCost] = field(default_factory=dict)  # key "tp1pp1->tp2pp1"

    def switch_cost(self, source: str, target: str) -> SwitchCost:
        """The measured cost, or the dearest one measured when this pair was not."""
        if source == target:
            return SwitchCost(0.0, 0.0)
        key = f"{source}->{target}"
        if key in self.switch:
            return self.switch[key]
        if not self.switch:
            raise KeyError(f"the profile has no switch costs (needed for {key})")
        return max(self.switch.values(), key=lambda c: c.seconds)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> Profile:
        raw = json.loads(Path(path).read_text())
        layouts = {}
        for name, lp in raw["layouts"].items():
            layouts[name] = LayoutProfile(
                tp=lp["tp"], pp=lp["pp"], num_kv_blocks=lp["num_kv_blocks"], block_size=lp["block_size"],
                max_num_seqs=lp["max_num_seqs"], prefill=[PrefillPoint(**p) for p in lp["prefill"]],
                decode=[DecodePoint(**p) for p in lp["decode"]])
        switch = {k: SwitchCost(**v) for k, v in raw.get("switch", {}).items()}
        return cls(model=raw["model"], pool_size=raw["pool_size"], device=raw["device"], layouts=layouts,
                   switch=switch)
