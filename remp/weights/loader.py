"""Filling a model's parameters with their slices of the mapped checkpoint.

A layer declares each parameter as a placeholder on the meta device that says where its values
come from: a `CheckpointSlice` (a tensor of the checkpoint, and the rows or columns this rank
owns, worked out by the layer from its `Topology` coordinates). `load_weights` then puts the
slice in the placeholder's place — a view of the memory-mapped file where the dtypes agree
(remp.weights.store), so building a rank's model for any layout copies nothing on the CPU.

A parameter may be stored in more than one checkpoint layout: a mixture-of-experts expert is a
tensor of its own in one and a slice of a fused [experts, ...] tensor in the other. Its slice
then names the other layout's slice as `otherwise`, and the names the checkpoint has decide.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
from torch import nn

from remp.config import ModelError
from remp.weights.store import WeightStore


@dataclass(frozen=True)
class CheckpointSlice:
    """Where one parameter comes from: the first of `names` the checkpoint has (an LM head
    falls back to the tied embedding), cut to `rows` or to `cols` (None: whole).

    A fused experts tensor [E, ...] is first indexed at `expert`, then, with `half` (0 or 1),
    cut to the first or second half of that expert's rows (transformers' `gate_up_proj` holds
    an expert's gate rows, then its up rows), and then to `rows` or `cols`. Where the checkpoint
    has none of `names`, the parameter is `otherwise` (the same values in another layout)."""

    names: tuple[str, ...]
    rows: range | None = None
    cols: range | None = None
    expert: int | None = None
    half: int | None = None
    otherwise: CheckpointSlice | None = None

    def found_in(self, store: WeightStore) -> tuple[CheckpointSlice, str]:
        """The slice (this one, or one it falls back to) whose tensor the checkpoint has, and
        that tensor's name."""
        slice_: CheckpointSlice | None = self
        while slice_ is not None:
            name = next((n for n in slice_.names if n in store), None)
            if name is not None:
                return slice_, name
            slice_ = slice_.otherwise
        raise ModelError(f"the checkpoint has no tensor {' or '.join(map(repr, self.all_names()))}")

    def all_names(self) -> tuple[str, ...]:
        return self.names + (self.otherwise.all_names() if self.otherwise is not None else ())

    def also_named(self, old: str, new: str) -> CheckpointSlice:
        """This slice, found also under its names (and those of its fallbacks) with `old`
        replaced by `new`."""
        names = self.names + tuple(n.replace(old, new) for n in self.names if old in n)
        otherwise = self.otherwise.also_named(old, new) if self.otherwise is not None else None
        return replace(self, names=names, otherwise=otherwise)

    def take(self, store: WeightStore) -> torch.Tensor:
        source, name = self.found_in(store)
        if source.expert is None:
            if source.rows is not None:
                return store.rows(name, source.rows)
            if source.cols is not None:
                return store.cols(name, source.cols)
            return store.full(name)
        part = store.expert(name, source.expert, source.half)
        if source.rows is not None:
            return part[source.rows.start:source.rows.stop]
        if source.cols is not None:
            return part[:, source.cols.start:source.cols.stop]
        return part


def sharded_parameter(shape: tuple[int, ...], *names: str, rows: range | None = None,
                      cols: range | None = None) -> nn.Parameter:
    """A placeholder of `shape` (nothing allocated) that `load_weights` fills from `names`."""
    return placeholder(shape, CheckpointSlice(tuple(names), rows, cols))


def placeholder(shape: tuple[int, ...], source: CheckpointSlice) -> nn.Parameter:
    """A placeholder of `shape` (nothing allocated) that `load_weights` fills from `source`."""
    param = nn.Parameter(torch.empty(shape, device="meta"), requires_grad=False)
    param.source = source
    return param


def also_named(module: nn.Module, old: str, new: str) -> None:
    """Let every placeholder of `module` be found with `old` replaced by `new` in its checkpoint
    names too (a family whose tensors transformers renames in memory)."""
    for param in module.parameters():
        param.source = param.source.also_named(old, new)


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
                raise ModelError(f"checkpoint tensor {source.found_in(store)[1]!r} gives {name} the shape "
                                 f"{tuple(value.shape)}, expected {tuple(param.shape)}")
            loaded = nn.Parameter(value.to(dtype=dtype, device=device), requires_grad=False)
            loaded.source = source
            owner._parameters[attr] = loaded  # what setattr does, without its checks per parameter
