"""Attention over the paged KV cache, for this rank's heads of one layer.

The step's keys and values are written into the cache first (remp.kv.cache). Prompts attend
causally to their own tokens (a step holds whole prompts); decodes attend to their sequence's
blocks, gathered from the cache and masked past the context length, all decodes in one batch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from remp.kv.cache import KVCache
from remp.layers.batch import Batch
from remp.parallel.context import ParallelContext


class PagedAttention(nn.Module):
    def __init__(self, layer: int, num_heads: int, num_kv_heads: int, head_dim: int, ctx: ParallelContext):
        super().__init__()
        self.layer = layer
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.ctx = ctx

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, kv: KVCache) -> torch.Tensor:
        """q [T, heads, head_dim], k and v [T, kv_heads, head_dim] -> [T, heads * head_dim].
        Cut checks (where this rank may stop alone) after the cache write and after attention."""
        kv.write(self.layer, batch.slots, k, v, batch.fresh_blocks)
        self.ctx.stop_if_cut()
        out = torch.empty_like(q)
        if batch.decode:
            keys, values = kv.gather(self.layer, batch.decode_tables)
            width = keys.shape[2]
            mask = torch.arange(width, device=q.device)[None, :] < batch.decode_ctx[:, None]
            qd = q[batch.decode_tokens].unsqueeze(2)
            o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=mask[:, None, None, :], enable_gqa=True)
            out[batch.decode_tokens] = o.squeeze(2)
        for i in batch.prefill:
            s, e = batch.offsets[i], batch.offsets[i + 1]
            qs = q[s:e].transpose(0, 1).unsqueeze(0)
            keys = k[s:e].transpose(0, 1).unsqueeze(0)
            values = v[s:e].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, keys, values, is_causal=True, enable_gqa=True)
            out[s:e] = o[0].transpose(0, 1)
        self.ctx.stop_if_cut()
        return out.view(q.shape[0], self.num_heads * self.head_dim)
