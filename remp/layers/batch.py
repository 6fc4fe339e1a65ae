"""One step's tokens on a worker, as the model's layers read them."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PromptRun:
    """Adjacent prompts of one length in a step: `count` prompts of `length` tokens from token `start`."""

    start: int
    count: int
    length: int


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
        self.prefill_runs: list[PromptRun] = []
        for i in self.prefill:
            last = self.prefill_runs[-1] if self.prefill_runs else None
            if last and last.length == self.q_lens[i] and last.start + last.count * last.length == offsets[i]:
                self.prefill_runs[-1] = PromptRun(last.start, last.count + 1, last.length)
            else:
                self.prefill_runs.append(PromptRun(offsets[i], 1, self.q_lens[i]))
        if self.decode:
            width = max(len(self.block_tables[i]) for i in self.decode)
            # Pad with the sequence's own first block: its bytes are masked out, and unlike an
            # arbitrary block they are written (never uninitialised memory that could hold NaN).
            tables = [self.block_tables[i] + self.block_tables[i][:1] * (width - len(self.block_tables[i]))
                      for i in self.decode]
            self.decode_tables = torch.tensor(tables, dtype=torch.int32, device=self.device)
            self.decode_tokens = torch.tensor([offsets[i] for i in self.decode], device=self.device)
            self.decode_ctx = torch.tensor([self.starts[i] + 1 for i in self.decode], dtype=torch.int32,
                                           device=self.device)
