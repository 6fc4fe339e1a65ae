"""A roofline-model `Profile` for hardware we do not have.

The policy and the simulator only need, per layout, a prefill curve, a decode surface, a KV
capacity and switch costs. `analytic_profile` derives them from a model's shape and a GPU
pool's datasheet numbers, so a policy can be tried on "Llama-70B on 8 H100s" or "Mixtral on 8
H100s" from a laptop.

The model (per layout dp x tp x pp, ep; a "stage" is one pipeline stage, its slowest one when
the layers do not split evenly; each of the dp data-parallel groups of a stage runs its own
requests on tp GPUs, and a step's tokens are spread evenly over the groups):
- GPU time of a stage for m tokens = max(memory time, compute time) + a fixed kernel overhead
  per layer. Memory: the weights a GPU reads once per micro-batch plus its share of the KV
  (its group's sequences x context x its KV heads). Compute: 2 FLOPs per weight per token a GPU
  processes (attention FLOPs are small next to its KV reads and are left out). Prefill of N
  tokens computes the same per token and reads the weights once (its attention's quadratic
  term, under 10% below 4k tokens on 7B-class models, is left out). Bandwidth and FLOPs are the
  datasheet's times an achievable-efficiency factor.
- Dense weights (attention, a dense MLP, shared experts, embeddings) are cut over the tp GPUs
  of a group and held by every group. Tensor parallelism adds a ring all-reduce of the group's
  activations after attention and after the MLP: 2 (tp-1) link latencies + 2 (tp-1)/tp *
  bytes / link bandwidth - a latency that load does not amortise and a bandwidth term that
  grows with the batch.
- A mixture-of-experts layer reads only the experts its tokens choose (`remp.policy.expert_load`,
  uniform routing). Without `ep` (TP) each group's tokens go through every GPU of the group,
  which holds 1/tp of every expert: a GPU reads 1/tp of each expert its group's tokens activate
  and computes 1/tp of the group's token-expert pairs; the MLP all-reduce combines them. With
  `ep` the stage's dp*tp GPUs hold num_experts / (dp*tp) whole experts each, and the step waits
  for the most loaded one: its expected distinct active experts (bytes) and token-expert pairs
  (FLOPs). At a small batch the GPUs read the same bytes in total either way, but under EP they
  fall unevenly, whole experts on a few GPUs, so the slowest GPU reads a whole expert where
  every TP GPU reads 1/tp of a few: TP is faster. At a large batch every expert is active and
  both read 1/(dp*tp) of them per GPU. With dp = 1 the tensor all-reduce combines the experts,
  as under TP; with dp > 1 the tokens go to the experts' owners and back by all-to-all
  (dispatch and combine, each a fixed latency + the rank's share of the group's token-expert
  pairs over the link, all the stage's groups at once), followed by the group's all-reduce when
  tp > 1 (each tensor rank sends 1/tp of the group's tokens).
- Data-parallel attention (dp > 1): every group holds the dense weights (attention replicated
  dp times over the stage), so a GPU reads more dense bytes than tp = dp*tp would make it read,
  but its all-reduces span only its group and its KV holds only its group's sequences, with
  all of the model's KV heads cut tp ways (no head replicated when tp*dp exceeds the KV
  heads). KV capacity per group is `kv_memory_bytes` per GPU over the KV a token costs one GPU
  of the group; the instance holds dp times that, and runs dp times `max_num_seqs`.
- Pipeline parallelism adds one hop per stage boundary (latency + activations / link
  bandwidth) and splits the batch into k = min(pp, B) micro-batches of m = B / k. One token
  of a micro-batch goes round all pp stages plus the engine's host work (scheduling,
  sampling: a fixed part per step and a part per sequence) before the next one can start,
  while the other micro-batches use the other stages and the host meanwhile, so
  TPOT(B) = max(host(m) + pp * stage(m), k * stage(m), k * host(m)). pp therefore does not
  help one request (a token still crosses every stage, and each micro-batch re-reads the
  weights) but at high load it overlaps the host work and avoids all-reduces; tp is the
  other way round. With pp = 1 this is host(B) + stage(B).
- A prefill's latency is pp * stage(N) + host work; for the policy and the simulator it
  occupies each stage for 1/pp of that (see `remp.policy.policy`). With dp > 1 a step's prompt
  tokens are spread over the groups, so a lone prompt's own latency is understated.
- KV capacity: `kv_memory_bytes` per GPU (the engine's --kv-cache-space) over the KV bytes
  one token costs that GPU: its stage's layers x its KV heads (kv_heads / tp, or one head
  replicated when tp > kv_heads) x head_dim x 2 (K and V) x bytes per parameter.
- Switch cost: the pause moves the live KV to its new owners (assumed `live_kv_fraction` of
  the source's capacity, at most the target's), every GPU receiving in parallel over its
  link, plus a fixed commit time. A GPU lacks the KV of the layers, KV heads and requests
  (its group's share) it holds in the target but not in the source, so TP <-> EP at the same
  dp moves none and tp <-> dp moves whole requests' KV. The whole switch adds the weight bytes
  each GPU lacks for its new shard (dense weights by layer and head; experts by layer, expert
  and slice of the intermediate width), read from host memory while the old layout still
  serves: TP <-> EP at the same dp re-views only expert weights.
Not modelled: overlap of communication with compute, chunked prefill, prefix caching,
speculative decoding, memory fragmentation, NUMA and multi-node link hierarchies, routing skew
(real routers load experts unevenly, which hurts EP's slowest GPU more than this says), the
lower efficiency of grouped GEMMs with few tokens per expert, and a data-parallel group left
with fewer requests than the others (the groups are taken as evenly loaded).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from fractions import Fraction
from functools import cached_property

from remp.config import ModelConfig, MoEConfig
from remp.policy.expert_load import distinct_experts, max_active_per_rank, max_pairs_per_rank
from remp.policy.profile import DecodePoint, LayoutProfile, PrefillPoint, Profile, SwitchCost
from remp.topology import Coords, Topology, valid_layouts

ACTIVATION_BYTES = 2  # bf16 activations on the wire, whatever the weights' precision
PREFILL_TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
CONTEXT_LENS = (128, 512, 2048, 8192)


@dataclass(frozen=True)
class MoEShape:
    """The mixture-of-experts part of a decoder: every layer's MLP is `num_experts` experts of
    which each token uses `top_k`, plus `num_shared_experts` every token uses."""

    num_experts: int
    top_k: int
    expert_intermediate_size: int
    num_shared_experts: int = 0
    shared_intermediate_size: int = 0


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a decoder-only transformer, dense or a mixture of experts."""

    name: str
    num_params: float  # all of them, as published
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    bytes_per_param: float = 2.0
    head_size: int | None = None  # per attention head; None: hidden_size / num_heads
    moe: MoEShape | None = None

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden_size // self.num_heads

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.bytes_per_param

    @property
    def expert_params(self) -> float:
        """One routed expert of one layer (gate, up and down projections)."""
        return 0.0 if self.moe is None else 3.0 * self.hidden_size * self.moe.expert_intermediate_size

    @property
    def routed_params(self) -> float:
        """Every routed expert of every layer."""
        return 0.0 if self.moe is None else self.num_layers * self.moe.num_experts * self.expert_params

    @property
    def dense_params(self) -> float:
        """The weights every token uses (attention, dense MLP or shared experts, router,
        embeddings): everything but the routed experts."""
        return self.num_params - self.routed_params

    @property
    def active_params(self) -> float:
        """Weights one token computes with: the dense ones and its top_k experts per layer."""
        top_k = 0 if self.moe is None else self.moe.top_k
        return self.dense_params + self.num_layers * top_k * self.expert_params

    def config(self) -> ModelConfig:
        """A ModelConfig of this shape, so layouts are validated by `Topology.validate`."""
        moe = None if self.moe is None else MoEConfig(
            num_experts=self.moe.num_experts, top_k=self.moe.top_k,
            intermediate_size=self.moe.expert_intermediate_size, renormalize=True, scores_in_float=True,
            sparse_layers=tuple(range(self.num_layers)))
        return ModelConfig(
            path=self.name, architecture="LlamaForCausalLM" if moe is None else "MixtralForCausalLM",
            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=4 * self.hidden_size if moe is None else moe.intermediate_size,
            num_layers=self.num_layers, num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
            head_dim=self.head_dim, rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
            max_position_embeddings=max(CONTEXT_LENS), torch_dtype="bfloat16", eos_token_ids=(), moe=moe)


