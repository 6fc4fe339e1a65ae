"""Messages between the engine and its workers (the control plane).

Encoded as JSON: the control plane carries only ids, lengths and sampling settings, and
JSON keeps anything that is not plain data (pickle) off the sockets. Tensors never travel
here; activations and KV move over torch.distributed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

# Test hook read by the workers (see remp.worker.worker.inject_fault); never set in production.
FAULT_ENV = "REMP_FAULT_INJECT"


@dataclass
class SeqWork:
    """One sequence's share of a step: tokens to run and how to sample the next one."""

    seq_id: int
    token_ids: list[int]
    start: int  # tokens of this sequence already in the KV cache
    block_table: list[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    out_pos: int  # index of the output token this step samples (seeds the sampler)
    logprobs: int | None = None


@dataclass
class StepCommand:
    step_id: int
    seqs: list[SeqWork]


@dataclass
class PrepareCommand:
    """Get ready for a layout while the current one keeps serving: build its groups (every pool
    rank, collectively), slice this rank's shard from the weight store, allocate its KV."""

    tp: int
    pp: int
    num_blocks: int
    block_size: int
    switch_id: int  # echoed in the reply: one of an abandoned switch is told apart and dropped


@dataclass
class PrecopyCommand:
    """Copy the KV of full blocks (which keep their ids) into the prepared layout, beside the
    steps that keep coming; answers "precopied". Transfers as [layer, src_rank, dst_rank,
    src_head, dst_head, num_heads]. The KV left for the pause travels in the CommitCommand.

    Also get the pause ready for the rest: `filling` are the live blocks still being written,
    which the pause will move with about `room` blocks in all. Their places in the target cache
    (those that keep their ids) are written once now and the pause's exchange buffers for `room`
    blocks are set aside, so the pause touches no fresh memory (a first touch costs a page
    fault, ~2 us per 4 KiB here: the send buffer, the receive buffer and the target's slices of
    1.4 MiB of KV cost ~0.8 ms each, against ~0.3 ms for the copies themselves)."""

    transfers: list[list[int]]
    blocks: list[int]
    switch_id: int
    filling: list[int] = field(default_factory=list)
    room: int = 0


@dataclass
class CommitCommand:
    """In the pause: move the live KV not yet in place (transfers as in PrecopyCommand; block
    src_blocks[i] of the old cache becomes dst_blocks[i] of the new; nothing when empty), then
    switch to the prepared layout (or go standby). One round trip. The switch is tentative until
    a ConfirmCommand: an Abort or a Reform before then goes back to the old layout, so a rank that
    fails here leaves no peer stranded on the new one."""

    threads: int
    switch_id: int  # echoed in the reply: one of an abandoned switch is told apart and dropped
    transfers: list[list[int]] = field(default_factory=list)
    src_blocks: list[int] = field(default_factory=list)
    dst_blocks: list[int] = field(default_factory=list)


@dataclass
class ConfirmCommand:
    """Every worker has committed: the switch is final, forget what it replaced. No reply."""


@dataclass
class AbortCommand:
    """Drop the prepared layout; keep serving on the current one."""


@dataclass
class DigestCommand:
    """Report hashes of this rank's KV slices for the given blocks."""

    blocks: list[int]


@dataclass
class LeaveCommand:
    """A worker was lost: leave the world it broke — let go of every group, so that their
    connections close and any peer still blocked in an exchange with this rank fails at once —
    and answer "left" (info["formation"] = `formation`, the world about to form). A rank that
    cannot answer promptly is stuck, and is replaced rather than waited for."""

    formation: int


@dataclass
class ReformCommand:
    """Join the world at `dist_init` (a fresh file store) and form every group there: the first
    command a started worker gets, and how survivors of a lost worker leave the world it broke
    and meet a fresh process in its rank. Answered "reformed" (or "error"), with
    info["formation"] = `formation`, so a failed rendezvous is told apart from stale reports."""

    dist_init: str
    formation: int


@dataclass
class ShutdownCommand:
    pass


@dataclass
class StepResult:
    step_id: int
    token_ids: list[int]
    logprobs: list[list[list[float]] | None]  # per sequence: [[token_id, logprob], ...], sampled first
    parse_s: float  # worker time spent turning the command into tensors
    cut: bool = False  # stopped by a layout switch (remp.executor.cut): no tokens, the step must run again


@dataclass
class WorkerReply:
    """Acknowledgement (ok) or failure report of one worker for one command."""

    rank: int
    kind: str  # "started" | "prepared" | "precopied" | "committed" | "aborted" | "reformed" | "digest"
    #            | "error" | "heartbeat" (on its own socket, info {"t": time.monotonic()})
    # Replies to work done beside the steps ("prepared", "precopied", and "error" for it) carry
    # info["switch"]: they leave on a socket of their own, so they may overtake or trail others.
    message: str = ""
    info: dict = field(default_factory=dict)


_TYPES = {cls.__name__: cls for cls in (StepCommand, PrepareCommand, PrecopyCommand, CommitCommand,
                                        ConfirmCommand, AbortCommand, DigestCommand, LeaveCommand, ReformCommand,
                                        ShutdownCommand, StepResult, WorkerReply)}


Message = (StepCommand | PrepareCommand | PrecopyCommand | CommitCommand | ConfirmCommand
           | AbortCommand | DigestCommand | LeaveCommand | ReformCommand | ShutdownCommand | StepResult
           | WorkerReply)


def encode(msg: Message) -> bytes:
    return json.dumps({"t": type(msg).__name__, "b": asdict(msg)}, separators=(",", ":")).encode()


def decode(data: bytes) -> Message:
    raw = json.loads(data)
    cls = _TYPES[raw["t"]]
    body = raw["b"]
    if cls is StepCommand:
        return StepCommand(step_id=body["step_id"], seqs=[SeqWork(**s) for s in body["seqs"]])
    return cls(**body)
