"""A mixture-of-experts MLP (Mixtral, Qwen3-MoE), over a stage's ranks.

Every rank holds the router whole. Tensor-parallel (the default), it holds every expert cut to
the rows `topo.expert_slice` gives of its gate and up projections and the same columns of its
down projection — the dense MLP's split, applied to each expert, within its data-parallel group.
Expert-parallel (`topo.ep`), it holds `topo.experts_of` its rank, whole, spread over all dp * tp
ranks of the stage.

With one data-parallel group, each rank routes every token (the router's input is the same on
all ranks of the tensor group), runs the chosen experts it holds, and one all-reduce over the
tensor group sums the parts, as after a dense MLP: a switch between TP and EP moves no KV.

With several data-parallel groups under expert parallelism each group has its own tokens, so
they travel to the experts and back (`dispatch_combine`): each tensor rank of a group takes its
share of the group's tokens, sends each (token, chosen expert) row to the rank that holds the
expert (all-to-all, counts first), runs the rows it receives through its experts, sends the
results back the same way, and adds them up weighted; the tensor all-reduce then joins the
shares. A group with no tokens in a step still joins both exchanges (with nothing to send).

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
from remp.topology import split_range
from remp.weights.loader import CheckpointSlice, placeholder, sharded_parameter


class ExpertMLP(nn.Module):
    """One expert's SwiGLU MLP, cut to intermediate features `rows`.

    A checkpoint stores it in one of two layouts, told apart by the names it has: per expert,
    `{prefix}.{gate|up|down}.weight` with `names` the checkpoint's names for the three projections
    (Mixtral: w1, w3, w2), or fused as transformers 5 holds experts in memory, where `prefix` is
    `{experts}.{e}` and expert e is index e of `{experts}.gate_up_proj` [E, 2I, H] (gate rows, then
    up rows) and of `{experts}.down_proj` [E, H, I]. Either way the weights are views of it."""

    def __init__(self, hidden_size: int, rows: range, prefix: str, names: tuple[str, str, str]):
        super().__init__()
        gate, up, down = names
        experts, _, e = prefix.rpartition(".")
        fused_gate_up, fused_down = f"{experts}.gate_up_proj", f"{experts}.down_proj"
        self.gate_weight = placeholder((len(rows), hidden_size), CheckpointSlice(
            (f"{prefix}.{gate}.weight",), rows=rows,
            otherwise=CheckpointSlice((fused_gate_up,), rows=rows, expert=int(e), half=0)))
        self.up_weight = placeholder((len(rows), hidden_size), CheckpointSlice(
            (f"{prefix}.{up}.weight",), rows=rows,
            otherwise=CheckpointSlice((fused_gate_up,), rows=rows, expert=int(e), half=1)))
        self.down_weight = placeholder((hidden_size, len(rows)), CheckpointSlice(
            (f"{prefix}.{down}.weight",), cols=rows,
            otherwise=CheckpointSlice((fused_down,), cols=rows, expert=int(e))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(F.linear(x, self.gate_weight)) * F.linear(x, self.up_weight), self.down_weight)


class SparseMoE(nn.Module):
    """The experts of one layer and their router (`{prefix}.gate.weight`), this rank's slice."""

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, prefix: str, names: tuple[str, str, str]):
        super().__init__()
        moe = cfg.moe
        self.ctx = ctx
        self.top_k, self.renormalize, self.scores_in_float = moe.top_k, moe.renormalize, moe.scores_in_float
        topo = ctx.topo
        self.num_experts = moe.num_experts
        rows = topo.expert_slice(ctx.tp_rank, moe.intermediate_size)
        self.router_weight = sharded_parameter((moe.num_experts, cfg.hidden_size), f"{prefix}.gate.weight")
        held = topo.experts_of(topo.coords(ctx.rank), moe.num_experts)
        self.experts = nn.ModuleDict({str(e): ExpertMLP(cfg.hidden_size, rows, f"{prefix}.experts.{e}", names)
                                      for e in held})
        self.exchanges = topo.exchanges_tokens
        if self.exchanges:
            ctx.votes_in_exchange = True
            # Each ep rank's experts in ascending order: the j-th of rank r is owned[r][j].
            self.owned = [[e for e in range(moe.num_experts) if topo.expert_owner(e, moe.num_experts) == r]
                          for r in range(topo.ep_size)]

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's top-k experts [T, k] and their weights [T, k]."""
        probs = torch.softmax(F.linear(x, self.router_weight), dim=-1, dtype=torch.float32)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return chosen, weights if self.scores_in_float else weights.to(x.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.exchanges:
            return self.dispatch_combine(x)
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

    def dispatch_combine(self, x: torch.Tensor) -> torch.Tensor:
        """The layer where experts live across data-parallel groups (see the module docstring):
        this tensor rank's share of the group's tokens goes to the experts' owners and back."""
        ctx, topo = self.ctx, self.ctx.topo
        share = split_range(x.shape[0], ctx.tp_size, ctx.tp_rank)
        mine = x[share.start:share.stop]
        chosen, weights = self.route(mine)
        # One row per (token, chosen expert), ordered by the expert's owner, then by the expert's
        # place among the owner's (so by expert id, under either placement, within an owner).
        per_rank = len(self.owned[0])
        owner = torch.tensor([topo.expert_owner(e, self.num_experts) for e in range(self.num_experts)])
        local = torch.empty(self.num_experts, dtype=torch.long)
        for experts in self.owned:
            local[experts] = torch.arange(per_rank)
        flat = chosen.reshape(-1).cpu()
        key = owner[flat] * per_rank + local[flat]
        order = torch.argsort(key, stable=True)
        counts = torch.bincount(key, minlength=topo.ep_size * per_rank).view(topo.ep_size, per_rank)
        got = ctx.exchange_counts(counts)  # [ep_size, per_rank]: rows each rank sends, per expert of mine
        send_counts, recv_counts = counts.sum(1).tolist(), got.sum(1).tolist()
        token = (order // self.top_k).to(x.device)
        rows = ctx.exchange_rows(mine[token], send_counts, recv_counts)
        # Received rows are grouped by source rank, then by my expert: run each expert on its rows.
        expert_of_row = torch.repeat_interleave(torch.arange(per_rank).repeat(topo.ep_size), got.reshape(-1))
        results = torch.empty_like(rows)
        for j, e in enumerate(self.owned[topo.ep_rank(topo.coords(ctx.rank))]):
            where = (expert_of_row == j).nonzero().squeeze(1).to(x.device)
            if where.numel():
                results[where] = self.experts[str(e)](rows[where])
        back = ctx.exchange_rows(results, recv_counts, send_counts)
        weight = weights.reshape(-1)[order.to(weights.device)]
        out = torch.zeros_like(x)
        out[share.start:share.stop].index_add_(0, token, (back * weight[:, None]).to(out.dtype))
        return ctx.all_reduce(out)
