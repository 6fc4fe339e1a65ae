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

A layout is the whole `Topology` (tp, pp, expert parallelism, data-parallel groups, expert
placement) and is keyed by its name, `str(Topology)`: "tp2pp1", "tp2pp1ep", "dp2tp1pp1ep".
Files written before a layout carried more than tp and pp load with the defaults (no expert
parallelism, one group). KV blocks and the sequence limit are a data-parallel group's, as the
engine configures each group's scheduler; `kv_capacity_tokens` and `seq_limit` are the whole
instance's.
"""
from __future__ import annotations

import bisect
import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from pathlib import Path

from remp.topology import Topology


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
    num_kv_blocks: int  # of one data-parallel group
    block_size: int
    max_num_seqs: int  # of one data-parallel group (each group schedules its own requests)
    prefill: list[PrefillPoint]  # the whole instance: a step's prompts spread over its groups
    decode: list[DecodePoint]  # the whole instance: batch_size counts every group's sequences
    ep: bool = False
    dp: int = 1
    placement: str = "linear"

    @classmethod
    def of(cls, topology: Topology, **costs) -> LayoutProfile:
        """The profile of `topology`'s layout with the given costs (the other fields)."""
        return cls(tp=topology.tp, pp=topology.pp, ep=topology.ep, dp=topology.dp, placement=topology.placement,
                   **costs)

    @property
    def topology(self) -> Topology:
        return Topology(self.tp, self.pp, self.ep, self.dp, self.placement)

    @property
    def name(self) -> str:
        return str(self.topology)

    @property
    def total_kv_blocks(self) -> int:
        """KV blocks of every data-parallel group together."""
        return self.dp * self.num_kv_blocks

    @property
    def kv_capacity_tokens(self) -> int:
        """Tokens of KV the whole instance holds (every group's cache)."""
        return self.total_kv_blocks * self.block_size

    @property
    def seq_limit(self) -> int:
        """Sequences the whole instance runs at once (every group's max_num_seqs)."""
        return self.dp * self.max_num_seqs

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
    switch: dict[str, SwitchCost] = field(default_factory=dict)  # key "tp1pp1->tp2pp1ep"

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
            layout = LayoutProfile(
                tp=lp["tp"], pp=lp["pp"], ep=bool(lp.get("ep", False)), dp=int(lp.get("dp", 1)),
                placement=lp.get("placement", "linear"), num_kv_blocks=lp["num_kv_blocks"],
                block_size=lp["block_size"], max_num_seqs=lp["max_num_seqs"],
                prefill=[PrefillPoint(**p) for p in lp["prefill"]], decode=[DecodePoint(**p) for p in lp["decode"]])
            if layout.name != name:
                raise ValueError(f"{path}: layout {name!r} holds the costs of {layout.name}")
            layouts[name] = layout
        switch = {k: SwitchCost(**v) for k, v in raw.get("switch", {}).items()}
        return cls(model=raw["model"], pool_size=raw["pool_size"], device=raw["device"], layouts=layouts,
                   switch=switch)
