"""Cut flags: how a layout switch stops the steps under way, with a store to memory.

A switch that is ready for its pause cuts the steps in flight at their next check: after each
attention and each MLP, and at tp=1 within them and the lm_head too (remp.parallel.context;
remp.reconfig.transaction, drain). The engine says so by writing, for each rank,
the id of the last step to cut into one int64 of a small file in the executor's private
directory, which the engine and every worker map: a worker reads its own slot at each check,
with no message to receive and no thread to wake on cores busy with the very step to stop.

Step ids only grow and are never reused, so a slot only grows too, and a value from an
earlier switch cuts no later step. Whatever a reader sees is safe: a step is cut or runs to
its end, and both are handled (a cut step runs again); tensor ranks of a stage that read at
different moments agree through their all-reduce (remp.parallel.context).
"""
from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterable

_SLOT = 8  # bytes per rank: one native int64


class CutFlags:
    """One cut slot per pool rank, in the file at `path` (created by the engine, every slot -1:
    step ids start at 0)."""

    def __init__(self, path: str, num_ranks: int, create: bool = False):
        if create:
            with open(path, "wb") as f:
                f.write(struct.pack(f"{num_ranks}q", *[-1] * num_ranks))
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _SLOT * num_ranks)
        finally:
            os.close(fd)
        self._slots = memoryview(self._map).cast("q")

    def cut(self, upto: int, ranks: Iterable[int]) -> None:
        """Cut every step up to id `upto` on `ranks`."""
        for rank in ranks:
            self._slots[rank] = max(self._slots[rank], upto)

    def upto(self, rank: int) -> int:
        """The last step id cut on `rank` (-1 before any)."""
        return self._slots[rank]

    def close(self) -> None:
        self._slots.release()
        self._map.close()
