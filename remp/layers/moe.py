"""A mixture-of-experts MLP (Mixtral, Qwen3-MoE), over a stage's tensor group.

Every rank holds the router whole. Tensor-parallel (the default), it holds every expert cut to
the rows `topo.expert_slice` gives of its gate and up projections and the same columns of its
down projection — the dense MLP's split, applied to each expert. Expert-parallel (`topo.ep`), it
holds `topo.experts_of` its rank, whole. Either way each rank routes every token (the router's
input is the same on all ranks), runs the chosen experts it holds, and one all-reduce over the
tensor group sums the parts, as after a dense MLP: a switch between the two moves no KV.
Routing follows transformers: softmax in float32 over all experts, the top k, divided by their
sum where the model renormalises; each expert's output is scaled by its weight and added in
ascending expert order.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from remp.config import ModelConfig
from remp.parallel.context import ParallelContext
from remp.weights.loader import sharded_parameter


class ExpertMLP(nn.Module):
    """One expert's SwiGLU MLP, cut to intermediate features `rows`. `names`: the checkpoint's
    names for its gate, up and down projections (Mixtral: w1, w3, w2)."""

    def __init__(self, hidden_size: int, rows: range, prefix: str, names: tuple[str, str, str]):
        super().__init__()
        gate, up, down = names
        self.gate_weight = sharded_parameter((len(rows), hidden_size), f"{prefix}.{gate}.weight", rows=rows)
        self.up_weight = sharded_parameter((len(rows), hidden_size), f"{prefix}.{up}.weight", rows=rows)
        self.down_weight = sharded_parameter((hidden_size, len(rows)), f"{prefix}.{down}.weight", cols=rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.gate_weight)) * F.linear(x, self.up_weight), self.down_weight)


class SparseMoE(nn.Module):
    """The experts of one layer and their router (`{prefix}.gate.weight`), this rank's slice."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, prefix: str, names: tuple[str, str, str]):
        super().__init__()
        moe = cfg.moe
        self.ctx = ctx
        self.top_k, self.renormalize, self.scores_in_float = moe.top_k, moe.renormalize, moe.scores_in_float
        rows = ctx.topo.expert_slice(ctx.tp_rank, moe.intermediate_size)
        self.router_weight = sharded_parameter((moe.num_experts, cfg.hidden_size), f"{prefix}.gate.weight")
        self.experts = nn.ModuleDict({str(e): ExpertMLP(cfg.hidden_size, rows, f"{prefix}.experts.{e}", names)
                                      for e in ctx.topo.experts_of(ctx.tp_rank, moe.num_experts)})

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts [T, k] and their weights [T, k]."""
        probs = torch.softmax(F.linear(x, self.router_weight), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return chosen, weights if self.scores_in_float else weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        chosen, weights = self.route(x)
        self.ctx.stop_if_cut()
        out = torch.zeros_like(x)
        for e in torch.unique(chosen).tolist():  # ascending, as transformers adds them
            if str(e) not in self.experts:  # another rank's (expert parallelism)
                continue
            token, slot = torch.where(chosen == e)
            y = self.experts[str(e)](x[token]) * weights[token, slot, None]
            out.index_add_(0, token, y.to(out.dtype))
        return self.ctx.all_reduce(out, check_cut=True)
