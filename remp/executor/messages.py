"""Messages between the engine and its workers (the control plane).

Encoded as JSON: the control plane carries only ids, lengths and sampling settings, and
JSON keeps anything that is not plain data (pickle) off the sockets. Tensors never travel
here; activations and KV move over torch.distributed.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import ClassVar

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
    """One step for one data-parallel group (each group runs its own requests); sent to every rank
    of that group. `seqs` may be empty: the group still joins the step's exchanges between groups."""

    step_id: int
    seqs: list[SeqWork]


@dataclass
class PrepareCommand:
    """Get ready for a layout while the current one keeps serving: build its groups (every pool
    rank, collectively), slice this rank's shard from the weight store, allocate its KV."""

    layout: dict  # Topology.as_dict()
    num_blocks: int
    block_size: int
    switch_id: int  # echoed in the reply: one of an abandoned switch is told apart and dropped


@dataclass
class KVMoveRows:
    """A remp.kv.migration.KVMove on the wire: transfers as [layer, src_rank, dst_rank, src_head,
    dst_head, num_heads]; block src_blocks[i] of the source group's cache becomes dst_blocks[i] of
    the target group's."""

    transfers: list[list[int]]
    src_blocks: list[int]
    dst_blocks: list[int]


@dataclass
class PrecopyCommand:
    """Copy the KV of full blocks into the prepared layout, beside the steps that keep coming
    (`moves`, walked in order by every rank); answered by Precopied. The KV left for the pause
    travels in the CommitCommand.

    Also get the pause ready for the rest: `filling[g]` are the target ids, in target group g, of
    the live blocks still being written, and the pause's moves will carry about `pause_blocks[i]`
    blocks along moves[i]'s transfers. Those places in the target cache are written once now, and
    the pause's exchange buffer is set aside, so the pause touches no fresh memory: a first touch
    costs a page fault per page, and for the send buffer, the receive buffer and the target's
    slices those faults cost more than the copies themselves."""

    moves: list[KVMoveRows]
    switch_id: int
    filling: list[list[int]] = field(default_factory=list)
    pause_blocks: list[int] = field(default_factory=list)


@dataclass
class CommitCommand:
    """In the pause: move the live KV not yet in place (`moves` as in PrecopyCommand; nothing when
    empty), then switch to the prepared layout (or go standby). One round trip. The switch is
    tentative until a ConfirmCommand: an Abort or a Reform before then goes back to the old layout,
    so a rank that fails here leaves no peer stranded on the new one."""

    threads: int
    switch_id: int  # echoed in the reply: one of an abandoned switch is told apart and dropped
    moves: list[KVMoveRows] = field(default_factory=list)


@dataclass
class ConfirmCommand:
    """Every worker has committed: the switch is final, forget what it replaced. No reply."""


@dataclass
class AbortCommand:
    """Drop the prepared layout; keep serving on the current one."""


@dataclass
class DigestCommand:
    """Report hashes of this rank's KV slices for the given blocks (ids in its group's cache)."""

    blocks: list[int]


@dataclass
class LeaveCommand:
    """A worker was lost: leave the world it broke — let go of every group, so that their
    connections close and any peer still blocked in an exchange with this rank fails at once —
    and answer Left, tagged with `formation` (the world about to form). A rank that cannot answer
    promptly is stuck, and is replaced rather than waited for."""

    formation: int


@dataclass
class ReformCommand:
    """Join the world at `dist_init` (a fresh file store) and form every group there: the first
    command a started worker gets, and how survivors of a lost worker leave the world it broke
    and meet a fresh process in its rank. Answered Reformed (or WorkerFailed), tagged with
    `formation`, so a failed rendezvous is told apart from stale reports."""

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
    dp_rank: int = 0  # the data-parallel group whose sequences these are (each answers for its own)


# Replies: one type per kind of answer, each naming the rank that sent it. Those answering work
# done beside the steps (Prepared, Precopied, and WorkerFailed for it) leave on a socket of their
# own and may overtake or trail the others: they carry the switch they belong to. A reply that
# carries `switch` or `formation` is dropped by the engine when that switch was given up or that
# world re-formed. `kind` names the type in the executor's API (`answers("prepared")`).


@dataclass
class Started:
    """The process is up (imports, config, weight store): it may be told to join a world."""

    kind: ClassVar[str] = "started"
    rank: int
    pid: int  # tells this process's answer from one of a process of this rank that died since


@dataclass
class BuildTimes:
    """Seconds a rank spent on each part of building a target layout (see ReconfigResult.build_s)."""

    groups: float
    shard: float
    model: float
    kv: float


