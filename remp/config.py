"""Model and engine configuration.

`ModelConfig` is read from a Hugging Face model directory through transformers'
`AutoConfig`, so every spelling of the config that transformers accepts (rope_theta or
rope_parameters, rope_scaling, tied embeddings, ...) is accepted here too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from remp.models.registry import ARCHITECTURES

if TYPE_CHECKING:
    from remp.topology import Topology

SUPPORTED_ARCHITECTURES = tuple(ARCHITECTURES)


class ModelError(ValueError):
    """The model directory cannot be served (missing files, unsupported architecture)."""


@dataclass(frozen=True)
class MoEConfig:
    """The mixture-of-experts part of a decoder: which layers route their MLP to experts, and how."""

    num_experts: int
    top_k: int  # experts per token
    intermediate_size: int  # of one expert
    renormalize: bool  # the top-k routing weights are divided by their sum
    scores_in_float: bool  # the routing weights stay float32 (Mixtral); else cast to the hidden dtype (Qwen3-MoE)
    sparse_layers: tuple[int, ...]  # layers whose MLP is the experts (the others are dense)
    shared_expert_size: int = 0  # intermediate size of an expert every token also runs, gated (Qwen2-MoE); 0: none

    @classmethod
    def from_hf(cls, arch: str, hf, num_layers: int) -> "MoEConfig | None":
        if arch == "MixtralForCausalLM":
            return cls(num_experts=hf.num_local_experts, top_k=hf.num_experts_per_tok,
                       intermediate_size=hf.intermediate_size, renormalize=True, scores_in_float=True,
                       sparse_layers=tuple(range(num_layers)))
        if arch in ("Qwen3MoeForCausalLM", "Qwen2MoeForCausalLM"):
            dense = set(getattr(hf, "mlp_only_layers", None) or ())
            step = getattr(hf, "decoder_sparse_step", 1) or 1
            layers = tuple(i for i in range(num_layers)
                           if i not in dense and hf.num_experts > 0 and (i + 1) % step == 0)
            shared = getattr(hf, "shared_expert_intermediate_size", 0) if arch == "Qwen2MoeForCausalLM" else 0
            return cls(num_experts=hf.num_experts, top_k=hf.num_experts_per_tok,
                       intermediate_size=hf.moe_intermediate_size, renormalize=bool(hf.norm_topk_prob),
                       scores_in_float=False, sparse_layers=layers, shared_expert_size=shared or 0)
        return None


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder (Llama, Mistral, Qwen2, Qwen3; Mixtral, Qwen2-MoE and Qwen3-MoE with `moe`),
    as the engine needs it."""

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
    moe: MoEConfig | None = None  # None: a dense model

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
            # Qwen2 always has q/k/v biases, Qwen2-MoE unless qkv_bias is off; Llama/Mistral only when
            # attention_bias is set.
            attention_bias=(arch == "Qwen2ForCausalLM" or (arch == "Qwen2MoeForCausalLM" and getattr(hf, "qkv_bias", True))
                            or bool(getattr(hf, "attention_bias", False))),
            max_position_embeddings=hf.max_position_embeddings,
            torch_dtype=str(dtype).replace("torch.", ""),
            eos_token_ids=eos_ids,
            moe=MoEConfig.from_hf(arch, hf, hf.num_hidden_layers),
        )

    def hf_config(self):
        """The transformers config object (rotary embedding parameters live there)."""
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(self.path)


DTYPES = {"float32": torch.float32, "float": torch.float32, "float16": torch.float16, "half": torch.float16,
          "bfloat16": torch.bfloat16}


def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matmuls run natively (oneDNN), at twice float32's rate or more."""
    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def resolve_dtype(name: str, model: ModelConfig, device: str) -> tuple[torch.dtype, str]:
    """The serving dtype for `--dtype NAME`, and why. 'auto', as vLLM's CPU and GPU builds choose:
    bfloat16 on CPUs with native bfloat16 (AVX512-BF16 or AMX), float32 on other CPUs (emulated
    bfloat16 is slower than float32 there); on GPUs the checkpoint's dtype when it is a 16-bit
    one, else bfloat16."""
    if name == "auto":
        if device == "cpu":
            if cpu_has_native_bf16():
                return torch.bfloat16, "auto: the CPU has native bfloat16 (AVX512-BF16/AMX)"
            return torch.float32, "auto: the CPU has no native bfloat16"
        if model.torch_dtype in ("float16", "bfloat16"):
            return DTYPES[model.torch_dtype], f"auto: the checkpoint's dtype on {device}"
        return torch.bfloat16, f"auto: a {model.torch_dtype} checkpoint on {device}"
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name], "asked for"


def resolve_pack_weights(asked: bool | None, dtype: torch.dtype, device: str) -> tuple[bool, str]:
    """Whether workers pack their linear weights for oneDNN (remp.layers.packed), and why. Unasked:
    where it pays, bfloat16 on a CPU with native bfloat16. Packing copies each shard into the
    worker's own memory, after each switch and beside the steps; unpacked, every weight stays a
    view of the shared store."""
    from remp.layers.packed import packing_works

    possible = device == "cpu" and dtype == torch.bfloat16 and packing_works()
    if asked and not possible:
        raise ValueError("--pack-weights needs --dtype bfloat16 on a CPU where oneDNN runs packed bfloat16 linears")
    if asked is not None:
        return asked, "asked for"
    if possible and cpu_has_native_bf16():
        return True, "auto: bfloat16 on a CPU with native bfloat16"
    return False, "auto: packing pays only for bfloat16 on a CPU with native bfloat16"


@dataclass
class EngineConfig:
    """Everything `remp serve` / `remp generate` are told at start-up."""

    model: str
    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    enable_expert_parallel: bool = False  # mixture of experts: whole experts spread over a stage's dp*tp ranks
    data_parallel_size: int = 1  # groups with their own requests and KV (data-parallel attention)
    expert_placement_strategy: str = "linear"  # of experts under expert parallelism: linear | round_robin
    worker_pool_size: int | None = None  # default: dp * tp * pp
    max_num_seqs: int = 32
    max_model_len: int | None = None  # default: min(model's max_position_embeddings, 4096)
    max_num_batched_tokens: int | None = None  # default: max(2048, max_model_len)
    block_size: int = 16
    dtype: str = "auto"
    pack_weights: bool | None = None  # default: where it pays (resolve_pack_weights)
    device: str = "cpu"
    kv_cache_space_gb: float = 1.0  # KV memory per worker
    num_kv_blocks: int | None = None  # override the number derived from kv_cache_space_gb
    threads_per_worker: int | None = None  # default: cores / active workers
    served_model_name: str | None = None
    seed: int = 0
    worker_hang_timeout_s: float = 15.0  # a worker silent this long while awaited is replaced

    @property
    def pool_size(self) -> int:
        return self.worker_pool_size or self.topology.world_size

    @property
    def topology(self) -> Topology:
        """The layout asked for at start-up."""
        from remp.topology import Topology

        return Topology(self.tensor_parallel_size, self.pipeline_parallel_size, self.enable_expert_parallel,
                        self.data_parallel_size, self.expert_placement_strategy)

    def with_topology(self, topo: Topology) -> EngineConfig:
        """This config, starting in `topo` instead (the inverse of `topology`)."""
        return replace(self, tensor_parallel_size=topo.tp, pipeline_parallel_size=topo.pp, data_parallel_size=topo.dp,
                       enable_expert_parallel=topo.ep, expert_placement_strategy=topo.placement)
