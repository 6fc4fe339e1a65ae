"""A mixture-of-experts MLP (Mixtral, Qwen2-MoE, Qwen3-MoE), over a stage's ranks.

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
ascending expert order (across data-parallel groups, in the order of the experts' owners, then
ascending: the same under linear placement).
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
        index = int(e) if e.isdigit() else None  # a shared expert (Qwen2-MoE) is stored on its own only

        def fused(name: str, **part) -> CheckpointSlice | None:
            return CheckpointSlice((name,), expert=index, **part) if index is not None else None

        self.gate_weight = placeholder((len(rows), hidden_size), CheckpointSlice(
            (f"{prefix}.{gate}.weight",), rows=rows, otherwise=fused(fused_gate_up, rows=rows, half=0)))
        self.up_weight = placeholder((len(rows), hidden_size), CheckpointSlice(
            (f"{prefix}.{up}.weight",), rows=rows, otherwise=fused(fused_gate_up, rows=rows, half=1)))
        self.down_weight = placeholder((hidden_size, len(rows)), CheckpointSlice(
            (f"{prefix}.{down}.weight",), cols=rows, otherwise=fused(fused_down, cols=rows)))

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
        rows = topo.expert_slice(ctx.tp_rank, moe.intermediate_size)
        self.router_weight = sharded_parameter((moe.num_experts, cfg.hidden_size), f"{prefix}.gate.weight")
        held = topo.experts_of(topo.coords(ctx.rank), moe.num_experts)
        self.experts = nn.ModuleDict({str(e): ExpertMLP(cfg.hidden_size, rows, f"{prefix}.experts.{e}", names)
                                      for e in held})
        self.shared_expert = self.shared_gate = None
        if moe.shared_expert_size:
            # Every token also runs the shared expert (Qwen2-MoE), scaled by the sigmoid of its gate;
            # it is cut over the group's tensor ranks like a dense MLP, in every mode: its partial
            # sums join the experts' before the all-reduce.
            self.shared_expert = ExpertMLP(cfg.hidden_size, topo.mlp_slice(ctx.tp_rank, moe.shared_expert_size),
                                           f"{prefix}.shared_expert", ("gate_proj", "up_proj", "down_proj"))
            self.shared_gate = sharded_parameter((1, cfg.hidden_size), f"{prefix}.shared_expert_gate.weight")
        self.exchanges = topo.exchanges_tokens
        if self.exchanges:
            ctx.votes_in_exchange = True
            # Each ep rank holds per_rank experts; the j-th (ascending) of rank r has the slot
            # r * per_rank + j: rows go out ordered by slot, so grouped by owner, then by expert.
            self.per_rank = moe.num_experts // topo.ep_size
            owned = [[e for e in range(moe.num_experts) if topo.expert_owner(e, moe.num_experts) == r]
                     for r in range(topo.ep_size)]
            self.slot = torch.empty(moe.num_experts, dtype=torch.long)
            for r, experts in enumerate(owned):
                self.slot[experts] = torch.arange(r * self.per_rank, (r + 1) * self.per_rank)
            self.held = list(held)  # this rank's, ascending: in slot order

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
        self.add_shared(x, out)
        return self.ctx.all_reduce(out, check_cut=True)

    def add_shared(self, x: torch.Tensor, out: torch.Tensor) -> None:
        """Add this rank's part of the shared expert's output, if the model has one."""
        if self.shared_expert is not None:
            out += torch.sigmoid(F.linear(x, self.shared_gate)) * self.shared_expert(x)

    def dispatch_combine(self, x: torch.Tensor) -> torch.Tensor:
        """The layer where experts live across data-parallel groups (see the module docstring):
        this tensor rank's share of the group's tokens goes to the experts' owners and back."""
        ctx, ep_size, per_rank = self.ctx, self.ctx.topo.ep_size, self.per_rank
        share = split_range(x.shape[0], ctx.tp_size, ctx.tp_rank)
        mine = x[share.start:share.stop]
        chosen, weights = self.route(mine)
        # One row per (token, chosen expert), in slot order (stable: a token's rows keep its order).
        slot = self.slot[chosen.reshape(-1).cpu()]
        order = torch.argsort(slot, stable=True)
        counts = torch.bincount(slot, minlength=ep_size * per_rank).view(ep_size, per_rank)
        got = ctx.exchange_counts(counts)  # [ep_size, per_rank]: rows each rank sends, per expert of mine
        send_counts, recv_counts = counts.sum(1).tolist(), got.sum(1).tolist()
        token = (order // self.top_k).to(x.device)
        rows = ctx.exchange_rows(mine[token], send_counts, recv_counts)
        # Received rows are grouped by source rank, then by my expert: run each expert on its rows.
        expert_of_row = torch.repeat_interleave(torch.arange(per_rank).repeat(ep_size), got.reshape(-1))
        results = torch.empty_like(rows)
        for j, e in enumerate(self.held):
            where = (expert_of_row == j).nonzero().squeeze(1).to(x.device)
            if where.numel():
                results[where] = self.experts[str(e)](rows[where])
        back = ctx.exchange_rows(results, recv_counts, send_counts)
        weight = weights.reshape(-1)[order.to(weights.device)]
        out = torch.zeros_like(x)
        out[share.start:share.stop].index_add_(0, token, (back * weight[:, None]).to(out.dtype))
        self.add_shared(x, out)
        return ctx.all_reduce(out)


class QwenSparseLayers:
    """A decoder-layer mixin for the Qwen mixtures of experts (Qwen2-MoE, Qwen3-MoE): on the layers
    the config makes sparse the MLP is `SparseMoE` under `mlp`, its experts named gate_proj,
    up_proj, down_proj; elsewhere the family's dense MLP."""

    def make_mlp(self, cfg: ModelConfig, ctx: ParallelContext, layer: int, prefix: str) -> nn.Module:
        if layer in cfg.moe.sparse_layers:
            return SparseMoE(cfg, ctx, f"{prefix}.mlp", ("gate_proj", "up_proj", "down_proj"))
        return super().make_mlp(cfg, ctx, layer, prefix)
