"""The Llama family: Llama, Mistral and Qwen2 (Qwen2 adds biases to q/k/v).

One rank's part of the decoder under one layout: the layers of its pipeline stage (named by
their global index, as in the checkpoint), its attention heads, MLP slice and vocabulary slice.
Stage 0 embeds the tokens; the last stage norms the last token of each sequence and gives this
rank's slice of its logits. Every exchange goes through the rank's ParallelContext.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from remp.config import ModelConfig
from remp.kv.cache import KVCache
from remp.layers.attention import PagedAttention
from remp.layers.batch import Batch
from remp.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from remp.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from remp.layers.norm import RMSNorm
from remp.layers.rotary import RotaryEmbedding
from remp.parallel.context import ParallelContext


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layer: int, prefix: str):
        super().__init__()
        self.ctx = ctx
        self.head_dim = cfg.head_dim
        heads = ctx.topo.heads_of(ctx.tp_rank, cfg.num_heads)
        kv_heads = ctx.topo.kv_heads_of(ctx.tp_rank, cfg.num_kv_heads)
        self.num_heads, self.num_kv_heads = len(heads), len(kv_heads)
        self.qkv_proj = QKVParallelLinear(cfg.hidden_size, cfg.head_dim, heads, kv_heads, prefix, cfg.attention_bias)
        self.attn = PagedAttention(layer, self.num_heads, self.num_kv_heads, cfg.head_dim, ctx)
        self.o_proj = RowParallelLinear(range(heads.start * cfg.head_dim, heads.stop * cfg.head_dim),
                                        cfg.hidden_size, f"{prefix}.o_proj", ctx)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: Batch,
                kv: KVCache) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        q, k = self.normalize_qk(q, k)
        q, k = RotaryEmbedding.rotate(q, k, cos, sin)
        return self.o_proj(self.attn(q, k, v, batch, kv))

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-head query/key normalisation before the rotation: none in this family."""
        return q, k


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, prefix: str):
        super().__init__()
        self.ctx = ctx
        rows = ctx.topo.mlp_slice(ctx.tp_rank, cfg.intermediate_size)
        self.gate_up_proj = MergedColumnParallelLinear(cfg.hidden_size, rows, prefix)
        self.down_proj = RowParallelLinear(rows, cfg.hidden_size, f"{prefix}.down_proj", ctx)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x)
        self.ctx.stop_if_cut()
        return self.down_proj(F.silu(gate) * up)


class LlamaDecoderLayer(nn.Module):
    attention_class = LlamaAttention

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layer: int):
        super().__init__()
        prefix = f"model.layers.{layer}"
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, f"{prefix}.input_layernorm.weight")
        self.self_attn = self.attention_class(cfg, ctx, layer, f"{prefix}.self_attn")
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps,
                                                f"{prefix}.post_attention_layernorm.weight")
        self.mlp = self.make_mlp(cfg, ctx, layer, prefix)

    def make_mlp(self, cfg: ModelConfig, ctx: ParallelContext, layer: int, prefix: str) -> nn.Module:
        """This layer's MLP: dense in this family (mixture-of-experts families override it)."""
        return LlamaMLP(cfg, ctx, f"{prefix}.mlp")

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, batch: Batch,
                kv: KVCache) -> torch.Tensor:
        h = h + self.self_attn(self.input_layernorm(h), cos, sin, batch, kv)
        return h + self.mlp(self.post_attention_layernorm(h))


class LlamaForCausalLM(nn.Module):
    """Rank `ctx.rank`'s part of the model under `ctx.topo`. Built with placeholder parameters;
    remp.weights.loader.load_weights puts the checkpoint's slices in place."""

    layer_class = LlamaDecoderLayer

    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, hf_config):
        super().__init__()
        self.cfg = cfg
        self.ctx = ctx
        vocab = ctx.topo.vocab_slice(ctx.tp_rank, cfg.vocab_size)
        self.layer_ids = ctx.topo.layers_of(ctx.stage, cfg.num_layers)
        self.embed_tokens = (VocabParallelEmbedding(vocab, cfg.hidden_size, "model.embed_tokens.weight", ctx)
                             if ctx.is_first else None)
        self.layers = nn.ModuleDict({str(i): self.layer_class(cfg, ctx, i) for i in self.layer_ids})
        self.rotary = RotaryEmbedding(hf_config, ctx.device)
        if ctx.is_last:
            self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, "model.norm.weight")
            head = ("model.embed_tokens.weight",) if cfg.tie_word_embeddings else ("lm_head.weight",
                                                                                      "model.embed_tokens.weight")
            # Chunks as big as one MLP's weights: the longest stretch between cut checks elsewhere.
            self.lm_head = ParallelLMHead(vocab, cfg.hidden_size, head, ctx, chunk_rows=3 * cfg.intermediate_size)
        else:
            self.norm = self.lm_head = None

    def forward(self, batch: Batch, hidden: torch.Tensor | None, kv: KVCache) -> torch.Tensor:
        """Run this stage's layers. Returns the hidden state [T, hidden] on inner stages and this
        rank's vocabulary slice of the last-token logits [B, V/tp] on the last stage. A cut check
        (see ParallelContext) may end the step with StepCut: the KV it wrote lies past what the
        engine counts as computed, and is written again when the step runs again."""
        h = self.embed_tokens(batch.input_ids) if self.ctx.is_first else hidden
        cos, sin = self.rotary.tables_for(h, batch.positions)
        for layer in self.layers.values():
            h = layer(h, cos, sin, batch, kv)
        if not self.ctx.is_last:
            return h
        return self.lm_head(self.norm(h[batch.last_token_idx]))

    def join_exchanges(self) -> None:
        """A step in which this rank's data-parallel group has no tokens: join every exchange of
        tokens between groups that this stage's layers make (mixture-of-experts layers under
        expert parallelism with dp > 1), with nothing to send, so the groups with tokens can run."""
        for layer in self.layers.values():
            if getattr(layer.mlp, "exchanges", False):
                dtype = layer.post_attention_layernorm.weight.dtype
                layer.mlp(torch.empty(0, self.cfg.hidden_size, dtype=dtype, device=self.ctx.device))