@dataclass(frozen=True)
class Hardware:
    """A pool of identical GPUs, their links and the serving engine's host overheads."""

    name: str
    num_gpus: int
    flops: float  # dense bf16 FLOP/s per GPU, datasheet
    memory_bandwidth: float  # bytes/s per GPU, datasheet
    link_bandwidth: float  # bytes/s per GPU for collectives (all-reduce bus bandwidth, P2P, all-to-all)
    link_latency_s: float  # per ring step or P2P hop
    host_bandwidth: float  # bytes/s host memory -> one GPU (weight shards from the store)
    memory_bytes: float  # per GPU: a layout whose weight shard and KV cache exceed it is left out
    kv_memory_bytes: float  # KV cache per GPU
    all_to_all_latency_s: float  # one expert-parallel dispatch or combine of a token per GPU
    flops_efficiency: float = 0.6  # achievable share of `flops` in large matmuls
    bandwidth_efficiency: float = 0.8  # achievable share of `memory_bandwidth`
    layer_overhead_s: float = 8e-6  # kernel launches and syncs per layer per forward pass
    step_overhead_s: float = 1e-3  # host work per engine step (scheduling, bookkeeping)
    seq_overhead_s: float = 20e-6  # host work per sequence per step (sampling, detokenising)
    switch_fixed_s: float = 0.05  # commit: barrier, group switch, scheduler resume
    live_kv_fraction: float = 0.5  # of the source's KV capacity assumed live at a switch


