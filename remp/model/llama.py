"""Forward pass of one rank's part of a Llama-family decoder (Llama, Mistral, Qwen2).

Tensor parallelism follows Megatron: q/k/v and gate/up are column-parallel, o and down
row-parallel with one all-reduce after attention and one after the MLP; the embedding and
LM head are split over the vocabulary. The weights are views of the mapped checkpoint
(remp.weights.store), so projections are not fused. Pipeline parallelism gives each stage a
contiguous run of layers; the hidden state travels between stages (see remp.worker).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from remp.config import ModelConfig
from remp.kv.cache import KVCache
from remp.topology import Topology


class StepCut(Exception):
    """A step was cut short at a check (see remp.executor.cut and StageModel.forward)."""


def with_cut_flag(x: torch.Tensor, cut: bool) -> torch.Tensor:
    """`x` flattened, with one more element that says whether the step is cut: how a cut
    travels with a tensor that moves anyway (summed by a TP all-reduce, carried by a pipeline
    send). The receiver reads the flag at [-1] and the tensor from [:-1]."""
    return torch.cat([x.reshape(-1), x.new_full((1,), float(cut))])


@dataclass
class Batch:
    """One step's tokens on a worker: sequences laid end to end ([T] tensors), plus what
    attention needs to find each sequence's context in the paged cache."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    slots: torch.Tensor
    block_size: int
    q_lens: list[int]
    starts: list[int]  # tokens already in the cache before this step: 0 (prompt) or len-1 (decode)
    block_tables: list[list[int]]
    device: torch.device

    def __post_init__(self) -> None:
        offsets = [0]
        for n in self.q_lens:
            offsets.append(offsets[-1] + n)
        self.offsets = offsets
        self.last_token_idx = torch.tensor([o - 1 for o in offsets[1:]], device=self.device)
        self.fresh_blocks = self.slots[self.slots % self.block_size == 0] // self.block_size
        # A step holds whole prompts (start 0; a preempted request recomputes from 0) and
        # one-token decodes; nothing else is scheduled.
        self.decode = [i for i, start in enumerate(self.starts) if start > 0]
        self.prefill = [i for i, start in enumerate(self.starts) if start == 0]
        if any(self.q_lens[i] != 1 for i in self.decode):
            raise ValueError("a step continuing a sequence must carry exactly one token")
        if self.decode:
            width = max(len(self.block_tables[i]) for i in self.decode)
            # Pad with the sequence's own first block: its bytes are masked out, and unlike an
            # arbitrary block they are written (never uninitialised memory that could hold NaN).
            tables = [self.block_tables[i] + self.block_tables[i][:1] * (width - len(self.block_tables[i]))
                      for i in self.decode]
            self.decode_tables = torch.tensor(tables, device=self.device)
            self.decode_tokens = torch.tensor([offsets[i] for i in self.decode], device=self.device)
            self.decode_ctx = torch.tensor([self.starts[i] + 1 for i in self.decode], device=self.device)


