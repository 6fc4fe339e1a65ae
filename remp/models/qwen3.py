"""Qwen3 (dense): the Llama layout with an explicit head_dim, no q/k/v biases, and an RMSNorm
over each query and key head before the rotation. Sliding-window layers are refused at load
(remp.config)."""
from __future__ import annotations

import torch

from remp.config import ModelConfig
from remp.layers.norm import RMSNorm
from remp.models.llama import LlamaAttention, LlamaDecoderLayer, LlamaForCausalLM
from remp.parallel.context import ParallelContext


class Qwen3Attention(LlamaAttention):
    def __init__(self, cfg: ModelConfig, ctx: ParallelContext, layer: int, prefix: str):
        super().__init__(cfg, ctx, layer, prefix)
        # Over head_dim only, so the same weights serve any split of the heads.
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, f"{prefix}.q_norm.weight")
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, f"{prefix}.k_norm.weight")

    def normalize_qk(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.q_norm(q), self.k_norm(k)


class Qwen3DecoderLayer(LlamaDecoderLayer):
    attention_class = Qwen3Attention


class Qwen3ForCausalLM(LlamaForCausalLM):
    layer_class = Qwen3DecoderLayer
