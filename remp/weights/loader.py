"""Filling a model's parameters with their slices of the mapped checkpoint.

A layer declares each parameter as a placeholder on the meta device that says where its values
come from: a `CheckpointSlice` (a tensor of the checkpoint, and the rows or columns this rank
owns, worked out by the layer from its `Topology` coordinates). `load_weights` then puts the
slice in the placeholder's place — a view of the memory-mapped file where the dtypes agree
(remp.weights.store), so building a rank's model for any layout copies nothing on the CPU.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from remp.config import ModelError
from remp.weights.store import WeightStore


@dataclass(frozen=True)
class CheckpointSlice:
    """Where one parameter comes from: the first of `names` the checkpoint has (an LM head
    falls back to the tied embedding), cut to `rows` or to `cols` (None: whole)."""

    names: tuple[str, ...]
    rows: range | None = None
    cols: range | None = None

    def take(self, store: WeightStore) -> torch.Tensor:
        name = next((n for n in self.names if n in store), None)
        if name is None:
            raise ModelError(f"the checkpoint has no tensor {' or '.join(map(repr, self.names))}")
        if self.rows is not None:
            return store.rows(name, self.rows)
        if self.cols is not None:
            return store.cols(name, self.cols)
        return store.full(name)


def sharded_parameter(shape: tuple[int, ...], *names: str, rows: range | None = None,
                      cols: range | None = None) -> nn.Parameter:
    """A placeholder of `shape` (nothing allocated) that `load_weights` fills from `names`."""
    param = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
    param.source = CheckpointSlice(tuple(names), rows, cols)
    return param


def load_weights(model: nn.Module, store: WeightStore, dtype: torch.dtype, device: torch.device,
                 reuse: Mapping[str, nn.Parameter] | None = None) -> None:
    """Put every placeholder of `model` in place: its checkpoint slice in `dtype` on `device`
    (a view of the mapping when nothing needs converting). A parameter of the same name and the
    same checkpoint slice in `reuse` (the same rank's model under another layout, e.g. already on
    the GPU) is taken as it is."""
    reuse = reuse or {}
    for owner_name, owner in model.named_modules():
        for attr, param in list(owner._parameters.items()):
            if param is None:
                continue
            name = f"{owner_name}.{attr}" if owner_name else attr
            source: CheckpointSlice = param.source
            if name in reuse and getattr(reuse[name], "source", None) == source:
                owner._parameters[attr] = reuse[name]
                continue
            value = source.take(store)
            if tuple(value.shape) != tuple(param.shape):
                raise ModelError(f"checkpoint tensor {source.names[0]!r} gives {name} the shape "
                                 f"{tuple(value.shape)}, expected {tuple(param.shape)}")
            loaded = nn.Parameter(value.to(dtype=dtype, device=device), requires_grad=False)
            loaded.source = source
            owner._parameters[attr] = loaded  # what setattr does, without its checks per parameter