class StageModel:
    """The layers, heads, MLP slice and vocabulary slice one rank owns under one topology."""

    def __init__(self, model: ModelConfig, topo: Topology, rank: int, weights: dict[str, torch.Tensor],
                 tp_group: dist.ProcessGroup | None, hf_config, device: torch.device):
        self.cfg = model
        self.topo = topo
        self.stage, self.tp_rank = topo.coords(rank)
        self.layers = topo.layers_of(self.stage, model.num_layers)
        self.is_first = self.stage == 0
        self.is_last = self.stage == topo.pp - 1
        self.tp_group = tp_group if topo.tp > 1 else None
        self.w = {k: v.to(device) for k, v in weights.items()}
        self.device = device
        self.num_heads = len(topo.heads_of(self.tp_rank, model.num_heads))
        self.num_kv_heads = len(topo.kv_heads_of(self.tp_rank, model.num_kv_heads))
        self.vocab = topo.vocab_slice(self.tp_rank, model.vocab_size)
        self.rotary = LlamaRotaryEmbedding(hf_config).to(device)

    def _all_reduce(self, x: torch.Tensor, cut: Callable[[], bool] | None = None) -> torch.Tensor:
        """Sum `x` over the tensor-parallel group. With `cut`, also decide whether the step stops
        here (raising StepCut): every rank adds its own answer in one extra element of the same
        all-reduce, so all ranks of the stage stop at the same layer or none does — one leaving
        alone would strand the others in their next collective."""
        if self.tp_group is None:
            self._stop_if_cut(cut)
            return x
        if cut is None:
            dist.all_reduce(x, group=self.tp_group)
            return x
        flat = with_cut_flag(x, cut())
        dist.all_reduce(flat, group=self.tp_group)
        if flat[-1].item() > 0:
            raise StepCut
        return flat[:-1].view_as(x)

    def _stop_if_cut(self, cut: Callable[[], bool] | None) -> None:
        """A check only a rank with no tensor peers (tp=1) acts on, since it may stop alone: the
        all-reduce's own check when there is no group, three more within attention and MLP, and
        one between lm_head chunks (`_logits`). There, a layer has five checks, not two: a prefill
        layer takes up to ~13 ms on 2 cores, and a switch waits for the check after the cut."""
        if cut is not None and self.tp_group is None and cut():
            raise StepCut

    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.cfg.rms_norm_eps)
        return weight * x.to(dtype)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        table = self.w["embed"]
        if self.tp_group is None:
            return F.embedding(input_ids, table)
        local = input_ids - self.vocab.start
        outside = (local < 0) | (local >= len(self.vocab))
        h = F.embedding(local.masked_fill(outside, 0), table)
        h = h.masked_fill(outside.unsqueeze(-1), 0.0)
        return self._all_reduce(h)

    def forward(self, batch: Batch, hidden: torch.Tensor | None, kv: KVCache,
                cut: Callable[[], bool] | None = None) -> torch.Tensor:
        """Run this stage's layers. Returns the hidden state [T, hidden] on inner stages and
        this rank's vocabulary slice of the last-token logits [B, V/tp] on the last stage.
        `cut()`, asked after each attention and each MLP (and, at tp=1, within them too: see
        `_stop_if_cut`), stops the step there with StepCut: the KV it wrote lies past what the
        engine counts as computed, and is written again when the step reruns. (Asked after each
        layer only, a cut waited up to a layer: 3 ms at tp1pp1 and ~10 ms at tp3pp1 for a SmolLM2
        decode on 2 cores.)"""
        h = self.embed(batch.input_ids) if self.is_first else hidden
        cos, sin = self.rotary(h, batch.positions.unsqueeze(0))
        cos, sin = cos[0], sin[0]
        for layer in self.layers:
            x = self._rms_norm(h, self.w[f"{layer}.input_norm"])
            h = h + self._attention(layer, x, cos, sin, batch, kv, cut)
            x = self._rms_norm(h, self.w[f"{layer}.post_norm"])
            h = h + self._mlp(layer, x, cut)
        if not self.is_last:
            return h
        last = self._rms_norm(h[batch.last_token_idx], self.w["norm"])
        return self._logits(last, cut)

    def _logits(self, x: torch.Tensor, cut: Callable[[], bool] | None) -> torch.Tensor:
        """This rank's vocabulary slice of the logits of `x`. Where a rank may stop alone (tp=1),
        in chunks of as many weights as one MLP reads, with a cut check between: the lm_head
        reads the whole embedding (113 MB for SmolLM2, 26-28 ms on one idle core here), and was
        the longest stretch of a step without a check (traced: a last stage ran 5-15 ms past a
        cut). Each logit is the same dot product either way: bitwise equal, no slower."""
        weight = self.w["lm_head"]
        if cut is None or self.tp_group is not None:
            return F.linear(x, weight)
        chunks = []
        for rows in weight.split(3 * self.cfg.intermediate_size):
            self._stop_if_cut(cut)
            chunks.append(F.linear(x, rows))
        return torch.cat(chunks, dim=-1)

    def _mlp(self, layer: int, x: torch.Tensor, cut: Callable[[], bool] | None = None) -> torch.Tensor:
        gate, up = F.linear(x, self.w[f"{layer}.gate"]), F.linear(x, self.w[f"{layer}.up"])
        self._stop_if_cut(cut)
        return self._all_reduce(F.linear(F.silu(gate) * up, self.w[f"{layer}.down"]), cut)

    def _attention(self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   batch: Batch, kv: KVCache, cut: Callable[[], bool] | None = None) -> torch.Tensor:
        hd = self.cfg.head_dim
        t = x.shape[0]
        q, k, v = (F.linear(x, self.w[f"{layer}.{p}"], self.w.get(f"{layer}.{p}_bias")) for p in "qkv")
        q = q.view(t, self.num_heads, hd)
        k = k.view(t, self.num_kv_heads, hd)
        v = v.view(t, self.num_kv_heads, hd)
        q, k = apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1)
        kv.write(layer, batch.slots, k, v, batch.fresh_blocks)
        self._stop_if_cut(cut)
        out = torch.empty_like(q)
        if batch.decode:
            keys, values = kv.gather(layer, batch.decode_tables)
            width = keys.shape[2]
            mask = torch.arange(width, device=self.device)[None, :] < batch.decode_ctx[:, None]
            qd = q[batch.decode_tokens].unsqueeze(2)
            o = F.scaled_dot_product_attention(qd, keys, values, attn_mask=mask[:, None, None, :], enable_gqa=True)
            out[batch.decode_tokens] = o.squeeze(2)
        for i in batch.prefill:
            s, e = batch.offsets[i], batch.offsets[i + 1]
            qs = q[s:e].transpose(0, 1).unsqueeze(0)
            keys = k[s:e].transpose(0, 1).unsqueeze(0)
            values = v[s:e].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qs, keys, values, is_causal=True, enable_gqa=True)
            out[s:e] = o[0].transpose(0, 1)
        self._stop_if_cut(cut)
        return self._all_reduce(F.linear(out.view(t, self.num_heads * hd), self.w[f"{layer}.o"]), cut)

