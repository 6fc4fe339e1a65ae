"""Deterministic tiny Hugging Face checkpoints for tests.

Tests need real checkpoints (config.json, safetensors, tokenizer files, chat
template) that load through the same code paths as a downloaded model, but
nothing may be fetched from a model hub here.  So we build them with the
libraries' own constructors and ``save_pretrained``: a byte-level BPE trained
on a small built-in corpus, and a randomly initialised Llama or Qwen2 model.
The same arguments always give byte-identical files, so expected outputs can
be compared across runs and processes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from huggingface_hub import save_torch_state_dict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    AutoModelForCausalLM,
    GenerationConfig,
    LlamaConfig,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    MistralConfig,
    MixtralConfig,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
)

VARIANTS = ("gqa", "mha", "qwen2", "qwen3", "mistral", "mixtral", "qwen3-moe", "qwen2-moe")
MOE_VARIANTS = ("mixtral", "qwen3-moe", "qwen2-moe")

EOS_TOKEN = "<|endoftext|>"
SPECIAL_TOKENS = [EOS_TOKEN, "<|im_start|>", "<|im_end|>"]
VOCAB_SIZE = 512

# Weight std.  With HF's usual 0.02 (and still at 0.1) the residual stream is
# dominated by the current token's embedding, so greedy decoding of the tied
# variants falls into a few repeated tokens.  0.2 gives 24-31 distinct tokens
# in 32 greedy steps on every variant, with a median top-1/top-2 logit margin
# of ~0.4 and none below 4e-3, so engines can be compared token by token.
INITIALIZER_RANGE = 0.2

# ChatML, as SmolLM2-Instruct uses, without its default system prompt.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = """\
The capital of France is Paris. The capital of Germany is Berlin, and the
capital of Italy is Rome. Paris is known for the Eiffel Tower, the Louvre and
the river Seine, which flows through the middle of the city.

A language model reads a sequence of tokens and predicts the next one. During
generation the model appends each predicted token to the sequence and runs
again, so the cost of every step depends on how much of the previous work can
be kept in a cache of keys and values.

When a user asks a question, the assistant should answer clearly and briefly.
What is one plus one? One plus one is two. What is two plus two? Two plus two
is four. Can you write a short poem about the sea? The sea is wide and grey,
the waves come in and go away, and the gulls call out at the end of the day.

Large models are often split across several devices. Tensor parallelism cuts
each weight matrix into slices, so every device holds a part of every layer.
Pipeline parallelism gives each device a contiguous range of layers instead,
and passes the hidden states from one stage to the next. A server that can
change its layout while it is running must move weights and cached state
between devices without losing the requests that are in flight.

The quick brown fox jumps over the lazy dog. She sells sea shells by the sea
shore. Numbers such as 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 42, 100 and 2024 appear
in text as well, together with punctuation: commas, full stops, question marks?
exclamation marks! colons: semicolons; quotes "like this" and (brackets).
"""


def make_tiny_model(
    out_dir: str | os.PathLike[str],
    variant: str = "gqa",
    seed: int = 0,
    max_shard_size: str | None = None,
    fused_experts: bool = False,
    hidden_size: int | None = None,
    num_layers: int | None = None,
    intermediate_size: int | None = None,
    num_experts: int | None = None,
) -> Path:
    """Write a tiny random-weight HF checkpoint of ``variant`` into ``out_dir``.

    ``variant`` is "gqa" (Llama, 8 query / 2 KV heads, untied embeddings),
    "mha" (Llama, 4 / 4 heads, tied) or "qwen2" (Qwen2 with qkv bias, 4 / 2
    heads, tied), "qwen3" (Qwen3: per-head q/k norms, head_dim 32 though
    hidden / heads is 16, 4 / 2 heads, untied), "mistral" (Mistral, 8 / 2
    heads, untied), "mixtral" (Mixtral: 8 / 2 heads, 8 experts of width 96, top-2)
    "qwen3-moe" (Qwen3-MoE: as qwen3, 8 experts of width 48, top-2 renormalised,
    layer 1 dense) or "qwen2-moe" (Qwen2-MoE: q/k/v bias, 4 / 2 heads, 8 experts of
    width 48, top-2 not renormalised, a gated shared expert of width 64, layer 2 dense).  With ``max_shard_size`` (e.g. "200KB") the weights are split
    into several safetensors files plus an index, to exercise sharded loading.
    With ``fused_experts`` (mixture-of-experts variants only) the weights are the
    model's state_dict as transformers 5 holds it in memory, each layer's experts
    fused into ``experts.gate_up_proj`` [E, 2I, H] and ``experts.down_proj``
    [E, H, I] (``save_pretrained`` writes one tensor per expert); the same seed
    gives the same values in either layout.  ``hidden_size``, ``num_layers``,
    ``intermediate_size`` (the MLP width: each expert's in the mixture-of-experts
    variants, and qwen3-moe's dense layer's too) and ``num_experts`` (MoE variants)
    replace the variant's sizes, e.g. for a model big enough that compute shows in
    a benchmark; heads, vocabulary and tokenizer stay.  Returns the directory.
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown tiny model variant {variant!r}; expected one of {VARIANTS}")
    if fused_experts and variant not in MOE_VARIANTS:
        raise ValueError(f"fused experts need a mixture-of-experts variant ({', '.join(MOE_VARIANTS)}), "
                         f"not {variant!r}")
    sizes = {"hidden_size": hidden_size, "num_hidden_layers": num_layers, "intermediate_size": intermediate_size,
             "num_experts": num_experts}
    if any(v is not None and v < 1 for v in sizes.values()):
        raise ValueError(f"model sizes must be positive: {sizes}")
    if num_experts is not None and variant not in MOE_VARIANTS:
        raise ValueError(f"num_experts needs a mixture-of-experts variant ({', '.join(MOE_VARIANTS)}), "
                         f"not {variant!r}")
    tokenizer = _build_tokenizer()
    config = _build_config(variant, tokenizer, {k: v for k, v in sizes.items() if v is not None})
    if config.hidden_size % config.num_attention_heads:
        raise ValueError(f"hidden size {config.hidden_size} must be a multiple of the {variant} variant's "
                         f"{config.num_attention_heads} attention heads")
    if variant in MOE_VARIANTS and _num_experts(config) < config.num_experts_per_tok:
        raise ValueError(f"{_num_experts(config)} experts are fewer than the {config.num_experts_per_tok} "
                         f"each token is routed to")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    _randomize_norms_and_biases(model)
    # pad_token_id lives only here: in the model config it would make HF zero
    # the eos row of the embedding (padding_idx), and with tied weights pin the
    # eos logit at exactly 0.
    eos_id = config.eos_token_id
    model.generation_config = GenerationConfig(
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id, do_sample=False
    )
    save_kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(out, safe_serialization=True, **save_kwargs)
    if fused_experts:
        # save_pretrained converts the experts back to one tensor each; this writes them as they
        # are in memory, in place of its safetensors files (which this removes first).
        save_torch_state_dict(model.state_dict(), out, metadata={"format": "pt"}, **save_kwargs)
    tokenizer.save_pretrained(out)
    return out


