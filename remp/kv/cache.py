"""A worker's paged KV cache: one tensor per local layer,
[num_blocks, 2 (key, value), block_size, local_kv_heads, head_dim], indexed by the block ids of the
rank's data-parallel group."""
from __future__ import annotations

import torch

from remp.config import ModelConfig
from remp.topology import Topology


def bytes_per_block(model: ModelConfig, topo: Topology, rank: int, block_size: int, dtype: torch.dtype) -> int:
    stage, t, _ = topo.coords(rank)
    layers = len(topo.layers_of(stage, model.num_layers))
    kv_heads = len(topo.kv_heads_of(t, model.num_kv_heads))
    return layers * 2 * block_size * kv_heads * model.head_dim * torch.finfo(dtype).bits // 8


def blocks_for_budget(model: ModelConfig, topo: Topology, block_size: int, dtype: torch.dtype,
                      bytes_per_worker: float) -> int:
    """How many global blocks fit when every active worker may spend `bytes_per_worker` on KV:
    the most loaded worker decides."""
    worst = max(bytes_per_block(model, topo, r, block_size, dtype) for r in range(topo.world_size))
    return int(bytes_per_worker // worst)


class KVCache:
    def __init__(self, model: ModelConfig, topo: Topology, rank: int, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, reuse: "KVCache | None" = None):
        """Allocate this rank's cache under `topo`. Layers whose tensor in `reuse` (the cache of
        the layout being left) already has the right heads and size are shared, not copied: the
        data is in place and serving may keep writing it until the switch."""
        stage, t, _ = topo.coords(rank)
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.kv_heads = topo.kv_heads_of(t, model.num_kv_heads)
        shape = (num_blocks, 2, block_size, len(self.kv_heads), model.head_dim)
        self.layers: dict[int, torch.Tensor] = {}
        self.reused: set[int] = set()
        for layer in topo.layers_of(stage, model.num_layers):
            old = reuse.layers.get(layer) if reuse is not None else None
            if old is not None and reuse.kv_heads == self.kv_heads and tuple(old.shape) == shape:
                self.layers[layer] = old
                self.reused.add(layer)
            else:
                # empty, not zeros: zeroing a GiB costs a third of a second of every start and
                # switch; write() zeroes each block when its first slot is written instead.
                self.layers[layer] = torch.empty(shape, dtype=dtype, device=device)

    def write(self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              fresh_blocks: torch.Tensor) -> None:
        """Store k, v [T, kv_heads, head_dim] at flat slots (block * block_size + offset).
        `fresh_blocks` are the blocks whose slot 0 this step writes: they are zeroed first, so
        the unwritten tail of a request's last block holds zeros, never stale bytes that
        attention would mask but could not mask away if they were NaN."""
        cache = self.layers[layer]
        if fresh_blocks.numel():
            cache[fresh_blocks] = 0
        blocks, offsets = slots // self.block_size, slots % self.block_size
        cache[blocks, 0, offsets] = k
        cache[blocks, 1, offsets] = v

    def heads(self, layer: int, start: int, count: int) -> torch.Tensor:
        """Local KV heads [start, start + count) of `layer` for every block: a strided view."""
        return self.layers[layer][:, :, :, start:start + count]

    def digests(self, blocks: list[int]) -> dict[str, str]:
        """sha1 of every (layer, global KV head, block) slice: lets a test compare KV bytes
        across layouts without shipping the cache."""
        import hashlib

        out = {}
        for layer, cache in self.layers.items():
            for i, head in enumerate(self.kv_heads):
                for b in blocks:
                    data = cache[b, :, :, i].contiguous().cpu().numpy().tobytes()
                    out[f"{layer}:{head}:{b}"] = hashlib.sha1(data).hexdigest()
        return out

    def gather(self, layer: int, block_tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of whole block tables [B, max_blocks] as [B, kv_heads, max_blocks*block_size, head_dim]."""
        cache = self.layers[layer]
        b, nb = block_tables.shape
        _, _, bs, h, d = cache.shape
        # Index the key and value views separately: one copy each, already contiguous per sequence.
        k = cache[:, 0][block_tables].view(b, nb * bs, h, d).transpose(1, 2)
        v = cache[:, 1][block_tables].view(b, nb * bs, h, d).transpose(1, 2)
        return k, v
