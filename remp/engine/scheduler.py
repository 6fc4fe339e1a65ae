"""Continuous batching over global KV blocks.

Every step takes the running sequences that are not already in the pipeline (one token
each) and then admits waiting sequences (their whole prompt) while the token budget, the
sequence limit and free blocks allow, so prefill and decode share a step. When a running
sequence needs a block and none is free, the newest running sequence not in flight is
preempted by recompute: its blocks are freed and it rejoins the front of the queue with its
tokens so far, to be prefilled again later. Those rules live in `remp.engine.admission`,
which the simulator follows too. With pipeline parallelism the ready sequences are split
across the free pipeline slots so micro-batches of similar size keep every stage busy.
"""
from __future__ import annotations

import enum
import math
from collections import deque
from dataclasses import dataclass, field

from remp.engine.admission import admit, make_room, requeue
from remp.engine.outputs import RequestMetrics
from remp.engine.sampling import SamplingParams
from remp.kv.blocks import BlockManager


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    seq_id: int
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    metrics: RequestMetrics
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    block_ids: list[int] = field(default_factory=list)
    num_computed: int = 0  # tokens whose KV is in the cache
    in_flight: bool = False
    finish_reason: str | None = None
    num_preemptions: int = 0
    group: int = 0  # the data-parallel group whose scheduler holds it

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_ids_from(self, start: int) -> list[int]:
        n = len(self.prompt_token_ids)
        if start >= n:
            return self.output_token_ids[start - n:]
        return self.prompt_token_ids[start:] + self.output_token_ids


@dataclass
class ScheduledSeq:
    seq: Sequence
    start: int
    token_ids: list[int]


class Scheduler:
    def __init__(self, blocks: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.blocks = blocks
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # oldest first
        self.num_preemptions = 0
        # Off while a layout switch prepares: a prompt admitted then would make the switch wait
        # for its prefill (the longest step there is) and would move all its KV in the pause.
        self.admitting = True

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_requests(self) -> int:
        """Running and waiting: how loaded this scheduler's data-parallel group is."""
        return len(self.waiting) + len(self.running)

    def schedule(self, free_slots: int) -> list[ScheduledSeq]:
        """Choose the next micro-batch; `free_slots` is how many more steps the pipeline takes.
        A chosen sequence is in flight from the moment it is chosen, so making room for a later
        one never preempts it."""
        ready = [s for s in self.running if not s.in_flight]
        limit = math.ceil(len(ready) / free_slots) if ready else 0
        budget = self.max_num_batched_tokens
        blocks = self.blocks
        chosen: list[ScheduledSeq] = []
        for seq in ready[:limit]:
            if seq.status is not SeqStatus.RUNNING:  # preempted below to make room for an older one
                continue
            need = blocks.blocks_needed(seq.num_tokens) - len(seq.block_ids)
            if need > 0:
                if need > blocks.num_free and not make_room(seq, need, blocks, self.running, self.preempt):
                    continue
                seq.block_ids += blocks.allocate(need)
            seq.in_flight = True
            # The last token, or the whole prompt again when its prefill was cut (see step_done).
            chosen.append(ScheduledSeq(seq, seq.num_computed, seq.token_ids_from(seq.num_computed)))
            budget -= seq.num_tokens - seq.num_computed
        if self.admitting and self.waiting:
            for seq, need in admit(self.waiting, self.running, self.max_num_seqs, budget, blocks):
                seq.block_ids = blocks.allocate(need)
                seq.status = SeqStatus.RUNNING
                seq.in_flight = True
                chosen.append(ScheduledSeq(seq, 0, seq.token_ids_from(0)))
        return chosen

    def preempt(self, seq: Sequence) -> None:
        self.blocks.free(seq.block_ids)
        seq.block_ids = []
        seq.num_computed = 0
        seq.status = SeqStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        requeue(seq, self.running, self.waiting)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Retire a sequence and free its blocks (at once unless a step still holds it)."""
        seq.finish_reason = reason
        if seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        elif seq.status is SeqStatus.RUNNING:
            self.running.remove(seq)
        seq.status = SeqStatus.FINISHED
        if not seq.in_flight:
            self.blocks.free(seq.block_ids)
            seq.block_ids = []

    def step_done(self, item: ScheduledSeq, cut: bool = False) -> bool:
        """Book a finished step for one sequence; True if it still wants its sampled token. A step
        that was `cut` computed nothing the engine counts: the sequence runs it again."""
        seq = item.seq
        seq.in_flight = False
        if seq.status is SeqStatus.FINISHED:  # aborted while in flight
            self.blocks.free(seq.block_ids)
            seq.block_ids = []
            return False
        if cut:
            return False
        seq.num_computed = item.start + len(item.token_ids)
        return True
