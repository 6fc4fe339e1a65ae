"""The parallel layout as a value.

A `Topology` answers every ownership question — which stage holds a layer, which tensor
rank holds a query head, a KV head, a slice of the MLP or of the vocabulary, which global
rank a (stage, tp rank, dp rank) is, who holds an expert — for weights, KV cache and communication
groups alike.
Nothing else in remp computes ownership; a switch is the difference of two Topology values.
"""
from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:  # read for its sizes only: the topology needs neither torch nor transformers
    from remp.config import ModelConfig


class TopologyError(ValueError):
    """A layout that cannot run this model on this pool; the message says why."""


def split_range(n: int, parts: int, index: int) -> range:
    """Contiguous balanced split of range(n) into `parts`; the first n % parts parts get
    one more element."""
    base, extra = divmod(n, parts)
    start = index * base + min(index, extra)
    return range(start, start + base + (1 if index < extra else 0))


PLACEMENTS = ("linear", "round_robin")  # vLLM's --expert-placement-strategy values


class Coords(NamedTuple):
    """Where a rank sits in a layout: its pipeline stage, its tensor rank within its data-parallel
    group, and that group."""

    stage: int
    tp_rank: int
    dp_rank: int


@dataclass(frozen=True)
class Topology:
    """dp × tp × pp layout over ranks 0 .. dp*tp*pp-1 of the worker pool (the rest are standby).

    Rank numbering is stage-major, then data-parallel group, then tensor rank:
    rank = stage * dp * tp + dp_rank * tp + tp_rank, so each stage's ranks are a contiguous run,
    and each data-parallel group's tensor group a contiguous run within it. With dp = 1 (the
    default) this is the plain tp × pp layout.

    Attention is tensor-parallel within each data-parallel group; each group runs its own
    requests with its own KV cache (data-parallel attention; a dense model is dp replicas). A
    mixture-of-experts layer runs either tensor-parallel within the group (each expert cut over
    its width) or, with `ep`, expert-parallel over all dp * tp ranks of the stage: each holds
    whole experts (`experts_of`, placed linearly or round-robin).
    """

    tp: int = 1
    pp: int = 1
    ep: bool = False  # expert parallelism over the stage's dp*tp ranks (vLLM's --enable-expert-parallel)
    dp: int = 1  # data-parallel groups (vLLM's --data-parallel-size)
    placement: str = "linear"  # of experts under ep (vLLM's --expert-placement-strategy)

    def __str__(self) -> str:
        dp = f"dp{self.dp}" if self.dp > 1 else ""
        ep = ("eprr" if self.placement == "round_robin" else "ep") if self.ep else ""
        return f"{dp}tp{self.tp}pp{self.pp}{ep}"

    @classmethod
    def parse(cls, name: str) -> "Topology":
        """The inverse of str(): 'tp2pp4' -> Topology(2, 4); 'tp2pp1ep' -> Topology(2, 1, ep=True);
        'dp2tp1pp1ep' -> Topology(1, 1, ep=True, dp=2); 'eprr' places experts round-robin."""
        m = re.fullmatch(r"(?:dp(\d+))?tp(\d+)pp(\d+)(ep(rr)?)?", name.strip())
        if m is None:
            raise TopologyError(f"a layout is written [dpZ]tpXppY[ep|eprr] (e.g. tp2pp1, dp2tp1pp1ep), got {name!r}")
        dp, tp, pp, ep, rr = m.groups()
        return cls(int(tp), int(pp), ep is not None, int(dp or 1), "round_robin" if rr else "linear")

    def as_dict(self) -> dict:
        """The layout as the API writes it (POST /v1/admin/reconfigure, GET /v1/admin/topology)."""
        return {"tensor_parallel_size": self.tp, "pipeline_parallel_size": self.pp, "data_parallel_size": self.dp,
                "enable_expert_parallel": self.ep, "expert_placement_strategy": self.placement}

    @classmethod
    def from_dict(cls, layout: dict) -> "Topology":
        """The inverse of as_dict(), for a reply of the API (absent keys take their defaults)."""
        return cls(layout["tensor_parallel_size"], layout["pipeline_parallel_size"],
                   bool(layout.get("enable_expert_parallel", False)), int(layout.get("data_parallel_size", 1)),
                   layout.get("expert_placement_strategy", "linear"))

    @property
    def world_size(self) -> int:
        """Ranks the layout uses (the active part of the pool)."""
        return self.dp * self.tp * self.pp

    @property
    def stage_size(self) -> int:
        """Ranks per pipeline stage (dp * tp): the expert-parallel group under `ep`."""
        return self.dp * self.tp

    @property
    def ep_size(self) -> int:
        """Ranks the experts of a layer are spread over (1: every rank holds every expert, cut)."""
        return self.stage_size if self.ep else 1

    @property
    def exchanges_tokens(self) -> bool:
        """Whether a mixture-of-experts layer sends tokens between data-parallel groups (all-to-all):
        expert parallelism with dp > 1. With dp = 1 the tensor all-reduce combines the experts."""
        return self.ep and self.dp > 1

    def validate(self, model: ModelConfig, pool_size: int) -> None:
        """Raise TopologyError unless this layout can serve `model` on `pool_size` workers."""
        if self.tp < 1 or self.pp < 1 or self.dp < 1:
            raise TopologyError(f"data, tensor and pipeline parallel sizes must be >= 1, "
                                f"got dp={self.dp} tp={self.tp} pp={self.pp}")
        if model.num_heads % self.tp:
            raise TopologyError(f"tensor_parallel_size {self.tp} does not divide the "
                                f"{model.num_heads} attention heads")
        kv = model.num_kv_heads
        if kv % self.tp and self.tp % kv:
            raise TopologyError(f"tensor_parallel_size {self.tp} must divide or be a multiple "
                                f"of the {kv} key/value heads")
        if self.pp > model.num_layers:
            raise TopologyError(f"pipeline_parallel_size {self.pp} exceeds the "
                                f"{model.num_layers} layers")
        if self.world_size > pool_size:
            raise TopologyError(f"dp*tp*pp = {self.world_size} workers needed but the pool has {pool_size}")
        if self.placement not in PLACEMENTS:
            raise TopologyError(f"expert_placement_strategy must be one of {', '.join(PLACEMENTS)}, "
                                f"got {self.placement!r}")
        if self.placement != "linear" and not self.ep:
            raise TopologyError("expert_placement_strategy round_robin places experts under expert "
                                "parallelism: set enable_expert_parallel too")
        if self.ep:
            if model.moe is None:
                raise TopologyError(f"enable_expert_parallel needs a mixture-of-experts model; "
                                    f"{model.architecture} is dense")
            if model.moe.num_experts % self.ep_size:
                raise TopologyError(f"expert parallelism over dp*tp = {self.ep_size} ranks needs the "
                                    f"{model.moe.num_experts} experts to divide evenly over them")

    # ranks
    def rank(self, stage: int, tp_rank: int, dp_rank: int = 0) -> int:
        return (stage * self.dp + dp_rank) * self.tp + tp_rank

    def coords(self, rank: int) -> Coords | None:
        """(stage, tp_rank, dp_rank) of a global rank, or None for a standby rank."""
        if rank >= self.world_size:
            return None
        stage, within = divmod(rank, self.stage_size)
        dp_rank, tp_rank = divmod(within, self.tp)
        return Coords(stage, tp_rank, dp_rank)

    def tp_group_ranks(self, stage: int, dp_rank: int = 0) -> list[int]:
        return [self.rank(stage, t, dp_rank) for t in range(self.tp)]

    def stage_ranks(self, stage: int) -> list[int]:
        """Every rank of a stage, all its data-parallel groups (the expert-parallel group under `ep`)."""
        return list(range(stage * self.stage_size, (stage + 1) * self.stage_size))

    def ep_rank(self, coords: Coords) -> int:
        """A rank's place among the ranks its stage spreads experts over (dp_rank * tp + tp_rank)."""
        return coords.dp_rank * self.tp + coords.tp_rank

    # layers
    def layers_of(self, stage: int, num_layers: int) -> range:
        return split_range(num_layers, self.pp, stage)

    def stage_of(self, layer: int, num_layers: int) -> int:
        return next(s for s in range(self.pp) if layer in self.layers_of(s, num_layers))

    # heads
    def heads_of(self, tp_rank: int, num_heads: int) -> range:
        return split_range(num_heads, self.tp, tp_rank)

    def kv_heads_of(self, tp_rank: int, num_kv_heads: int) -> range:
        """KV heads this tensor rank holds: an even split when tp <= kv heads, else one
        head replicated on tp / kv_heads consecutive ranks."""
        if self.tp <= num_kv_heads:
            return split_range(num_kv_heads, self.tp, tp_rank)
        head = tp_rank // (self.tp // num_kv_heads)
        return range(head, head + 1)

    # column/row parallel dimensions
    def mlp_slice(self, tp_rank: int, intermediate_size: int) -> range:
        return split_range(intermediate_size, self.tp, tp_rank)

    # experts
    def experts_of(self, coords: Coords, num_experts: int) -> range:
        """The experts a rank holds: under expert parallelism, its share of them — a contiguous
        block (linear placement) or every ep_size-th (round-robin) —, else every expert (each
        cut by `expert_slice`)."""
        if not self.ep:
            return range(num_experts)
        ep_rank = self.ep_rank(coords)
        if self.placement == "round_robin":
            return range(ep_rank, num_experts, self.ep_size)
        return split_range(num_experts, self.ep_size, ep_rank)

    def expert_owner(self, expert: int, num_experts: int) -> int:
        """The ep rank (see `ep_rank`) that holds `expert` whole under expert parallelism."""
        if self.placement == "round_robin":
            return expert % self.ep_size
        return expert // (num_experts // self.ep_size)

    def expert_slice(self, tp_rank: int, intermediate_size: int) -> range:
        """The intermediate features of each expert it holds: whole under expert parallelism,
        else the dense MLP's cut."""
        return range(intermediate_size) if self.ep else self.mlp_slice(tp_rank, intermediate_size)

    def vocab_slice(self, tp_rank: int, vocab_size: int) -> range:
        """Vocabulary rows of the embedding and LM head on this tensor rank; every rank's
        slice has the padded size ceil(V / tp) so gathers are even (the last may run past V)."""
        per = -(-vocab_size // self.tp)
        return range(tp_rank * per, (tp_rank + 1) * per)


def valid_layouts(model: ModelConfig, pool_size: int, data_parallel: bool = True) -> list[Topology]:
    """Every dp x tp x pp layout `model` can run on `pool_size` workers (and, for a mixture of
    experts, each with expert parallelism where it spreads experts over more than one rank),
    dp-major then tp-major: what a switch may target, so what a profile or a benchmark covers by
    default. `data_parallel` False keeps dp = 1. Validity is `Topology.validate`'s. Round-robin
    placement is a variant a user asks for, not listed."""
    layouts = []
    for dp in range(1, (pool_size if data_parallel else 1) + 1):
        for tp in range(1, pool_size // dp + 1):
            for pp in range(1, pool_size // (dp * tp) + 1):
                for ep in (False, True) if model.moe is not None and dp * tp > 1 else (False,):
                    with contextlib.suppress(TopologyError):
                        Topology(tp, pp, ep, dp).validate(model, pool_size)
                        layouts.append(Topology(tp, pp, ep, dp))
    return layouts
