"""Qwen3-MoE: Qwen3 (q/k norms, explicit head_dim) whose MLPs are mixtures of experts
(remp.layers.moe) on the layers the config names (`decoder_sparse_step`, not in
`mlp_only_layers`), dense elsewhere; top-k of the router's softmax, renormalised when
`norm_topk_prob`; experts named gate_proj, up_proj, down_proj under `mlp`, one tensor each, or
fused as transformers 5 holds them in memory (`mlp.experts.gate_up_proj`, `mlp.experts.down_proj`;
remp.layers.moe.ExpertMLP tells which)."""
from __future__ import annotations

from remp.layers.moe import QwenSparseLayers
from remp.models.qwen3 import Qwen3DecoderLayer, Qwen3ForCausalLM


class Qwen3MoeDecoderLayer(QwenSparseLayers, Qwen3DecoderLayer):
    pass


class Qwen3MoeForCausalLM(Qwen3ForCausalLM):
    layer_class = Qwen3MoeDecoderLayer
