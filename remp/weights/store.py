"""The checkpoint, opened once, sliced into any rank's shard for any topology.

Safetensors files are memory-mapped, so every worker on a host reads the same page-cache
pages: the checkpoint sits in host memory once however many workers open it, and a
worker builds the shard for a new (topology, rank) by slicing, without reading files
again and without talking to other workers.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open

from remp.config import ModelConfig, ModelError
from remp.topology import Topology


class WeightStore:
    """Named tensors of a (possibly sharded) safetensors checkpoint."""

    def __init__(self, model_dir: str):
        root = Path(model_dir)
        index = root / "model.safetensors.index.json"
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        elif (root / "model.safetensors").is_file():
            files = ["model.safetensors"]
        else:
            raise ModelError(f"no model.safetensors or model.safetensors.index.json in {model_dir!r}")
        self._handles = [safe_open(str(root / f), framework="pt") for f in files]
        self._where = {name: h for h in self._handles for name in h.keys()}

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def rows(self, name: str, idx: range) -> torch.Tensor:
        """Rows idx of a tensor (whole tensor for 1-D); rows past the end are zero (vocab padding)."""
        sl = self._where[name].get_slice(name)
        n = sl.get_shape()[0]
        part = sl[idx.start:min(idx.stop, n)]
        if idx.stop > n:
            pad = torch.zeros((idx.stop - max(idx.start, n),) + tuple(part.shape[1:]), dtype=part.dtype)
            part = torch.cat([part, pad])
        return part

    def cols(self, name: str, idx: range) -> torch.Tensor:
        return self._where[name].get_slice(name)[:, idx.start:idx.stop]

    def full(self, name: str) -> torch.Tensor:
        return self._where[name].get_tensor(name)

    def shard(self, model: ModelConfig, topo: Topology, rank: int, dtype: torch.dtype,
              reuse: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The tensors rank `rank` needs under `topo`, keyed by local names.

        q/k/v and gate/up are concatenated into one column-parallel matrix each so a layer
        runs two matmuls where the checkpoint has five. Tensors found in `reuse` (this rank's
        shard under a layout with the same tensor split) are taken as they are, not sliced again.
        """
        stage, t = topo.coords(rank)
        hd = model.head_dim
        heads = topo.heads_of(t, model.num_heads)
        kv = topo.kv_heads_of(t, model.num_kv_heads)
        q_rows = range(heads.start * hd, heads.stop * hd)
        kv_rows = range(kv.start * hd, kv.stop * hd)
        mlp = topo.mlp_slice(t, model.intermediate_size)
        vocab = topo.vocab_slice(t, model.vocab_size)
        wanted: dict[str, Callable[[], torch.Tensor]] = {}
        if stage == 0:
            wanted["embed"] = lambda: self.rows("model.embed_tokens.weight", vocab)
        if stage == topo.pp - 1:
            head = "lm_head.weight"
            if model.tie_word_embeddings or head not in self:
                head = "model.embed_tokens.weight"
            wanted["norm"] = lambda: self.full("model.norm.weight")
            wanted["lm_head"] = lambda: self.rows(head, vocab)
        for layer in topo.layers_of(stage, model.num_layers):
            p = f"model.layers.{layer}."
            a = p + "self_attn."

            def qkv(kind: str, a: str = a) -> torch.Tensor:
                return torch.cat([self.rows(a + f"q_proj.{kind}", q_rows), self.rows(a + f"k_proj.{kind}", kv_rows),
                                  self.rows(a + f"v_proj.{kind}", kv_rows)])

            wanted[f"{layer}.qkv"] = lambda qkv=qkv: qkv("weight")
            if model.attention_bias:
                wanted[f"{layer}.qkv_bias"] = lambda qkv=qkv: qkv("bias")
            wanted[f"{layer}.o"] = lambda a=a: self.cols(a + "o_proj.weight", q_rows)
            wanted[f"{layer}.gate_up"] = lambda p=p: torch.cat([self.rows(p + "mlp.gate_proj.weight", mlp),
                                                                self.rows(p + "mlp.up_proj.weight", mlp)])
            wanted[f"{layer}.down"] = lambda p=p: self.cols(p + "mlp.down_proj.weight", mlp)
            wanted[f"{layer}.input_norm"] = lambda p=p: self.full(p + "input_layernorm.weight")
            wanted[f"{layer}.post_norm"] = lambda p=p: self.full(p + "post_attention_layernorm.weight")
        reuse = reuse or {}
        return {k: reuse[k] if k in reuse else load().to(dtype).contiguous() for k, load in wanted.items()}
