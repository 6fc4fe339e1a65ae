"""Tensor-parallel linear layers (Megatron's split).

A column-parallel linear owns a contiguous run of the output features (rows of the weight):
its output is this rank's slice, no exchange needed. A row-parallel linear owns a run of the
input features (columns of the weight), takes the matching slice of its input and sums the
partial outputs over the tensor group. Attention's q/k/v and the MLP's gate/up are
column-parallel, its output projection and down projection row-parallel: one all-reduce per
attention and one per MLP.

The q/k/v and gate/up variants keep their matrices separate: each is a view of the mapped
checkpoint, and a fused one would be a copy. Row-parallel weights are strided column views that
BLAS reads in place. Where weights are packed for oneDNN (remp.layers.packed: bfloat16 on a CPU
with native bfloat16), each layer's `packed` replaces its views in forward, q/k/v and gate/up fused.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from remp.layers.packed import PackedLinear
from remp.parallel.context import ParallelContext
from remp.weights.loader import sharded_parameter


class PackableLinear(nn.Module):
    """A linear layer whose weights may be packed (`packed`, set by remp.layers.packed.pack_linears)."""

    packed: PackedLinear | None = None

    def pack_sources(self) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """The weights (and biases) to stack and pack, in output order."""
        raise NotImplementedError

    def adopt(self, previous: PackedLinear | None) -> bool:
        """Take `previous` (the same layer of another model) if it was packed from these tensors."""
        if previous is not None and previous.packs(self.pack_sources()[0]):
            self.packed = previous
        return self.packed is not None

    def pack(self) -> int:
        """Pack this layer's weights now; returns the bytes packed."""
        self.packed = PackedLinear(*self.pack_sources())
        return self.packed.nbytes


class ColumnParallelLinear(PackableLinear):
    """y = x W[rows]^T (+ b[rows]): output features `rows` of the checkpoint's `prefix`.weight."""

    def __init__(self, input_size: int, rows: range, prefix: str, bias: bool = False):
        super().__init__()
        self.weight = sharded_parameter((len(rows), input_size), f"{prefix}.weight", rows=rows)
        self.bias = sharded_parameter((len(rows),), f"{prefix}.bias", rows=rows) if bias else None

    def pack_sources(self):
        return [self.weight], [self.bias]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed(x)
        return F.linear(x, self.weight, self.bias)


class QKVParallelLinear(PackableLinear):
    """The query, key and value projections of this rank's heads: query heads `heads`, key/value
    heads `kv_heads` (replicated over ranks when there are more ranks than KV heads). Three
    column-parallel weights, held directly (a module each would triple what building a layer costs)."""

    def __init__(self, hidden_size: int, head_dim: int, heads: range, kv_heads: range, prefix: str, bias: bool):
        super().__init__()
        q_rows = range(heads.start * head_dim, heads.stop * head_dim)
        kv_rows = range(kv_heads.start * head_dim, kv_heads.stop * head_dim)
        for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
            self.register_parameter(f"{name}_weight", sharded_parameter((len(rows), hidden_size),
                                                                        f"{prefix}.{name}_proj.weight", rows=rows))
            self.register_parameter(f"{name}_bias", sharded_parameter((len(rows),), f"{prefix}.{name}_proj.bias",
                                                                      rows=rows) if bias else None)

    def pack_sources(self):
        return [self.q_weight, self.k_weight, self.v_weight], [self.q_bias, self.k_bias, self.v_bias]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.packed is not None:
            return self.packed(x).split(self.packed.split, dim=-1)
        return (F.linear(x, self.q_weight, self.q_bias), F.linear(x, self.k_weight, self.k_bias),
                F.linear(x, self.v_weight, self.v_bias))


class MergedColumnParallelLinear(PackableLinear):
    """The MLP's gate and up projections, both cut to the intermediate features `rows`."""

    def __init__(self, hidden_size: int, rows: range, prefix: str):
        super().__init__()
        self.gate_weight = sharded_parameter((len(rows), hidden_size), f"{prefix}.gate_proj.weight", rows=rows)
        self.up_weight = sharded_parameter((len(rows), hidden_size), f"{prefix}.up_proj.weight", rows=rows)

    def pack_sources(self):
        return [self.gate_weight, self.up_weight], [None, None]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.packed is not None:
            return self.packed(x).split(self.packed.split, dim=-1)
        return F.linear(x, self.gate_weight), F.linear(x, self.up_weight)


class RowParallelLinear(PackableLinear):
    """y = sum over the tensor group of x[:, cols] W[:, cols]^T. The all-reduce is also a cut
    check (see ParallelContext): it ends every attention and every MLP."""

    def __init__(self, cols: range, output_size: int, prefix: str, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.weight = sharded_parameter((output_size, len(cols)), f"{prefix}.weight", cols=cols)

    def pack_sources(self):
        return [self.weight], [None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.packed(x) if self.packed is not None else F.linear(x, self.weight)
        return self.ctx.all_reduce(y, check_cut=True)
