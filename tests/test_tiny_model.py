"""The tiny test checkpoints are deterministic and load as real HF models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from remp.testing.tiny_model import make_tiny_model


@pytest.fixture(scope="module")
def gqa_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("gqa"), "gqa")


def test_same_seed_gives_identical_files(gqa_dir: Path, tmp_path: Path) -> None:
    again = make_tiny_model(tmp_path / "again", "gqa", seed=0)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (gqa_dir / name).read_bytes(), name


def test_different_seed_gives_different_weights(gqa_dir: Path, tmp_path: Path) -> None:
    other = make_tiny_model(tmp_path / "other", "gqa", seed=1)
    weights = "model.safetensors"
    assert (other / weights).read_bytes() != (gqa_dir / weights).read_bytes()


def test_gqa_config(gqa_dir: Path) -> None:
    config = json.loads((gqa_dir / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(gqa_dir)
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (8, 2)
    assert config["tie_word_embeddings"] is False
    assert config["vocab_size"] == len(tokenizer) == 512
    assert config["eos_token_id"] == tokenizer.eos_token_id


@pytest.mark.parametrize(
    ("variant", "arch", "heads", "tied"),
    [("mha", "LlamaForCausalLM", (4, 4), True), ("qwen2", "Qwen2ForCausalLM", (4, 2), True)],
)
def test_other_variants_load(
    variant: str, arch: str, heads: tuple[int, int], tied: bool, tmp_path: Path
) -> None:
    model = AutoModelForCausalLM.from_pretrained(make_tiny_model(tmp_path, variant))
    config = model.config
    assert type(model).__name__ == arch
    assert (config.num_attention_heads, config.num_key_value_heads) == heads
    assert config.tie_word_embeddings is tied
    layer = model.model.layers[0]
    assert not torch.all(layer.input_layernorm.weight == 1), "norm weights left at 1"
    if variant == "qwen2":
        assert torch.count_nonzero(layer.self_attn.q_proj.bias) > 0, "qkv bias left at 0"


def test_greedy_generate_is_varied(gqa_dir: Path) -> None:
    """Random weights must still give distinct tokens and clear top-1 margins."""
    model = AutoModelForCausalLM.from_pretrained(gqa_dir)
    tokenizer = AutoTokenizer.from_pretrained(gqa_dir)
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(
        ids,
        max_new_tokens=16,
        min_new_tokens=16,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
    )
    new_tokens = out.sequences[0, ids.shape[1] :].tolist()
    assert len(new_tokens) == 16
    assert len(set(new_tokens)) >= 8
    margins = torch.stack([s[0].topk(2).values for s in out.scores])
    assert (margins[:, 0] - margins[:, 1]).median() > 1e-2


def test_sharded_checkpoint_loads_like_single_file(gqa_dir: Path, tmp_path: Path) -> None:
    sharded = make_tiny_model(tmp_path, "gqa", max_shard_size="200KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert not (sharded / "model.safetensors").exists()
    a = AutoModelForCausalLM.from_pretrained(sharded).state_dict()
    b = AutoModelForCausalLM.from_pretrained(gqa_dir).state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_tokenizer_roundtrip_and_chat_template(gqa_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(gqa_dir)
    text = "Hello, world! The capital of France is Paris. Ünïcode ✓"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert tokenizer.eos_token == "<|endoftext|>"
    messages = [{"role": "user", "content": "What is 1+1?"}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nWhat is 1+1?<|im_end|>\n<|im_start|>assistant\n"
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)
    assert ids["input_ids"][0] == tokenizer.convert_tokens_to_ids("<|im_start|>")


def test_unknown_variant_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown tiny model variant"):
        make_tiny_model(tmp_path, "gpt2")
