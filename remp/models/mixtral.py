"""Mixtral: the Llama layout with every MLP a mixture of experts (remp.layers.moe): top-2 of
the router's softmax, renormalised. Published checkpoints and transformers' save_pretrained name
the block `block_sparse_moe` and its experts w1 (gate), w3 (up), w2 (down), a tensor each;
transformers 5 renames the block `mlp` in memory and fuses the experts (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`), so a checkpoint saved from its state_dict has those names. The block is
looked up under both names, the experts in both layouts (ExpertMLP)."""
from __future__ import annotations

from torch import nn

from remp.config import ModelConfig
from remp.layers.moe import SparseMoE
from remp.models.llama import LlamaDecoderLayer, LlamaForCausalLM
from remp.parallel.context import ParallelContext
from remp.weights.loader import also_named


class MixtralDecoderLayer(LlamaDecoderLayer):
    def make_mlp(self, cfg: ModelConfig, ctx: ParallelContext, layer: int, prefix: str) -> nn.Module:
        moe = SparseMoE(cfg, ctx, f"{prefix}.block_sparse_moe", ("w1", "w3", "w2"))
        also_named(moe, ".block_sparse_moe.", ".mlp.")
        return moe


class MixtralForCausalLM(LlamaForCausalLM):
    layer_class = MixtralDecoderLayer