@dataclass
class Prepared:
    """The target layout is built (PrepareCommand), or this rank has no place in it (standby)."""

    kind: ClassVar[str] = "prepared"
    rank: int
    switch: int
    standby: bool
    layout: str = ""  # str(Topology) of what was built: the engine checks it is the layout it asked for
    weight_bytes: int = 0  # copied or packed into the shard (0 where a shard is a view of the mapping)
    build: BuildTimes | None = None  # None on a standby rank: nothing was built


@dataclass
class Precopied:
    """The full blocks are copied and the pause is ready (PrecopyCommand)."""

    kind: ClassVar[str] = "precopied"
    rank: int
    switch: int


@dataclass
class Committed:
    """The KV left for the pause is moved and this rank is on the target, tentatively (CommitCommand)."""

    kind: ClassVar[str] = "committed"
    rank: int
    switch: int
    migrate_s: float  # the pause's migration on this rank
    allocated_bytes: int  # exchange buffer the pause had to allocate (0: the pre-copy's was big enough)


@dataclass
class Aborted:
    """The prepared layout is dropped; an unconfirmed commit is undone (AbortCommand)."""

    kind: ClassVar[str] = "aborted"
    rank: int


@dataclass
class Reformed:
    """This rank is in the world `formation` (ReformCommand)."""

    kind: ClassVar[str] = "reformed"
    rank: int
    formation: int


@dataclass
class Left:
    """This rank has left its world, before `formation` forms (LeaveCommand)."""

    kind: ClassVar[str] = "left"
    rank: int
    formation: int


@dataclass
class Digest:
    """sha1 of each (layer, KV head, block) slice this rank holds (DigestCommand)."""

    kind: ClassVar[str] = "digest"
    rank: int
    digests: dict[str, str]


@dataclass
class WorkerFailed:
    """A command failed on this rank (the process lives on), or its start-up did (it exits).
    Tagged with the world it happened in (`formation`; None for start-up and work beside the
    steps) and, for a commit or work beside the steps, the switch it belonged to."""

    kind: ClassVar[str] = "failed"
    rank: int
    message: str  # what failed while doing what
    traceback: str
    formation: int | None = None
    switch: int | None = None


@dataclass
class Heartbeat:
    """Sent every HEARTBEAT_INTERVAL_S on a socket of its own while the process runs."""

    kind: ClassVar[str] = "heartbeat"
    rank: int
    t: float  # time.monotonic() when sent
    pid: int


Reply = (Started | Prepared | Precopied | Committed | Aborted | Reformed | Left | Digest | WorkerFailed
         | Heartbeat)

Message = (StepCommand | PrepareCommand | PrecopyCommand | CommitCommand | ConfirmCommand
           | AbortCommand | DigestCommand | LeaveCommand | ReformCommand | ShutdownCommand | StepResult
           | Reply)

_TYPES = {cls.__name__: cls for cls in (StepCommand, PrepareCommand, PrecopyCommand, CommitCommand,
                                        ConfirmCommand, AbortCommand, DigestCommand, LeaveCommand, ReformCommand,
                                        ShutdownCommand, StepResult, Started, Prepared, Precopied, Committed,
                                        Aborted, Reformed, Left, Digest, WorkerFailed, Heartbeat)}


class MessageError(ValueError):
    """Bytes that are not a message of this protocol."""


def encode(msg: Message) -> bytes:
    """JSON of the message's fields, tagged with its type's name."""
    if type(msg).__name__ not in _TYPES:
        raise MessageError(f"{type(msg).__name__} is not a message type")
    return json.dumps({"t": type(msg).__name__, "b": asdict(msg)}, separators=(",", ":")).encode()


def decode(data: bytes) -> Message:
    """The message `encode` made; MessageError for anything else (an unknown type tag included)."""
    try:
        raw = json.loads(data)
        tag, body = raw["t"], dict(raw["b"])
    except (ValueError, TypeError, KeyError) as exc:
        raise MessageError(f"not a message: {exc}") from None
    cls = _TYPES.get(tag) if isinstance(tag, str) else None
    if cls is None:
        raise MessageError(f"unknown message type {tag!r}")
    try:
        if cls is StepCommand:
            body["seqs"] = [SeqWork(**s) for s in body["seqs"]]
        elif cls in (PrecopyCommand, CommitCommand):
            body["moves"] = [KVMoveRows(**m) for m in body.get("moves", [])]
        elif cls is Prepared and body.get("build") is not None:
            body["build"] = BuildTimes(**body["build"])
        return cls(**body)
    except (TypeError, KeyError) as exc:
        raise MessageError(f"malformed {tag}: {exc}") from None
