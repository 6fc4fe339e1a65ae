"""A roofline-model `Profile` for hardware we do not have.

The policy and the simulator only need, per layout, a prefill curve, a decode surface, a KV
capacity and switch costs. `analytic_profile` derives them from a model's shape and a GPU
pool's datasheet numbers, so a policy can be tried on "Llama-70B on 8 H100s" from a laptop.

The model (per layout tp x pp; a "stage" is one pipeline stage, its slowest one when the
layers do not split evenly; every GPU of a stage works on 1/tp of it):
- GPU time of a stage for m sequences = max(memory time, compute time) + a fixed kernel
  overhead per layer. Decode reads the stage's weight shard once per micro-batch plus each
  sequence's KV (m * context * KV bytes per token), and computes 2 * params FLOPs per token
  (attention FLOPs are small next to its KV reads and are left out). Prefill of N tokens
  computes 2 * params * N FLOPs and reads the weights once (its attention's quadratic term,
  under 10% below 4k tokens on 7B-class models, is left out). Bandwidth and FLOPs are the
  datasheet's times an achievable-efficiency factor.
- Tensor parallelism adds two ring all-reduces per layer of the activations (m * hidden *
  2 bytes): 2 (tp-1) link latencies + 2 (tp-1)/tp * bytes / link bandwidth. This is the
  price of tp: a latency that does not shrink with load and a bandwidth term that grows
  with the batch.
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
  occupies each stage for 1/pp of that (see `remp.policy.policy`).
- KV capacity: `kv_memory_bytes` per GPU (the engine's --kv-cache-space) over the KV bytes
  one token costs that GPU: its stage's layers x its KV heads (kv_heads / tp, or one head
  replicated when tp > kv_heads) x head_dim x 2 (K and V) x bytes per parameter.
- Switch cost: the pause moves the live KV to its new owners (assumed `live_kv_fraction` of
  the source's capacity, at most the target's), every GPU receiving in parallel over its
  link, plus a fixed commit time; the whole switch adds the weight bytes each GPU lacks for
  its new shard, read from host memory while the old layout still serves.
Not modelled: overlap of communication with compute, chunked prefill, prefix caching,
speculative decoding, memory fragmentation, NUMA and multi-node link hierarchies.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from remp.config import ModelConfig
from remp.policy.profile import DecodePoint, LayoutProfile, PrefillPoint, Profile, SwitchCost
from remp.topology import Topology, valid_layouts

ACTIVATION_BYTES = 2  # bf16 activations on the wire, whatever the weights' precision
PREFILL_TOKENS = (1, 16, 64, 256, 1024, 4096, 16384)
CONTEXT_LENS = (128, 512, 2048, 8192)


@dataclass(frozen=True)
class ModelShape:
    """What the cost model needs of a dense decoder-only transformer."""

    name: str
    num_params: float
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    bytes_per_param: float = 2.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def weight_bytes(self) -> float:
        return self.num_params * self.bytes_per_param

    def config(self) -> ModelConfig:
        """A ModelConfig of this shape, so layouts are validated by `Topology.validate`."""
        return ModelConfig(
            path=self.name, architecture="LlamaForCausalLM", vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=4 * self.hidden_size, num_layers=self.num_layers,
            num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
            rms_norm_eps=1e-5, tie_word_embeddings=False, attention_bias=False,
            max_position_embeddings=max(CONTEXT_LENS), torch_dtype="bfloat16", eos_token_ids=())


@dataclass(frozen=True)
class Hardware:
    """A pool of identical GPUs, their links and the serving engine's host overheads."""

    name: str
    num_gpus: int
    flops: float  # dense bf16 FLOP/s per GPU, datasheet
    memory_bandwidth: float  # bytes/s per GPU, datasheet
    link_bandwidth: float  # bytes/s per GPU for collectives (all-reduce bus bandwidth, P2P)
    link_latency_s: float  # per ring step or P2P hop
    host_bandwidth: float  # bytes/s host memory -> one GPU (weight shards from the store)
    memory_bytes: float  # per GPU: a layout whose weight shard and KV cache exceed it is left out
    kv_memory_bytes: float  # KV cache per GPU
    flops_efficiency: float = 0.6  # achievable share of `flops` in large matmuls
    bandwidth_efficiency: float = 0.8  # achievable share of `memory_bandwidth`
    layer_overhead_s: float = 8e-6  # kernel launches and syncs per layer per forward pass
    step_overhead_s: float = 1e-3  # host work per engine step (scheduling, bookkeeping)
    seq_overhead_s: float = 20e-6  # host work per sequence per step (sampling, detokenising)
    switch_fixed_s: float = 0.05  # commit: barrier, group switch, scheduler resume
    live_kv_fraction: float = 0.5  # of the source's KV capacity assumed live at a switch


