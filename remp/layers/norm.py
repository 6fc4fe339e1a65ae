"""RMSNorm, computed in float32 and scaled in the input's dtype, as transformers' Llama/Qwen do."""
from __future__ import annotations

import torch
from torch import nn

from remp.weights.loader import sharded_parameter


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, name: str):
        super().__init__()
        self.eps = eps
        self.weight = sharded_parameter((size,), name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
