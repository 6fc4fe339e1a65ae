"""Mixtral: the Llama layout with every MLP a mixture of experts (remp.layers.moe): top-2 of
the router's softmax, renormalised, experts named w1 (gate), w3 (up), w2 (down) under
`block_sparse_moe`, as published checkpoints and transformers' save_pretrained write them."""
from __future__ import annotations

from torch import nn

from remp.config import ModelConfig
from remp.layers.moe import SparseMoE
from remp.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from remp.parallel.context import ParallelContext


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, cfg: ModelConfig, ctx: ParallelContext, layer: int, prefix: str) -> nn.Module:
        return SparseMoE(cfg, ctx, f"{prefix}.block_sparse_moe", ("w1", "w3", "w2"))


class MixtralForCausalLM(LlamaForCausalLM):
    layer_class = MixtralDecoderLayer