class _Layout:
    """Stage costs of one layout of `model` on `hw`."""

    def __init__(self, model: ModelShape, hw: Hardware, topo: Topology):
        self.model, self.hw, self.topo = model, hw, topo
        self.stage_layers = math.ceil(model.num_layers / topo.pp)
        self.stage_share = self.stage_layers / model.num_layers  # of the model's weights and FLOPs
        kv_heads = max(model.num_kv_heads // topo.tp, 1)  # one replicated head when tp > kv heads
        self.kv_bytes_per_token = 2 * self.stage_layers * kv_heads * model.head_dim * model.bytes_per_param

    @property
    def fits(self) -> bool:
        """Whether a GPU holds its weight shard and the KV cache."""
        shard = self.model.weight_bytes * self.stage_share / self.topo.tp
        return shard + self.hw.kv_memory_bytes <= self.hw.memory_bytes

    @property
    def kv_capacity_tokens(self) -> int:
        return int(self.hw.kv_memory_bytes // self.kv_bytes_per_token)

    def _all_reduce_s(self, num_bytes: float) -> float:
        tp = self.topo.tp
        if tp == 1:
            return 0.0
        return 2 * (tp - 1) * self.hw.link_latency_s + 2 * (tp - 1) / tp * num_bytes / self.hw.link_bandwidth

    def _stage_s(self, tokens: float, kv_tokens: float) -> float:
        """One stage's forward over `tokens` new tokens attending to `kv_tokens` cached ones."""
        m, hw, tp = self.model, self.hw, self.topo.tp
        weights = m.weight_bytes * self.stage_share / tp
        memory = (weights + kv_tokens * self.kv_bytes_per_token) / (hw.memory_bandwidth * hw.bandwidth_efficiency)
        compute = tokens * 2 * m.num_params * self.stage_share / tp / (hw.flops * hw.flops_efficiency)
        activations = tokens * m.hidden_size * ACTIVATION_BYTES
        collectives = 2 * self.stage_layers * self._all_reduce_s(activations)
        hop = hw.link_latency_s + activations / hw.link_bandwidth if self.topo.pp > 1 else 0.0
        return max(memory, compute) + self.stage_layers * hw.layer_overhead_s + collectives + hop

    def _host_s(self, seqs: float) -> float:
        return self.hw.step_overhead_s + seqs * self.hw.seq_overhead_s

    def decode_s(self, batch: int, context_len: int) -> float:
        k = min(self.topo.pp, batch)
        m = batch / k
        stage = self._stage_s(m, m * context_len)
        return max(self._host_s(m) + self.topo.pp * stage, k * stage, k * self._host_s(m))

    def prefill_s(self, num_tokens: int) -> float:
        return self._host_s(1) + self.topo.pp * self._stage_s(num_tokens, 0)

    def profile(self, max_num_seqs: int, block_size: int) -> LayoutProfile:
        batches = sorted({*(2 ** i for i in range(max_num_seqs.bit_length())), max_num_seqs})
        return LayoutProfile(
            tp=self.topo.tp, pp=self.topo.pp, num_kv_blocks=self.kv_capacity_tokens // block_size,
            block_size=block_size, max_num_seqs=max_num_seqs,
            prefill=[PrefillPoint(n, self.prefill_s(n)) for n in PREFILL_TOKENS],
            decode=[DecodePoint(b, c, self.decode_s(b, c)) for b in batches for c in CONTEXT_LENS])

    @cached_property
    def kv_cells(self) -> dict[int, set[tuple[int, int]]]:
        """(layer, KV head) pairs each rank holds."""
        return self._cells(lambda t: self.topo.kv_heads_of(t, self.model.num_kv_heads))

    @cached_property
    def weight_cells(self) -> dict[int, set[tuple[int, int]]]:
        """(layer, query head) pairs each rank holds: its share of every tp-split weight."""
        return self._cells(lambda t: self.topo.heads_of(t, self.model.num_heads))

    def _cells(self, heads_of: Callable[[int], range]) -> dict[int, set[tuple[int, int]]]:
        topo = self.topo
        return {topo.rank(stage, t): {(layer, head) for layer in topo.layers_of(stage, self.model.num_layers)
                                      for head in heads_of(t)}
                for stage in range(topo.pp) for t in range(topo.tp)}


def _missing(source: dict[int, set[tuple[int, int]]], target: dict[int, set[tuple[int, int]]]) -> int:
    """Most cells any one target rank lacks: ranks receive in parallel, the slowest one counts."""
    return max(len(cells - source.get(rank, set())) for rank, cells in target.items())


def _switch_cost(model: ModelShape, hw: Hardware, src: _Layout, dst: _Layout) -> SwitchCost:
    live_tokens = min(hw.live_kv_fraction * src.kv_capacity_tokens, dst.kv_capacity_tokens)
    kv_cell_bytes = live_tokens * 2 * model.head_dim * model.bytes_per_param
    pause = hw.switch_fixed_s + _missing(src.kv_cells, dst.kv_cells) * kv_cell_bytes / hw.link_bandwidth
    weight_cell_bytes = model.weight_bytes / (model.num_layers * model.num_heads)
    prepare = _missing(src.weight_cells, dst.weight_cells) * weight_cell_bytes / hw.host_bandwidth
    return SwitchCost(seconds=prepare + pause, pause_seconds=pause)


def analytic_profile(model: ModelShape, hw: Hardware, max_num_seqs: int = 256, block_size: int = 16) -> Profile:
    """Every layout `model` can take on `hw`'s pool and whose shards fit in GPU memory, costed by
    the roofline model above."""
    layouts = {str(t): _Layout(model, hw, t) for t in valid_layouts(model.config(), hw.num_gpus)}
    layouts = {name: lay for name, lay in layouts.items() if lay.fits}
    return Profile(
        model=model.name, pool_size=hw.num_gpus, device=f"analytic: {hw.name}",
        layouts={name: lay.profile(max_num_seqs, block_size) for name, lay in layouts.items()},
        switch={f"{a}->{b}": _switch_cost(model, hw, src, dst)
                for a, src in layouts.items() for b, dst in layouts.items() if a != b})


# Published shapes. Llama-2-7B is multi-head (32 KV heads); Llama-3 uses 8 KV heads.
MODELS = {
    "llama-7b": ModelShape("llama-2-7b", 6.74e9, 4096, 32, 32, 32, 32000),
    "llama3-8b": ModelShape("llama-3-8b", 8.03e9, 4096, 32, 32, 8, 128256),
    "llama3-70b": ModelShape("llama-3-70b", 70.6e9, 8192, 80, 64, 8, 128256),
}

# Datasheet numbers: H100 SXM 989 TFLOP/s dense bf16, 3.35 TB/s HBM3, NVLink 4 at 450 GB/s
# per direction (NCCL reaches ~360 GB/s all-reduce bus bandwidth), PCIe 5 x16 to the host
# (~50 GB/s), 80 GB HBM; L4 121 TFLOP/s, 300 GB/s GDDR6, 24 GB, no NVLink, so collectives cross PCIe 4
# (~20 GB/s reached) with a higher per-step latency.
_H100 = {"flops": 989e12, "memory_bandwidth": 3.35e12, "link_bandwidth": 360e9, "link_latency_s": 3e-6,
         "host_bandwidth": 50e9, "memory_bytes": 80e9, "kv_memory_bytes": 40e9}
HARDWARE = {
    "8xh100": Hardware("8x H100 SXM, NVLink", 8, **_H100),
    "4xh100": Hardware("4x H100 SXM, NVLink", 4, **_H100),
    "4xl4": Hardware("4x L4, PCIe", 4, flops=121e12, memory_bandwidth=300e9, link_bandwidth=20e9,
                     link_latency_s=10e-6, host_bandwidth=25e9, memory_bytes=24e9, kv_memory_bytes=8e9),
}


def analytic_profile_for(preset: str, max_num_seqs: int = 256) -> Profile:
    """A profile for "MODEL-HARDWARE", e.g. "llama-7b-8xh100"; see MODELS and HARDWARE."""
    for model_name, model in MODELS.items():
        hw_name = preset.removeprefix(f"{model_name}-")
        if hw_name != preset and hw_name in HARDWARE:
            return analytic_profile(model, HARDWARE[hw_name], max_num_seqs=max_num_seqs)
    known = ", ".join(f"{m}-{h}" for m in MODELS for h in HARDWARE)
    raise ValueError(f"unknown analytic preset {preset!r}; known: {known}")
