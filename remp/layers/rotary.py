"""Rotary position embedding: transformers' own tables and rotation, so every rope variant its
config spells (rope_theta, rope_scaling, rope_parameters; llama3, yarn, ...) is applied exactly
as the reference does."""
from __future__ import annotations

import torch
from torch import nn
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb


class RotaryEmbedding(nn.Module):
    def __init__(self, hf_config, device: torch.device):
        super().__init__()
        self.tables = LlamaRotaryEmbedding(hf_config).to(device)

    def tables_for(self, like: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [T, head_dim] for `positions` [T], in `like`'s dtype: computed once per step."""
        cos, sin = self.tables(like, positions.unsqueeze(0))
        return cos[0], sin[0]

    @staticmethod
    def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
               sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q [T, heads, head_dim] and k [T, kv_heads, head_dim] rotated to their positions."""
        return apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