@dataclass(frozen=True)
class _Holding:
    """What one GPU of a layout holds, for switch costs: its layers, query heads (dense weights
    are cut like them), KV heads, share of the requests (its group's, as a fraction of all) and
    routed experts with the part of each expert's intermediate width."""

    layers: range
    heads: range
    kv_heads: range
    requests: tuple[Fraction, Fraction]
    experts: range
    width: tuple[Fraction, Fraction]


def _overlap(a: range, b: range) -> int:
    return max(0, min(a.stop, b.stop) - max(a.start, b.start)) if a.step == b.step == 1 else len(set(a) & set(b))


def _span(a: tuple[Fraction, Fraction], b: tuple[Fraction, Fraction]) -> Fraction:
    return max(Fraction(0), min(a[1], b[1]) - max(a[0], b[0]))


class LayoutCosts:
    """Stage costs of one layout of `model` on `hw`."""

    def __init__(self, model: ModelShape, hw: Hardware, topo: Topology):
        self.model, self.hw, self.topo = model, hw, topo
        self.stage_layers = math.ceil(model.num_layers / topo.pp)
        self.stage_share = self.stage_layers / model.num_layers  # of the model's weights and FLOPs
        kv_heads = max(model.num_kv_heads // topo.tp, 1)  # one replicated head when tp > kv heads
        self.kv_bytes_per_token = 2 * self.stage_layers * kv_heads * model.head_dim * model.bytes_per_param

    @property
    def dense_shard_params(self) -> float:
        """Dense weights on one GPU: its stage's share, cut over its group's tp GPUs."""
        return self.model.dense_params * self.stage_share / self.topo.tp

    @property
    def expert_shard_params(self) -> float:
        """Routed experts on one GPU: 1/tp of every expert of its stage, or whole experts,
        num_experts / (dp*tp) of them."""
        return self.model.routed_params * self.stage_share / (self.topo.ep_size if self.topo.ep else self.topo.tp)

    @property
    def fits(self) -> bool:
        """Whether a GPU holds its weight shard and the KV cache."""
        shard = (self.dense_shard_params + self.expert_shard_params) * self.model.bytes_per_param
        return shard + self.hw.kv_memory_bytes <= self.hw.memory_bytes

    @property
    def group_kv_tokens(self) -> int:
        """Tokens of KV one data-parallel group holds."""
        return int(self.hw.kv_memory_bytes // self.kv_bytes_per_token)

    @property
    def kv_capacity_tokens(self) -> int:
        return self.topo.dp * self.group_kv_tokens

    def _all_reduce_s(self, num_bytes: float) -> float:
        tp = self.topo.tp
        if tp == 1:
            return 0.0
        return 2 * (tp - 1) * self.hw.link_latency_s + 2 * (tp - 1) / tp * num_bytes / self.hw.link_bandwidth

    def _all_to_all_s(self, num_bytes: float) -> float:
        """One dispatch or combine: a fixed latency and the part of a rank's rows that leaves it."""
        ranks = self.topo.ep_size
        return self.hw.all_to_all_latency_s + (ranks - 1) / ranks * num_bytes / self.hw.link_bandwidth

    def _group_tokens(self, tokens: float) -> float:
        """Tokens of the busiest data-parallel group: a step's sequences spread evenly over the
        groups, whole sequences (one sequence keeps one group busy and leaves the others idle)."""
        dp = self.topo.dp
        return tokens if dp == 1 or tokens <= 0 else max(tokens / dp, min(tokens, math.ceil(tokens / dp)))

    def _experts(self, tokens: float) -> tuple[float, float]:
        """(params read, params x tokens computed) by the most loaded GPU in one MoE layer, for
        `tokens` tokens of the whole stage (every group's)."""
        model, topo = self.model, self.topo
        moe = model.moe
        if moe is None:
            return 0.0, 0.0
        if not topo.ep:
            group_tokens = self._group_tokens(tokens)
            active = distinct_experts(group_tokens, moe.num_experts, moe.top_k)
            return (active * model.expert_params / topo.tp,
                    group_tokens * moe.top_k * model.expert_params / topo.tp)
        ranks = topo.ep_size
        active = max_active_per_rank(tokens, moe.num_experts, moe.top_k, ranks)
        pairs = max_pairs_per_rank(tokens * moe.top_k, ranks)
        return active * model.expert_params, pairs * model.expert_params

    def _collectives_s(self, group_tokens: float) -> float:
        """Communication of one layer for `group_tokens` tokens per data-parallel group."""
        activations = group_tokens * self.model.hidden_size * ACTIVATION_BYTES
        attention = self._all_reduce_s(activations)
        moe = self.model.moe
        if not self.topo.exchanges_tokens or moe is None:
            return attention + self._all_reduce_s(activations)
        rows = group_tokens / self.topo.tp * moe.top_k * self.model.hidden_size * ACTIVATION_BYTES
        return attention + 2 * self._all_to_all_s(rows) + self._all_reduce_s(activations)

    def _stage_s(self, tokens: float, kv_tokens: float) -> float:
        """One stage's forward over `tokens` new tokens (all groups') attending to `kv_tokens`
        cached ones."""
        m, hw, topo = self.model, self.hw, self.topo
        group_tokens = self._group_tokens(tokens)
        expert_params, expert_work = self._experts(tokens)
        weights = (self.dense_shard_params + self.stage_layers * expert_params) * m.bytes_per_param
        kv = kv_tokens * group_tokens / tokens * self.kv_bytes_per_token if tokens else 0.0
        memory = (weights + kv) / (hw.memory_bandwidth * hw.bandwidth_efficiency)
        work = group_tokens * self.dense_shard_params + self.stage_layers * expert_work
        compute = 2 * work / (hw.flops * hw.flops_efficiency)
        collectives = self.stage_layers * self._collectives_s(group_tokens)
        activations = group_tokens * m.hidden_size * ACTIVATION_BYTES
        hop = hw.link_latency_s + activations / hw.link_bandwidth if topo.pp > 1 else 0.0
        return max(memory, compute) + self.stage_layers * hw.layer_overhead_s + collectives + hop

    def _host_s(self, seqs: float) -> float:
        return self.hw.step_overhead_s + seqs * self.hw.seq_overhead_s

    def decode_s(self, batch: float, context_len: float) -> float:
        k = min(self.topo.pp, batch)
        m = batch / k
        stage = self._stage_s(m, m * context_len)
        return max(self._host_s(m) + self.topo.pp * stage, k * stage, k * self._host_s(m))

    def prefill_s(self, num_tokens: float) -> float:
        return self._host_s(1) + self.topo.pp * self._stage_s(num_tokens, 0)

    def profile(self, max_num_seqs: int, block_size: int) -> LayoutProfile:
        limit = self.topo.dp * max_num_seqs
        batches = sorted({*(2 ** i for i in range(limit.bit_length())), limit})
        return LayoutProfile.of(
            self.topo, num_kv_blocks=self.group_kv_tokens // block_size, block_size=block_size,
            max_num_seqs=max_num_seqs, prefill=[PrefillPoint(n, self.prefill_s(n)) for n in PREFILL_TOKENS],
            decode=[DecodePoint(b, c, self.decode_s(b, c)) for b in batches for c in CONTEXT_LENS])

    @cached_property
    def holdings(self) -> dict[int, _Holding]:
        """What each active GPU holds."""
        topo, model = self.topo, self.model
        num_experts = model.moe.num_experts if model.moe else 0
        out = {}
        for rank in range(topo.world_size):
            coords = topo.coords(rank)
            assert coords is not None
            out[rank] = _Holding(
                layers=topo.layers_of(coords.stage, model.num_layers),
                heads=topo.heads_of(coords.tp_rank, model.num_heads),
                kv_heads=topo.kv_heads_of(coords.tp_rank, model.num_kv_heads),
                requests=(Fraction(coords.dp_rank, topo.dp), Fraction(coords.dp_rank + 1, topo.dp)),
                experts=topo.experts_of(coords, num_experts),
                width=self._width(coords))
        return out

    def _width(self, coords: Coords) -> tuple[Fraction, Fraction]:
        """The part of each held expert's intermediate width: all of it under ep, else the tp cut."""
        if self.topo.ep:
            return Fraction(0), Fraction(1)
        return Fraction(coords.tp_rank, self.topo.tp), Fraction(coords.tp_rank + 1, self.topo.tp)


def _kv_missing(target: _Holding, source: _Holding | None) -> Fraction:
    """(layer, KV head) pairs' worth of all requests' KV that a GPU lacks (needs minus has)."""
    need = len(target.layers) * len(target.kv_heads) * (target.requests[1] - target.requests[0])
    if source is None:
        return need
    have = (_overlap(target.layers, source.layers) * _overlap(target.kv_heads, source.kv_heads)
            * _span(target.requests, source.requests))
    return need - have


def _weights_missing(model: ModelShape, target: _Holding, source: _Holding | None) -> float:
    """Weight params a GPU lacks: dense weights by (layer, query head), routed experts by
    (layer, expert, part of the width)."""
    dense_cell = model.dense_params / (model.num_layers * model.num_heads)
    dense_need = len(target.layers) * len(target.heads)
    expert_need = len(target.layers) * len(target.experts) * (target.width[1] - target.width[0])
    if source is None:
        dense_have, expert_have = 0, Fraction(0)
    else:
        layers = _overlap(target.layers, source.layers)
        dense_have = layers * _overlap(target.heads, source.heads)
        expert_have = layers * _overlap(target.experts, source.experts) * _span(target.width, source.width)
    return (dense_need - dense_have) * dense_cell + float(expert_need - expert_have) * model.expert_params


def _switch_cost(model: ModelShape, hw: Hardware, src: LayoutCosts, dst: LayoutCosts) -> SwitchCost:
    """Ranks receive in parallel: the one that lacks the most sets the time."""
    live_tokens = min(hw.live_kv_fraction * src.kv_capacity_tokens, dst.kv_capacity_tokens)
    kv_cell_bytes = live_tokens * 2 * model.head_dim * model.bytes_per_param
    kv = max(_kv_missing(h, src.holdings.get(r)) for r, h in dst.holdings.items())
    pause = hw.switch_fixed_s + float(kv) * kv_cell_bytes / hw.link_bandwidth
    weights = max(_weights_missing(model, h, src.holdings.get(r)) for r, h in dst.holdings.items())
    prepare = weights * model.bytes_per_param / hw.host_bandwidth
    return SwitchCost(seconds=prepare + pause, pause_seconds=pause)


def analytic_profile(model: ModelShape, hw: Hardware, max_num_seqs: int = 256, block_size: int = 16,
                     data_parallel: bool = False) -> Profile:
    """Every layout `model` can take on `hw`'s pool (with `data_parallel`, dp > 1 too) and whose
    shards fit in GPU memory, costed by the roofline model above."""
    topologies = valid_layouts(model.config(), hw.num_gpus, data_parallel=data_parallel)
    layouts = {str(t): LayoutCosts(model, hw, t) for t in topologies}
    layouts = {name: lay for name, lay in layouts.items() if lay.fits}
    if not layouts:
        raise ValueError(f"no layout of {model.name} fits {hw.name}: a GPU cannot hold its weight shard "
                         f"and {hw.kv_memory_bytes / 1e9:g} GB of KV")
    return Profile(
        model=model.name, pool_size=hw.num_gpus, device=f"analytic: {hw.name}",
        layouts={name: lay.profile(max_num_seqs, block_size) for name, lay in layouts.items()},
        switch={f"{a}->{b}": _switch_cost(model, hw, src, dst)
                for a, src in layouts.items() for b, dst in layouts.items() if a != b})


# Published shapes. Llama-2-7B is multi-head (32 KV heads); Llama-3 uses 8 KV heads.
# Mixtral-8x7B (mistralai/Mixtral-8x7B-v0.1 config.json): hidden 4096, 32 layers, 32 heads / 8 KV
# heads of 128, 8 experts (num_local_experts) of intermediate 14336, top-2 (num_experts_per_tok),
# vocab 32000, untied embeddings; 46.7B parameters (Mistral AI's announcement), 12.9B per token.
# Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B config.json): hidden 2048, 48 layers, 32 heads / 4 KV heads of
# 128 (head_dim, not hidden / heads), 128 experts of moe_intermediate_size 768, top-8, no shared
# experts, no dense layers (mlp_only_layers empty, decoder_sparse_step 1), vocab 151936, untied
# embeddings; 30.5B parameters, 3.3B per token (Qwen3 model card).
MODELS = {
    "llama-7b": ModelShape("llama-2-7b", 6.74e9, 4096, 32, 32, 32, 32000),
    "llama3-8b": ModelShape("llama-3-8b", 8.03e9, 4096, 32, 32, 8, 128256),
    "llama3-70b": ModelShape("llama-3-70b", 70.6e9, 8192, 80, 64, 8, 128256),
    "mixtral-8x7b": ModelShape("mixtral-8x7b", 46.7e9, 4096, 32, 32, 8, 32000,
                               moe=MoEShape(num_experts=8, top_k=2, expert_intermediate_size=14336)),
    "qwen3-30b-a3b": ModelShape("qwen3-30b-a3b", 30.5e9, 2048, 48, 32, 4, 151936, head_size=128,
                                moe=MoEShape(num_experts=128, top_k=8, expert_intermediate_size=768)),
}

# Datasheet numbers: H100 SXM 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink 4 at 450 GB/s
# per direction (NCCL reaches ~360 GB/s all-reduce bus bandwidth), PCIe 5 x16 to the host
# (~50 GB/s), 80 GB HBM; L4 121 TFLOP/s, 300 GB/s GDDR6, 24 GB, no NVLink, so collectives cross PCIe 4
# (~20 GB/s reached) with a higher per-step latency.
# Expert-parallel all-to-all within an NVLink node: pplx-kernels (perplexityai/pplx-kernels README,
# "Benchmark Results") measures EP8 over NVLink at 41.6 us per dispatch and 41.7 us per combine with
# one token per GPU, 83.6 / 102.3 us with 128 tokens of hidden 7168 and top-8 per GPU; DeepEP
# (deepseek-ai/DeepEP docs/legacy.md, intranode EP8 normal kernels) reaches 153 / 158 GB/s on H800,
# whose NVLink peaks near 160 GB/s, i.e. the link's bandwidth. Hence 41.6 us per dispatch or combine
# plus the rank's bytes over `link_bandwidth`. The L4 figure has no published counterpart: it is
# the PCIe all-reduce's ring-step latency times 8, an estimate.
_H100 = {"flops": 989e12, "memory_bandwidth": 3.35e12, "link_bandwidth": 360e9, "link_latency_s": 3e-6,
         "host_bandwidth": 50e9, "memory_bytes": 80e9, "kv_memory_bytes": 40e9, "all_to_all_latency_s": 41.6e-6}
HARDWARE = {
    "8xh100": Hardware("8x H100 SXM, NVLink", 8, **_H100),
    "4xh100": Hardware("4x H100 SXM, NVLink", 4, **_H100),
    "4xl4": Hardware("4x L4, PCIe", 4, flops=121e12, memory_bandwidth=300e9, link_bandwidth=20e9,
                     link_latency_s=10e-6, host_bandwidth=25e9, memory_bytes=24e9, kv_memory_bytes=8e9,
                     all_to_all_latency_s=80e-6),
}

# What the H100 numbers above give against published measurements (tests/test_policy_moe.py checks
# these stay within 15%); none of the constants was fitted to them:
# - Qwen3-30B-A3B on one H100 (tp1pp1), vLLM, ML.ENERGY Leaderboard (ml-energy/leaderboard,
#   public/data/models/Qwen__Qwen3-30B-A3B-Instruct-2507__lm-arena-chat.json; lm-arena-chat prompts,
#   ~920 output tokens): median ITL 12.9 / 17.6 / 22.6 / 28.9 / 32.1 ms at max_num_seqs 8 / 16 / 32 /
#   64 / 96. The model, at a mean context of 1024: see QWEN3_30B_A3B_H100_ITL_MS. The rise from
#   batch 8 to 64 is the experts the batch activates (52 of 128 per layer at 8 tokens, 126 at 64).
# - Mixtral-8x7B on two H100s (tp2pp1), vLLM's performance benchmark (buildkite.com/vllm/
#   performance-benchmark, 8xH100, latency_mixtral8x7B_tp2): 2327 ms mean for a batch of 8 prompts
#   of 32 tokens generating 128 tokens each (MIXTRAL_TP2_H100_LATENCY_MS).
QWEN3_30B_A3B_H100_ITL_MS = {8: 12.85, 16: 17.55, 32: 22.57, 64: 28.94, 96: 32.07}
MIXTRAL_TP2_H100_LATENCY_MS = 2327.0


def analytic_profile_for(preset: str, max_num_seqs: int = 256) -> Profile:
    """A profile for "MODEL-HARDWARE", e.g. "llama-7b-8xh100" or "mixtral-8x7b-8xh100"; see MODELS and
    HARDWARE. Mixture-of-experts presets list the data-parallel layouts too (data-parallel attention
    with expert parallelism, how such models are served at high concurrency); dense ones keep dp = 1,
    since a dense model's data-parallel groups are replicas that share nothing."""
    for model_name, model in MODELS.items():
        hw_name = preset.removeprefix(f"{model_name}-")
        if hw_name != preset and hw_name in HARDWARE:
            return analytic_profile(model, HARDWARE[hw_name], max_num_seqs=max_num_seqs,
                                    data_parallel=model.moe is not None)
    known = ", ".join(f"{m}-{h}" for m in MODELS for h in HARDWARE)
    raise ValueError(f"unknown analytic preset {preset!r}; known: {known}")


def layout_costs(model: str, hardware: str, layout: str) -> LayoutCosts:
    """The cost model of one layout of MODELS[model] on HARDWARE[hardware], whether or not its shard
    and KV budget fit a GPU (what the calibration against published figures reads)."""
    return LayoutCosts(MODELS[model], HARDWARE[hardware], Topology.parse(layout))
