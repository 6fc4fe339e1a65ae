"""Model and engine configuration.

`ModelConfig` is read from a Hugging Face model directory through transformers'
`AutoConfig`, so every spelling of the config that transformers accepts (rope_theta or
rope_parameters, rope_scaling, tied embeddings, ...) is accepted here too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from remp.models.registry import ARCHITECTURES

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


class ModelError(ValueError):
    """The model directory cannot be served (missing files, unsupported architecture)."""


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a dense decoder (Llama, Mistral, Qwen2, Qwen3), as the engine needs it."""

    path: str
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    tie_word_embeddings: bool
    attention_bias: bool
    max_position_embeddings: int
    torch_dtype: str
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> "ModelConfig":
        from transformers import AutoConfig

        path = str(path)
        if not Path(path, "config.json").is_file():
            raise ModelError(f"{path!r} is not a model directory: no config.json there")
        hf = AutoConfig.from_pretrained(path)
        archs = list(getattr(hf, "architectures", None) or [])
        arch = archs[0] if archs else ""
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ModelError(f"unsupported architecture {arch or hf.model_type!r}; remp serves "
                             f"{', '.join(SUPPORTED_ARCHITECTURES)}")
        if "sliding_attention" in (getattr(hf, "layer_types", None) or ()):
            raise ModelError(f"{arch} with sliding-window attention layers is not supported; remp serves "
                             f"full attention only (use_sliding_window must be false)")
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        eos = hf.eos_token_id
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (eos,))
        dtype = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None) or "float32"
        return cls(
            path=path,
            architecture=arch,
            vocab_size=hf.vocab_size,
            hidden_size=hf.hidden_size,
            intermediate_size=hf.intermediate_size,
            num_layers=hf.num_hidden_layers,
            num_heads=hf.num_attention_heads,
            num_kv_heads=getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads,
            head_dim=head_dim,
            rms_norm_eps=hf.rms_norm_eps,
            tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", False)),
            # Qwen2 always has q/k/v biases; Llama/Mistral only when attention_bias is set.
            attention_bias=arch == "Qwen2ForCausalLM" or bool(getattr(hf, "attention_bias", False)),
            max_position_embeddings=hf.max_position_embeddings,
            torch_dtype=str(dtype).replace("torch.", ""),
            eos_token_ids=eos_ids,
        )

    def hf_config(self):
        """The transformers config object (rotary embedding parameters live there)."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path)


def resolve_dtype(name: str, model: ModelConfig, device: str) -> torch.dtype:
    """'auto' means the checkpoint's dtype on GPU and float32 on CPU, where half-precision
    matmuls are slow on most processors."""
    if name == "auto":
        name = model.torch_dtype if device != "cpu" else "float32"
    table = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16,
             "half": torch.float16, "bfloat16": torch.bfloat16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(table)}")
    return table[name]


@dataclass
class EngineConfig:
    """Everything `remp serve` / `remp generate` are told at start-up."""

    model: str
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    worker_pool_size: int | None = None  # default: tp * pp
    max_num_seqs: int = 32
    max_model_len: int | None = None  # default: min(model's max_position_embeddings, 4096)
    max_num_batched_tokens: int | None = None  # default: max(2048, max_model_len)
    block_size: int = 16
    dtype: str = "auto"
    device: str = "cpu"
    kv_cache_space_gb: float = 1.0  # KV memory per worker
    num_kv_blocks: int | None = None  # override the number derived from kv_cache_space_gb
    threads_per_worker: int | None = None  # default: cores / active workers
    served_model_name: str | None = None
    seed: int = 0
    worker_hang_timeout_s: float = 15.0  # a worker silent this long while awaited is replaced

    @property
    def pool_size(self) -> int:
        return self.worker_pool_size or self.tensor_parallel_size * self.pipeline_parallel_size
