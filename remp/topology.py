"""The parallel layout as a value.

A `Topology` answers every ownership question — which stage holds a layer, which tensor
rank holds a query head, a KV head, a slice of the MLP or of the vocabulary, which global
rank a (stage, tp rank) pair is — for weights, KV cache and communication groups alike.
Nothing else in remp computes ownership; a switch is the difference of two Topology values.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

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


@dataclass(frozen=True)
class Topology:
    """tp × pp layout over ranks 0 .. tp*pp-1 of the worker pool (the rest are standby).

    Rank numbering is stage-major: rank = stage * tp + tp_rank, so each stage's tensor
    group is a contiguous run of ranks. With `ep` (a mixture-of-experts model), the experts are
    spread over each stage's tensor group instead of cut over their width: each rank holds whole
    experts (`experts_of`); attention stays tensor-parallel.
    """

    tp: int = 1
    pp: int = 1
    ep: bool = False  # expert parallelism over the tensor group (vLLM's --enable-expert-parallel)

    def __str__(self) -> str:
        return f"tp{self.tp}pp{self.pp}" + ("ep" if self.ep else "")

    @classmethod
    def parse(cls, name: str) -> "Topology":
        """The inverse of str(): 'tp2pp4' -> Topology(2, 4); 'tp2pp1ep' -> Topology(2, 1, ep=True)."""
        text = name.strip()
        ep = text.endswith("ep")
        tp, sep, pp = text.removesuffix("ep").removeprefix("tp").partition("pp")
        if not (sep and tp.isdigit() and pp.isdigit()):
            raise TopologyError(f"a layout is written tpXppY or tpXppYep (e.g. tp2pp1), got {name!r}")
        return cls(int(tp), int(pp), ep)

    def as_dict(self) -> dict:
        """The layout as the API writes it (POST /v1/admin/reconfigure, GET /v1/admin/topology)."""
        return {"tensor_parallel_size": self.tp, "pipeline_parallel_size": self.pp, "enable_expert_parallel": self.ep}

    @classmethod
    def from_dict(cls, layout: dict) -> "Topology":
        """The inverse of as_dict(), for a reply of the API."""
        return cls(layout["tensor_parallel_size"], layout["pipeline_parallel_size"],
                   bool(layout.get("enable_expert_parallel", False)))

    @property
    def world_size(self) -> int:
        """Ranks the layout uses (the active part of the pool)."""
        return self.tp * self.pp

    def validate(self, model: ModelConfig, pool_size: int) -> None:
        """Raise TopologyError unless this layout can serve `model` on `pool_size` workers."""
        if self.tp < 1 or self.pp < 1:
            raise TopologyError(f"tensor and pipeline parallel sizes must be >= 1, got tp={self.tp} pp={self.pp}")
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
            raise TopologyError(f"tp*pp = {self.world_size} workers needed but the pool has {pool_size}")
        if self.ep:
            if model.moe is None:
                raise TopologyError(f"enable_expert_parallel needs a mixture-of-experts model; "
                                    f"{model.architecture} is dense")
            if model.moe.num_experts % self.tp:
                raise TopologyError(f"expert parallelism over tensor_parallel_size {self.tp} needs the "
                                    f"{model.moe.num_experts} experts to divide evenly over the {self.tp} ranks")

    # ranks
    def rank(self, stage: int, tp_rank: int) -> int:
        return stage * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int] | None:
        """(stage, tp_rank) of a global rank, or None for a standby rank."""
        if rank >= self.world_size:
            return None
        return divmod(rank, self.tp)

    def tp_group_ranks(self, stage: int) -> list[int]:
        return [self.rank(stage, t) for t in range(self.tp)]

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
    def experts_of(self, tp_rank: int, num_experts: int) -> range:
        """The experts this tensor rank holds: a contiguous block of them under expert
        parallelism (linear placement), else every expert (each cut by `expert_slice`)."""
        return split_range(num_experts, self.tp, tp_rank) if self.ep else range(num_experts)

    def expert_slice(self, tp_rank: int, intermediate_size: int) -> range:
        """The intermediate features of each expert it holds: whole under expert parallelism,
        else the dense MLP's cut."""
        return range(intermediate_size) if self.ep else self.mlp_slice(tp_rank, intermediate_size)

    def vocab_slice(self, tp_rank: int, vocab_size: int) -> range:
        """Vocabulary rows of the embedding and LM head on this tensor rank; every rank's
        slice has the padded size ceil(V / tp) so gathers are even (the last may run past V)."""
        per = -(-vocab_size // self.tp)
        return range(tp_rank * per, (tp_rank + 1) * per)


def valid_layouts(model: ModelConfig, pool_size: int) -> list[Topology]:
    """Every tp x pp layout `model` can run on `pool_size` workers (and, for a mixture of
    experts, each with expert parallelism where valid), tp-major: what a switch may
    target, so what a profile or a benchmark covers by default. Validity is `Topology.validate`'s."""
    layouts = []
    for tp in range(1, pool_size + 1):
        for pp in range(1, pool_size // tp + 1):
            # expert parallelism is a layout of its own where it spreads experts (tp > 1)
            for ep in (False, True) if model.moe is not None and tp > 1 else (False,):
                with contextlib.suppress(TopologyError):
                    Topology(tp, pp, ep).validate(model, pool_size)
                    layouts.append(Topology(tp, pp, ep))
    return layouts
