"""The vocabulary-parallel embedding and LM head.

Each tensor rank holds a contiguous run of ceil(V / tp) vocabulary rows (the last one padded
with zero rows past V, so every rank's logits have the same width for the gather). The
embedding looks up the tokens in its rows, zeroes the others and sums over the tensor group;
the LM head gives this rank's slice of the logits, gathered on the stage's first tensor rank
(ParallelContext.gather_to_first).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from remp.layers.packed import PackedLinear
from remp.parallel.context import ParallelContext
from remp.weights.loader import sharded_parameter


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab: range, hidden_size: int, name: str, ctx: ParallelContext):
        super().__init__()
        self.ctx = ctx
        self.vocab = vocab
        self.weight = sharded_parameter((len(vocab), hidden_size), name, rows=vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.ctx.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab.start
        outside = (local < 0) | (local >= len(self.vocab))
        h = F.embedding(local.masked_fill(outside, 0), self.weight)
        h = h.masked_fill(outside.unsqueeze(-1), 0.0)
        return self.ctx.all_reduce(h)


class ParallelLMHead(nn.Module):
    """This rank's vocabulary slice of the logits. `names`: the checkpoint tensors to take the
    rows from, in order of preference (a tied head reads the embedding).

    Where the rank may stop alone at a cut (see ParallelContext), the logits are computed in
    chunks of `chunk_rows` rows with a check between: the LM head reads the whole vocabulary's
    weights, the longest stretch of a step without a check otherwise. Each logit is the same dot
    product either way, so the result is bitwise equal."""

    def __init__(self, vocab: range, hidden_size: int, names: tuple[str, ...], ctx: ParallelContext,
                 chunk_rows: int):
        super().__init__()
        self.ctx = ctx
        self.chunk_rows = chunk_rows
        self.weight = sharded_parameter((len(vocab), hidden_size), *names, rows=vocab)
        self.packed: list[PackedLinear] | None = None  # the chunks, packed (remp.layers.packed)

    def chunks(self) -> list[torch.Tensor]:
        return list(self.weight.split(self.chunk_rows)) if self.ctx.stops_alone else [self.weight]

    def adopt(self, previous: list[PackedLinear] | None) -> bool:
        """Take `previous` (this head of another model) if its chunks were packed from these rows."""
        chunks = self.chunks()
        if previous is not None and len(previous) == len(chunks) and all(
                p.packs([c]) for p, c in zip(previous, chunks)):
            self.packed = previous
        return self.packed is not None

    def pack(self) -> int:
        """Pack each chunk now (a cut check stays between chunks); returns the bytes packed."""
        self.packed = [PackedLinear([c], [None]) for c in self.chunks()]
        return sum(p.nbytes for p in self.packed)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = []
        for chunk in self.packed or self.chunks():
            self.ctx.stop_if_cut()  # a no-op unless the rank may stop alone (then there are chunks)
            parts.append(chunk(x) if self.packed else F.linear(x, chunk))
        return torch.cat(parts, dim=-1) if len(parts) > 1 else parts[0]