def _randomize_norms_and_biases(model: torch.nn.Module) -> None:
    """Give RMSNorm weights and biases random values instead of HF's 1 and 0.

    With the defaults an engine that skipped or swapped these tensors would
    still reproduce the reference outputs; random values make tests catch it.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, INITIALIZER_RANGE)
            elif name.endswith(".bias"):
                param.normal_(0.0, INITIALIZER_RANGE)


def _build_tokenizer() -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on the built-in corpus to exactly ``VOCAB_SIZE`` tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS.split("\n\n"), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        unk_token=EOS_TOKEN,
        pad_token=EOS_TOKEN,
        additional_special_tokens=SPECIAL_TOKENS[1:],
        model_max_length=512,
    )
    fast.chat_template = CHAT_TEMPLATE
    if len(fast) != VOCAB_SIZE:
        raise RuntimeError(f"tiny tokenizer has {len(fast)} tokens, expected {VOCAB_SIZE}")
    return fast


def _num_experts(config: PretrainedConfig) -> int:
    return config.num_local_experts if hasattr(config, "num_local_experts") else config.num_experts


def _build_config(variant: str, tokenizer: PreTrainedTokenizerFast,
                  sizes: dict[str, int] | None = None) -> PretrainedConfig:
    """Return the transformers config for a validated ``variant``, sized to ``tokenizer``.

    ``sizes`` replaces any of hidden_size, num_hidden_layers, intermediate_size (each expert's
    width in the mixture-of-experts variants) and num_experts (MoE variants).
    """
    sizes = dict(sizes or {})
    eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    num_experts = sizes.pop("num_experts", 8)
    width = sizes.get("intermediate_size")
    common = dict(
        vocab_size=len(tokenizer),
        hidden_size=sizes.get("hidden_size", 64),
        intermediate_size=width or 128,
        num_hidden_layers=sizes.get("num_hidden_layers", 4),
        max_position_embeddings=512,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-6,
        initializer_range=INITIALIZER_RANGE,
        bos_token_id=eos_id,
        eos_token_id=eos_id,
        dtype="float32",
    )
    if variant == "gqa":
        return LlamaConfig(
            num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, **common
        )
    if variant == "mha":
        return LlamaConfig(
            num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True, **common
        )
    if variant == "qwen2":
        return Qwen2Config(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **common
        )
    if variant == "qwen3":
        return Qwen3Config(
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, **common
        )
    if variant == "mistral":
        return MistralConfig(
            num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None, **common
        )
    # Mixture of experts: 8 experts unless `sizes` says (more than a pool of 4 has ranks; whole on 2 or 4 of them),
    # top-2; random routers send tokens to experts unevenly.
    if variant == "mixtral":
        return MixtralConfig(
            num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=False, sliding_window=None,
            num_local_experts=num_experts, num_experts_per_tok=2, **{**common, "intermediate_size": width or 96}
        )
    if variant == "qwen2-moe":
        return Qwen2MoeConfig(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False, num_experts=num_experts,
            num_experts_per_tok=2, moe_intermediate_size=width or 48, shared_expert_intermediate_size=64,
            norm_topk_prob=False, mlp_only_layers=[2], **common
        )
    return Qwen3MoeConfig(
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, tie_word_embeddings=False,
        num_experts=num_experts, num_experts_per_tok=2, moe_intermediate_size=width or 48, norm_topk_prob=True,
        mlp_only_layers=[1], **common
    )
