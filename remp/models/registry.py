"""Which model class serves a checkpoint: its config's `architectures` name -> remp class.

A family is one file in remp/models plus a line here. Classes are named as strings and imported
on first use, so reading a config (the engine, the CLI) does not import the model code.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "remp.models.llama:LlamaForCausalLM",
    "MistralForCausalLM": "remp.models.llama:LlamaForCausalLM",
    "Qwen2ForCausalLM": "remp.models.llama:LlamaForCausalLM",
    "Qwen3ForCausalLM": "remp.models.qwen3:Qwen3ForCausalLM",
    "MixtralForCausalLM": "remp.models.mixtral:MixtralForCausalLM",
    "Qwen3MoeForCausalLM": "remp.models.qwen3_moe:Qwen3MoeForCausalLM",
    "Qwen2MoeForCausalLM": "remp.models.qwen2_moe:Qwen2MoeForCausalLM",
}


def model_class(architecture: str) -> type[nn.Module]:
    """The class for `architecture` (KeyError for one remp does not serve: ModelConfig refuses
    those when it reads the config)."""
    module, _, name = ARCHITECTURES[architecture].partition(":")
    return getattr(importlib.import_module(module), name)
