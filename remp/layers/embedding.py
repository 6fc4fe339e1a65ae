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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.ctx.stops_alone:
            return F.linear(x, self.weight)
        chunks = []
        for rows in self.weight.split(self.chunk_rows):
            self.ctx.stop_if_cut()
            chunks.append(F.linear(x, rows))
        return torch.cat(chunks, dim=-1)
