"""A live layout switch as a transaction.

plan     validate the target, size its KV cache, place the running requests (their group and
         block ids in the target, remp.kv.placement) and compute the KV moves; this may start
         while a step is in flight (the engine looks for switches while it waits)
prepare  every pool worker builds the target's groups, shard and KV cache (layers already in
         place are shared), then pre-copies the KV of every full block of the running
         requests to its new owners (Llumnix-style: a full block is never written again while
         its request holds it); meanwhile the engine keeps stepping on the old layout, and new
         requests wait for the target (their prefill would hold the switch up for a long step)
drain    the moment every worker has answered both (the engine looks while it waits for a
         step), the pause begins: no more steps are sent and those in flight are cut at their
         next check (remp.executor.cut); a step that ends first delivers its tokens, a cut one
         runs again on the target. So the pause waits for a few ms, not for the rest of a step
         (up to hundreds of ms on a CPU)
migrate  right behind the cut (or after the drain, when requests the target has no room for in
& commit their group must be preempted), one command: every worker, after its own last step,
         moves the KV slices of the live blocks not pre-copied (those still filling, and any
         handed out again since) to their new owners and switches to the target, tentatively
         until all have (then the engine confirms); block tables follow the placement (new ids
         for a request that changes group or a block the new cache lacks); stepping resumes

Any error before the confirmation aborts: the prepared state is dropped, a worker that had
switched goes back, and the old layout, whose shards, KV and groups were never touched, keeps
serving. If the error is a worker that died or hung, it is replaced first (the engine's
`recover`): the survivors re-form the world with a fresh process in its rank and the old layout
is rebuilt around it. Requests never leave the scheduler, so none is lost or duplicated.

The transaction reaches the engine's requests and KV blocks only through the methods listed in
remp.reconfig.host.SwitchHost, and the workers through the engine's executor.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from remp.engine.outputs import RequestOutput
from remp.executor.local import LOST_PEER_GRACE_S, WorkerError, check_built
from remp.executor.messages import KVMoveRows
from remp.kv.migration import KVMove, bytes_moved, kv_moves, to_rows
from remp.kv.placement import BlockSpace, Placement, RequestKV, place_requests
from remp.reconfig.host import SwitchHost
from remp.topology import Topology


class ReconfigInProgress(RuntimeError):
    """A second switch was asked for while one runs."""


@dataclass
class ReconfigResult:
    outcome: str  # "committed" | "rolled_back" | "unchanged"
    source: dict
    target: dict
    reason: str | None = None
    # queued, plan, prepare (build and pre-copy, serving), drain (cut the steps in flight), commit
    # (move the KV left and switch), pause (= drain + commit), migrate (the slowest rank's migration,
    # timed on the worker; it may begin in the drain), total (all of them)
    timings_s: dict[str, float] = field(default_factory=dict)
    kv_bytes_moved: int = 0  # crossed between ranks, pre-copy included
    kv_bytes_in_pause: int = 0  # the part of it moved in the pause
    weight_bytes_loaded: int = 0  # copied or packed into target shards (0 where every shard is a view of the mapping)
    live_kv_blocks: int = 0
    precopied_kv_blocks: int = 0  # of the live blocks, those whose KV the pre-copy moved
    # Exchange buffers the pause had to allocate, over all workers: 0 when the pre-copy set enough
    # aside (remp.executor.messages.PrecopyCommand), so the pause touched no fresh memory.
    kv_buffer_bytes_allocated_in_pause: int = 0
    num_kv_blocks: dict[str, int] = field(default_factory=dict)  # before / after
    preempted_request_ids: list[str] = field(default_factory=list)
    replaced_ranks: list[int] = field(default_factory=list)  # workers lost during the switch and restarted
    # Of "prepare", what the slowest worker spent on each part of building the target:
    # groups (the model's ParallelContext taking its groups, formed with the world), model
    # (building the modules), shard (putting the weights in place), kv. A model built before for
    # the layout is taken as it is: groups, model and shard are then 0.
    build_s: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def run_transaction(engine: SwitchHost, target: Topology, on_outputs: Callable[[list[RequestOutput]], None],
                    timeout_s: float = 120.0, requested_at: float | None = None) -> ReconfigResult:
    """Switch `engine` to `target` while it serves; outputs produced meanwhile go to `on_outputs`.
    Steps may be in flight: the preparation runs beside them. `requested_at` (time.perf_counter)
    is when the switch was asked for; the wait until now is "queued" and counts in "total".
    Raises TopologyError / ValueError (nothing changed) for a target that cannot run."""
    t0 = time.perf_counter()
    t_asked = t0 if requested_at is None else min(requested_at, t0)
    source = engine.topology
    model = engine.model_config
    target.validate(model, engine.config.pool_size)
    result = ReconfigResult("unchanged", source.as_dict(), target.as_dict())
    if target == source:
        return result
    num_blocks = engine.num_blocks_for(target)
    source_space, target_space = BlockSpace(engine.num_kv_blocks), BlockSpace(num_blocks)
    result.num_kv_blocks = {"before": engine.num_kv_blocks, "after": num_blocks}
    t_plan = time.perf_counter()
    result.timings_s["queued"] = t0 - t_asked
    result.timings_s["plan"] = t_plan - t0
    executor = engine.executor
    block_size, itemsize = engine.config.block_size, engine.dtype.itemsize

    def moves_for(running: list[RequestKV], placement: Placement, blocks: set[int], every_pair: bool = False):
        return kv_moves(model, source, target, running, placement, blocks, source_space, target_space, every_pair)

    def moved_bytes(moves: list[KVMove]) -> int:
        return sum(bytes_moved(m.transfers, len(m.src_blocks), block_size, model.head_dim, itemsize) for m in moves)

    def place(running: list[RequestKV], keep: Placement | None = None,
              reserved: dict[int, int] | None = None) -> Placement:
        return place_requests(running, source_space, target_space, source.dp, target.dp, keep, reserved,
                              engine.config.max_num_seqs)

    def place_at_pause() -> tuple[list[RequestKV], dict[int, int], Placement]:
        """The running requests now, each live block's hand-out count, and their placement: as
        planned for the pre-copy where nothing changed (a request keeps its planned group, a block
        still handed out as it was keeps its planned id), fresh for blocks taken since and for
        requests that did not fit then."""
        running = engine.running_kv()
        handouts_now = handouts_of(running)
        reserved = {b: precopy_placement.renumber[b] for b, h in handouts_now.items()
                    if b in precopy_placement.renumber and handouts_at_plan.get(b) == h}
        return running, handouts_now, place(running, keep=precopy_placement, reserved=reserved)

    engine.pause_admission()
    try:
        executor.prepare(target, num_blocks, block_size)
        # Where each running request goes (its group, its blocks' ids), decided now for the pre-copy.
        running = engine.running_kv()
        precopy_placement = place(running)
        handouts_at_plan = handouts_of(running)
        # Every full block that has a place in the target, with its hand-out count now: none is
        # written again unless it is freed and handed out anew, which its count shows at the pause.
        copied = {b: h for r in running if r.key in precopy_placement.groups
                  for b, h in zip(r.blocks[:r.full], r.handouts[:r.full])}
        filling: list[list[int]] = [[] for _ in range(target.dp)]  # the pause moves them
        for r in running:
            for b in r.blocks[r.full:] if r.key in precopy_placement.groups else ():
                place_id = precopy_placement.renumber[b]
                filling[target_space.group_of(place_id)].append(target_space.local(place_id))
        precopy_moves = moves_for(running, precopy_placement, set(copied), every_pair=True)
        if copied or any(filling):  # queued behind the preparation on each worker: no wait for "prepared" first
            # Buffers for every live block not pre-copied, and one more per request, per pair of groups:
            # no new prompt is admitted, and a decode fills a block in block_size steps (the pause
            # allocates the rest if a long prepare lets a request fill more).
            pause_blocks = [sum(len(r.blocks) + 1 for r in running
                                if (r.group, precopy_placement.groups.get(r.key)) == (m.src_dp, m.dst_dp))
                            - len(m.src_blocks) for m in precopy_moves]
            executor.precopy([to_wire(m) for m in precopy_moves], filling, pause_blocks)
            kinds = ["prepared", "precopied"]
        else:
            kinds = ["prepared"]
        _serve_until(engine, on_outputs, kinds, timeout_s)
        prepared = executor.answers("prepared", timeout_s)
        check_built(target, prepared)
        if "precopied" in kinds:
            executor.answers("precopied", timeout_s)
        result.weight_bytes_loaded = sum(answer.weight_bytes for answer in prepared.values())
        builds = [asdict(answer.build) for answer in prepared.values() if answer.build]  # standbys build nothing
        result.build_s = {part: max(b[part] for b in builds) for part in (builds[0] if builds else {})}
        t_prepared = time.perf_counter()
        result.timings_s["prepare"] = t_prepared - t_plan
        executor.cut()  # the steps in flight stop at their next check; they run again on the target
        running, handouts_now, pause_placement = place_at_pause()
        if pause_placement.overflow:  # requests the target has no room for in their group
            engine.drain(on_outputs)  # preempting needs the steps in
            result.preempted_request_ids = engine.preempt_requests(pause_placement.overflow)
            running, handouts_now, pause_placement = place_at_pause()
        unplaced = [r.request_id for r in running if r.key not in pause_placement.groups]
        if unplaced:
            raise RuntimeError(f"no place in {target} for running request(s) {', '.join(unplaced)}")
        # Otherwise the commit goes out right behind the cut (each worker runs it after its steps):
        # the drain only frees blocks, so what it moves is a superset of what stays live, and it
        # reaches the workers while they finish their steps instead of after.
        left = {b for b, h in handouts_now.items() if copied.get(b) != h}  # never copied, or handed out again since
        result.live_kv_blocks = len(handouts_now)
        result.precopied_kv_blocks = len(handouts_now) - len(left)
        pause_moves = moves_for(running, pause_placement, left)
        executor.start_commit(engine.threads_for(target), [to_wire(m) for m in pause_moves])
        engine.drain(on_outputs)
        t_paused = time.perf_counter()
        result.timings_s["drain"] = t_paused - t_prepared
        committed = executor.finish_commit(target, timeout_s)
    except Exception as exc:
        result.outcome = "rolled_back"
        result.reason = f"{type(exc).__name__}: {exc}"
        _roll_back(engine, on_outputs, result, timeout_s)
        result.timings_s["total"] = time.perf_counter() - t_asked
        return result
    finally:
        engine.resume_admission()
    engine.adopt_placement(num_blocks, target.dp, pause_placement)
    t_end = time.perf_counter()
    result.outcome = "committed"
    result.kv_bytes_in_pause = moved_bytes(pause_moves)
    result.kv_bytes_moved = moved_bytes(precopy_moves) + result.kv_bytes_in_pause
    # The pause runs from the cut (no step is sent after it, and the cut ones yield no token) to
    # the resume: drain, then commit (the rest of the migration, the swap, the answers). "migrate"
    # is the slowest rank's migration, timed on the worker: a rank migrates right after its own
    # last step, so part of it may fall in the drain.
    result.timings_s["commit"] = t_end - t_paused
    result.timings_s["pause"] = t_end - t_prepared
    result.timings_s["migrate"] = max(answer.migrate_s for answer in committed.values())
    result.kv_buffer_bytes_allocated_in_pause = sum(answer.allocated_bytes for answer in committed.values())
    result.timings_s["total"] = t_end - t_asked
    return result


def to_wire(move: KVMove) -> KVMoveRows:
    """A move as the control plane carries it."""
    return KVMoveRows(to_rows(move.transfers), move.src_blocks, move.dst_blocks)


def _serve_until(engine: SwitchHost, on_outputs: Callable[[list[RequestOutput]], None], kinds: list[str],
                 timeout_s: float) -> None:
    """Keep serving on the old layout until every pool worker has answered each of `kinds`,
    noticing the last answer while a step is under way (that step stays in flight, to be cut)."""
    executor = engine.executor
    since = time.monotonic()

    def answered() -> bool:
        return executor.has_replies(kinds, range(executor.pool_size))

    while not answered():
        if engine.num_running() or executor.in_flight:
            on_outputs(engine.step(interrupt=answered))
        else:  # idle, or only requests that wait for the target
            time.sleep(0.005)
        if time.monotonic() - since > timeout_s:
            raise TimeoutError(f"workers did not answer {', '.join(kinds)} within {timeout_s:.0f} s")


def _roll_back(engine: SwitchHost, on_outputs: Callable[[list[RequestOutput]], None], result: ReconfigResult,
               timeout_s: float) -> None:
    """Drop the prepared layout on every worker; when one is dead or hung, replace it instead
    (which drops the prepared layout too) and say so in `result`."""
    executor = engine.executor
    if not executor.failed_ranks():
        try:
            executor.abort(timeout_s)
            return
        except WorkerError:
            if not executor.failed_ranks(wait_s=LOST_PEER_GRACE_S):
                raise
    recovery = engine.recover(on_outputs)
    result.replaced_ranks = recovery.replaced_ranks
    result.preempted_request_ids += recovery.preempted_request_ids
    result.reason = (f"lost a worker: {recovery.cause}; replaced rank {', '.join(map(str, recovery.replaced_ranks))} "
                     f"and kept the old layout (first error: {result.reason})")


def handouts_of(running: list[RequestKV]) -> dict[int, int]:
    """Each live block's hand-out count (block -> count)."""
    return {b: h for r in running for b, h in zip(r.blocks, r.handouts)}
