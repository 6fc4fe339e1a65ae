"""Qwen2-MoE: the Llama layout with Qwen2's q/k/v biases, whose MLPs are mixtures of experts
(remp.layers.moe) on the layers the config names (`decoder_sparse_step`, not in
`mlp_only_layers`), dense elsewhere: top-k of the router's softmax (renormalised when
`norm_topk_prob`), plus a shared expert every token runs, scaled by the sigmoid of its own gate
(`mlp.shared_expert`, `mlp.shared_expert_gate`). Experts named gate_proj, up_proj, down_proj
under `mlp.experts.{e}`, a tensor each, or fused as transformers 5 holds them in memory
(remp.layers.moe.ExpertMLP tells which)."""
from __future__ import annotations

from remp.layers.moe import QwenSparseLayers
from remp.models.llama import LlamaDecoderLayer, LlamaForCausalLM


class Qwen2MoeDecoderLayer(QwenSparseLayers, LlamaDecoderLayer):
    pass


class Qwen2MoeForCausalLM(LlamaForCausalLM):
    layer_class = Qwen2MoeDecoderLayer
