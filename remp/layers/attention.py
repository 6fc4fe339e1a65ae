"""Attention over the paged KV cache, for this rank's heads of one layer.

The step's keys and values are written into the cache first (remp.kv.cache). Prompts attend
causally to their own tokens, taken from the step's fresh keys and values (a step holds whole
prompts, so a prompt needs nothing from the cache) with SDPA's flash kernel. Decodes attend to
their sequence's blocks where they lie in the cache, all decodes in one call of remp's CPU kernel
(remp.kernels.paged_attention); where that kernel is not built, or off the CPU, they are gathered
into a padded copy and masked past the context length instead (`gather_decode`, also the
kernel's reference in the tests).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from remp.kernels import paged_attention as kernel
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
        self.scale = head_dim ** -0.5
        self.in_place = ctx.device.type == "cpu" and kernel.load()

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, kv: KVCache) -> torch.Tensor:
        """q [T, heads, head_dim], k and v [T, kv_heads, head_dim] -> [T, heads * head_dim].
        Cut checks (where this rank may stop alone) after the cache write and after attention."""
        kv.write(self.layer, batch.slots, k, v, batch.fresh_blocks)
        self.ctx.stop_if_cut()
        decode = self.decode if self.in_place and q.dtype in (torch.float32, torch.bfloat16) else self.gather_decode
        if not batch.prefill:
            out = decode(q.contiguous(), batch, kv)
        else:
            out = torch.empty_like(q)
            if batch.decode:
                out[batch.decode_tokens] = decode(q[batch.decode_tokens], batch, kv)
            self.prefill(q, k, v, batch, out)
        self.ctx.stop_if_cut()
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)

    def decode(self, q: torch.Tensor, batch: Batch, kv: KVCache) -> torch.Tensor:
        """Decode queries [D, heads, head_dim] over their sequences' blocks, read in place."""
        return kernel.paged_attention(q, kv.layers[self.layer], batch.decode_tables, batch.decode_ctx, self.scale)

    def gather_decode(self, q: torch.Tensor, batch: Batch, kv: KVCache) -> torch.Tensor:
        """The same, by gathering every sequence's blocks into a padded copy and masking its tail."""
        keys, values = kv.gather(self.layer, batch.decode_tables)
        width = keys.shape[2]
        mask = torch.arange(width, device=q.device)[None, :] < batch.decode_ctx[:, None]
        o = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :],
                                           enable_gqa=True)
        return o.squeeze(2)

    def prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, batch: Batch, out: torch.Tensor) -> None:
        """Each prompt attends causally to itself, on the step's fresh keys and values: one SDPA
        call per run of adjacent prompts of one length (the prompts as its batch), so a step of
        equal-length prompts is a single call."""
        for run in batch.prefill_runs:
            s, e, n = run.start, run.start + run.count * run.length, run.length
            qs = q[s:e].view(run.count, n, *q.shape[1:]).transpose(1, 2)
            keys = k[s:e].view(run.count, n, *k.shape[1:]).transpose(1, 2)
            values = v[s:e].view(run.count, n, *v.shape[1:]).transpose(1, 2)
            o = F.scaled_dot_product_attention(qs, keys, values, is_causal=True, enable_gqa=True)
            out[s:e] = o.transpose(1, 2).reshape(e - s, *q.shape[1:])
