"""KV block ids of one data-parallel group's cache.

Each group's scheduler owns a pool of block ids: block b of a request means "positions
b*block_size .. of this request" on whichever workers of its group hold the layer and head slices
under the current topology. Block tables therefore survive a layout change that keeps the request
in its group and only the bytes behind them move; a request that changes group, or a block whose
id the new cache lacks, gets new ids (remp.kv.placement).
"""
from __future__ import annotations


class OutOfBlocks(RuntimeError):
    """Raised when an allocation asks for more blocks than are free."""


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, used: list[int] = ()):
        """A pool of `num_blocks` ids of which `used` are already taken (by requests carried
        over from another layout)."""
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        # Descending, so pop() hands out low ids first; built from the gaps between the taken ids
        # (C-speed ranges), since a layout switch builds it in its pause with up to ~10^5 blocks.
        taken = sorted(set(used), reverse=True)
        if taken and (taken[0] >= num_blocks or taken[-1] < 0):
            raise ValueError(f"taken block ids must lie in [0, {num_blocks}), got {taken[-1]}..{taken[0]}")
        self._free: list[int] = []
        upper = num_blocks
        for b in taken:
            self._free.extend(range(upper - 1, b, -1))
            upper = b
        self._free.extend(range(upper - 1, -1, -1))
        self._handouts = [0] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if n > len(self._free):
            raise OutOfBlocks(f"{n} blocks requested, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(n)]
        for b in blocks:
            self._handouts[b] += 1
        return blocks

    def handouts(self, block: int) -> int:
        """How many times `block` was allocated: while this count stays the same the block has the
        same owner, so a full block's bytes have not changed (a switch's pre-copy relies on it)."""
        return self._handouts[block]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))
