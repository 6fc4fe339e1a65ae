"""A worker process: one rank of the pool.

It joins the world group, opens the weight store and waits. Prepare / Precopy / Commit
(or Abort) commands move it from one layout to another — or to standby — with live KV
carried over (see remp.reconfig.transaction); each StepCommand runs this rank's layers for one step: stage
0 embeds the tokens, inner stages receive the hidden state from the previous stage and
pass theirs on (asynchronously, so a stage starts the next micro-batch at once), and the
last stage gathers the vocabulary-parallel logits on its first tensor rank, which samples
and sends the tokens back to the engine.
"""
from __future__ import annotations

import faulthandler
import gc
import itertools
import json
import os
import queue
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

import torch
import torch.distributed as dist
import zmq

from remp.config import ModelConfig
from remp.engine.sampling import sample_row
from remp.executor.cut import CutFlags
from remp.executor.messages import (FAULT_ENV, AbortCommand, CommitCommand, ConfirmCommand,
                                    DigestCommand, LeaveCommand, PrecopyCommand, PrepareCommand, ReformCommand, SeqWork,
                                    ShutdownCommand, StepCommand, StepResult, WorkerReply, decode, encode)
from remp.kv.cache import KVCache
from remp.kv.migration import KVTransfer
from remp.model.llama import Batch, StageModel, StepCut, with_cut_flag
from remp.parallel.groups import Groups, init_world
from remp.topology import Topology
from remp.weights.store import WeightStore

HEARTBEAT_INTERVAL_S = 0.5


def use_threads(n: int) -> None:
    """Run this thread's torch ops on `n` OpenMP threads, for good. PyTorch sets up each thread's
    count lazily, at its first parallel op, from the process-wide count that the last
    set_num_threads on *any* thread stored: a thread that sets its count before that op takes
    whatever count another thread sets later. (The builder did: it set 1, then ran every
    pre-copy with the 2 threads a commit on the main thread had set since.) Reading the count
    first does the setting-up now."""
    torch.get_num_threads()
    torch.set_num_threads(n)


def background_pool() -> ThreadPoolExecutor:
    """The one thread that builds targets and pre-copies KV beside the steps. Its copies run on
    one OpenMP thread: a team of its own would spin at every barrier against the steps' team for
    the same cores (SmolLM2 on 2 cores, pool of 4, three requests decoding, a tour of 18 switches:
    median 128-148 ms and slowest 291-490 ms with the builder on 2 threads, 73-75 and 99-116 ms on
    one)."""
    return ThreadPoolExecutor(1, thread_name_prefix="remp-prepare", initializer=use_threads, initargs=(1,))


def inject_fault(phase: str, rank: int) -> None:
    """Fault injection for the fault-tolerance tests: REMP_FAULT_INJECT="PHASE:RANK:kill|hang"
    makes that rank SIGKILL or SIGSTOP itself when it reaches PHASE of a live switch ("prepare":
    while building the target shard, not at the first load; "migrate": before exchanging KV, in the
    pre-copy beside the steps or, when there is none, in the pause).
    The engine never passes it to a replacement."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    when, who, action = spec.split(":")
    if when == phase and int(who) == rank:
        os.kill(os.getpid(), signal.SIGKILL if action == "kill" else signal.SIGSTOP)


class Worker:
    def __init__(self, rank: int, pool_size: int, backend: str, model_path: str, dtype: torch.dtype, device: str,
                 cut_flags: CutFlags):
        self.rank = rank
        self.pool_size = pool_size
        self.backend = backend
        self.dtype = dtype
        self.device = torch.device(device)
        self.model_config = ModelConfig.from_pretrained(model_path)
        self.hf_config = self.model_config.hf_config()
        self.store = WeightStore(model_path)
        self.groups: Groups | None = None  # made when the world forms (the first Reform: joining it)
        self.formation = 0  # of the world this rank is in (ReformCommand.formation); tags its error reports
        self.newest_formation = 0  # of the newest Reform received (set by the command thread)
        self.topo: Topology | None = None
        self.model: StageModel | None = None
        self.kv: KVCache | None = None
        self.target: tuple[Topology, StageModel, KVCache] | None = None  # prepared, not yet committed
        # What a commit replaced (topo, model, kv, loaded, threads), kept until a ConfirmCommand:
        # an Abort or Reform before then goes back to it.
        self.previous: tuple | None = None
        self._pending_sends: list[dist.Work] = []
        self.block_size = 0  # of the KV cache, set by the first Prepare (the same for every layout)
        self.loaded = False  # a first layout (or standby) has been committed
        self.cut_flags = cut_flags  # steps up to this rank's id stop at their next check (written by the engine)
        self.pause_space: torch.Tensor | None = None  # the pause's exchange buffers, touched in the pre-copy

    def prepare(self, cmd: PrepareCommand) -> dict:
        """Build the target layout beside the steps that keep coming: its groups (collective over
        the pool: every rank's builder thread runs the preparations in command order), this
        rank's shard as views of the weight store, and its KV cache (layers in place are shared)."""
        t0 = time.perf_counter()
        topo = Topology(cmd.tp, cmd.pp)
        group = self.groups.tp_group(topo)
        t_groups = time.perf_counter()
        self.target = None
        self.block_size = cmd.block_size
        if self.loaded:
            inject_fault("prepare", self.rank)
        if topo.coords(self.rank) is None:
            return {"standby": True, "weight_bytes": 0}
        old = self.model
        same_split = old is not None and old.topo.tp == topo.tp and old.tp_rank == topo.coords(self.rank)[1]
        weights = self.store.shard(self.model_config, topo, self.rank, self.dtype, reuse=old.w if same_split else None)
        t_shard = time.perf_counter()
        model = StageModel(self.model_config, topo, self.rank, weights, group, self.hf_config, self.device)
        t_model = time.perf_counter()
        copied = [w for k, w in model.w.items() if not (self.store.maps(w) or (same_split and old.w.get(k) is w))]
        kv = KVCache(self.model_config, topo, self.rank, cmd.num_blocks, cmd.block_size, self.dtype, self.device,
                     reuse=self.kv)
        self.target = (topo, model, kv)
        t_kv = time.perf_counter()
        return {"standby": False, "weight_bytes": sum(w.numel() * w.element_size() for w in copied),
                "build_s": {"groups": t_groups - t0, "shard": t_shard - t_groups, "model": t_model - t_shard,
                            "kv": t_kv - t_model}}

    def _routes(self, rows: list[list[int]]) -> tuple[list[KVTransfer], dict[int, list[KVTransfer]],
                                                       dict[int, list[KVTransfer]]]:
        """This rank's part of a migration: the slices that stay on it, those it sends (per peer)
        and those it receives (per peer). `rows` are KVTransfer fields."""
        local: list[KVTransfer] = []
        sends: dict[int, list[KVTransfer]] = {}
        recvs: dict[int, list[KVTransfer]] = {}
        for t in (KVTransfer(*row) for row in rows):
            if t.src_rank == self.rank and t.dst_rank == self.rank:
                local.append(t)
            elif t.src_rank == self.rank:
                sends.setdefault(t.dst_rank, []).append(t)
            elif t.dst_rank == self.rank:
                recvs.setdefault(t.src_rank, []).append(t)
        return local, sends, recvs

    def _head_elements(self, num_blocks: int) -> int:
        """Elements of one KV head's slice of `num_blocks` blocks (keys and values)."""
        return num_blocks * 2 * self.block_size * self.model_config.head_dim

    def migrate(self, rows: list[list[int]], src_blocks: list[int], dst_blocks: list[int],
                space: torch.Tensor | None = None) -> int:
        """Send the slices this rank holds to their new owners and receive its own: one buffer
        per peer each way, posted together (batch_isend_irecv) so no pair can deadlock. Each
        slice is copied once on each side: gathered from the old cache straight into its place
        in the send buffer, scattered from the receive buffer straight into the new cache. The
        slices that stay on this rank are copied while the others cross (in the pause they were
        1-3 ms of a 5-12 ms migration on a rank that had them, spent before its sends went out).
        The buffers are carved from `space` when it is big enough (the pause's, set aside by
        `get_pause_ready`), else allocated; returns the bytes allocated. `rows` are KVTransfer
        fields; block src_blocks[i] of the old cache is dst_blocks[i] of the new."""
        inject_fault("migrate", self.rank)
        new_kv = self.target[2] if self.target else None
        local, sends, recvs = self._routes(rows)
        # A rank whose preparation failed has nowhere to put its slices (a pre-copy is queued
        # behind the preparation, not after its success): it still sends what it holds and takes
        # what it is sent, so no peer waits on it, and then fails.
        unprepared = new_kv is None and bool(local or recvs)
        local = [] if unprepared else [t for t in local if t.layer not in new_kv.reused]
        src_idx = torch.tensor(src_blocks, device=self.device)
        dst_idx = torch.tensor(dst_blocks, device=self.device)
        shape = (len(src_blocks), 2, self.block_size, -1, self.model_config.head_dim)
        per_head = self._head_elements(len(src_blocks))
        peers = [*sends.items(), *recvs.items()]
        total = sum(t.num_heads for _, ts in peers for t in ts) * per_head
        fits = space is not None and space.numel() >= total
        room = space if fits else torch.empty(total, dtype=self.dtype, device=self.device)
        flats, parts, offset = [], [], 0
        for _, ts in peers:  # one flat buffer per peer and direction, each transfer's part of it
            size = sum(t.num_heads for t in ts) * per_head
            flats.append(room[offset:offset + size])
            bounds = itertools.accumulate((t.num_heads * per_head for t in ts), initial=offset)
            parts.append([room[a:b].view(shape) for a, b in itertools.pairwise(bounds)])
            offset += size
        for (_, ts), out in zip(sends.items(), parts):
            for t, part in zip(ts, out):
                torch.index_select(self.kv.heads(t.layer, t.src_head, t.num_heads), 0, src_idx, out=part)
        group = self.groups.migration
        ops = [dist.P2POp(dist.irecv, flat, src, group) for src, flat in zip(recvs, flats[len(sends):])]
        ops += [dist.P2POp(dist.isend, flat, dst, group) for dst, flat in zip(sends, flats)]
        exchanges = dist.batch_isend_irecv(ops) if ops else []
        try:
            for t in local:
                old = self.kv.heads(t.layer, t.src_head, t.num_heads)
                new_kv.heads(t.layer, t.dst_head, t.num_heads).index_copy_(0, dst_idx, old.index_select(0, src_idx))
        finally:
            _wait_all(exchanges)
        if unprepared:
            raise RuntimeError("no prepared layout to copy KV into (its preparation failed)")
        for (_, ts), out in zip(recvs.items(), parts[len(sends):]):
            for t, part in zip(ts, out):
                new_kv.heads(t.layer, t.dst_head, t.num_heads).index_copy_(0, dst_idx, part)
        return 0 if fits else total * room.element_size()

    def precopy(self, cmd: PrecopyCommand) -> None:
        """Beside the steps: copy the full blocks, then get the pause ready for the rest."""
        if cmd.blocks:
            self.migrate(cmd.transfers, cmd.blocks, cmd.blocks)
        self.get_pause_ready(cmd.transfers, cmd.filling, cmd.room)

    def get_pause_ready(self, rows: list[list[int]], filling: list[int], room: int) -> None:
        """Touch now what the pause will write (see PrecopyCommand): the exchange buffers for
        `room` blocks, and the target's blocks `filling` in every layer the pause writes (all but
        the layers shared with the cache in use, where the data already is)."""
        _, sends, recvs = self._routes(rows)
        heads = sum(t.num_heads for ts in [*sends.values(), *recvs.values()] for t in ts)
        self.pause_space = torch.zeros(heads * self._head_elements(room), dtype=self.dtype, device=self.device)
        new_kv = self.target[2] if self.target else None
        if new_kv is None:  # leaving the layout (it may still send) or standby
            return
        blocks = torch.tensor([b for b in filling if b < new_kv.num_blocks], dtype=torch.long, device=self.device)
        for layer, cache in new_kv.layers.items():
            if layer not in new_kv.reused:
                cache.index_fill_(0, blocks, 0)

    def commit(self, cmd: CommitCommand) -> dict:
        """Move the KV left for the pause, then switch, tentatively (see CommitCommand). The commit
        may follow steps still in flight elsewhere: the hidden states this rank sent the next
        stage are taken first (dropping a send under way would lose it)."""
        try:
            _wait_all(self._pending_sends)
        finally:
            self._pending_sends.clear()
        t0 = time.perf_counter()
        allocated = 0
        if cmd.src_blocks:
            allocated = self.migrate(cmd.transfers, cmd.src_blocks, cmd.dst_blocks, self.pause_space)
        self.pause_space = None
        info = {"migrate_s": time.perf_counter() - t0, "allocated_bytes": allocated}
        self.previous = (self.topo, self.model, self.kv, self.loaded, torch.get_num_threads())
        use_threads(cmd.threads)
        self.loaded = True
        self.topo, self.model, self.kv = self.target or (None, None, None)  # no target: standby
        self.target = None
        return info

    def abort(self) -> dict:
        """Drop the prepared layout, and go back to the old one if a commit was not yet confirmed."""
        self.target = None
        self.pause_space = None
        if self.previous is not None:
            self.topo, self.model, self.kv, self.loaded, threads = self.previous
            self.previous = None
            use_threads(threads)
        return {}

    def reform(self, cmd: ReformCommand) -> dict:
        """Join the world at `cmd.dist_init`, leaving the one a lost peer broke, if any. The
        layout, shard and KV stay (the next Prepare of the same layout reuses them) — the old ones
        when a commit was not confirmed yet (the switch failed in its pause); every group is
        rebuilt. A rendezvous that fails (a member lost meanwhile) leaves this rank in no world,
        ready for the next Reform."""
        self.leave()
        self.formation = cmd.formation
        init_world(self.rank, self.pool_size, cmd.dist_init, self.backend)
        self.groups = Groups(self.rank)
        return {}

    def leave(self) -> dict:
        """Leave the world, if in one: go back to the layout in use (see `abort`) and let go of
        every group, so that their connections close now — a peer still blocked in an exchange
        with this rank fails at once and takes its own Leave, instead of waiting out DIST_TIMEOUT.
        (The models keep their weights: the next Prepare builds them anew around new groups.)"""
        self.abort()
        self._pending_sends.clear()
        for model in (self.model, self.target and self.target[1], self.previous and self.previous[1]):
            if model is not None:
                model.tp_group = None
        self.groups = None
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()
        return {}

    def control(self, msg: CommitCommand | ConfirmCommand | AbortCommand | ReformCommand | LeaveCommand
                | DigestCommand) -> tuple[str, dict] | None:
        """Run a reconfiguration or inspection command; returns the reply kind and its info, or
        None for a command that gets no reply (Confirm)."""
        if isinstance(msg, CommitCommand):
            return "committed", self.commit(msg)
        if isinstance(msg, ConfirmCommand):
            self.previous = None
            return None
        if isinstance(msg, AbortCommand):
            return "aborted", self.abort()
        if isinstance(msg, ReformCommand):
            return "reformed", self.reform(msg)
        if isinstance(msg, LeaveCommand):
            return "left", self.leave()
        if isinstance(msg, DigestCommand):
            return "digest", self.kv.digests(msg.blocks) if self.kv else {}
        raise TypeError(f"unknown command {type(msg).__name__}")

    def _batch(self, seqs: list[SeqWork], block_size: int) -> Batch:
        ids, positions, slots = [], [], []
        for s in seqs:
            ids.extend(s.token_ids)
            for pos in range(s.start, s.start + len(s.token_ids)):
                positions.append(pos)
                slots.append(s.block_table[pos // block_size] * block_size + pos % block_size)
        dev = self.device
        return Batch(input_ids=torch.tensor(ids, device=dev), positions=torch.tensor(positions, device=dev),
                     slots=torch.tensor(slots, device=dev), block_size=block_size,
                     q_lens=[len(s.token_ids) for s in seqs], starts=[s.start for s in seqs],
                     block_tables=[s.block_table for s in seqs], device=dev)

    def step(self, cmd: StepCommand) -> StepResult | None:
        t0 = time.perf_counter()
        model, topo = self.model, self.topo
        batch = self._batch(cmd.seqs, self.kv.block_size)
        t1 = time.perf_counter()
        self._pending_sends = [w for w in self._pending_sends if not w.is_completed()]
        # Asked after each attention and MLP on a CPU, where a step takes up to hundreds of ms. On a
        # GPU a step takes milliseconds, and reading each answer would stall the kernel queue.
        cut = (lambda: cmd.step_id <= self.cut_flags.upto(self.rank)) if self.device.type == "cpu" else None
        size = len(batch.input_ids) * self.model_config.hidden_size
        out = None
        failure: Exception | None = None
        try:
            hidden = None
            if not model.is_first:
                # The hidden state comes with one more element: 1 if an earlier stage cut the step
                # (never where cuts are off: no host read of it there).
                message = torch.empty(size + 1, dtype=self.dtype, device=self.device)
                dist.recv(message, src=topo.rank(model.stage - 1, model.tp_rank), group=self.groups.pipeline)
                if cut is not None and message[-1].item() > 0:
                    raise StepCut
                hidden = message[:-1].view(len(batch.input_ids), -1)
            out = model.forward(batch, hidden, self.kv, cut)
        except StepCut:
            pass
        except Exception as exc:
            # A step that fails (a lost tensor peer, say) still passes a cut on: the next stage would
            # wait for this hidden state until the collective timeout, and no Reform would break
            # that wait, as this rank's next command may be a commit sent right behind the cut.
            if model.is_last:
                raise
            failure = exc
        if not model.is_last:
            body = out if out is not None else torch.zeros(size, dtype=self.dtype, device=self.device)
            message = with_cut_flag(body, out is None)
            try:
                self._pending_sends.append(dist.isend(message, dst=topo.rank(model.stage + 1, model.tp_rank),
                                                      group=self.groups.pipeline))
            finally:
                if failure is not None:
                    raise failure
            return None
        if out is None:  # every rank of the stage agreed (see StageModel._all_reduce); the first answers
            return StepResult(step_id=cmd.step_id, token_ids=[], logprobs=[], parse_s=t1 - t0,
                              cut=True) if model.tp_rank == 0 else None
        logits = self._gather_logits(out)
        if logits is None:
            return None
        tokens, logprobs = sample(logits[:, :self.model_config.vocab_size].float(), cmd.seqs)
        return StepResult(step_id=cmd.step_id, token_ids=tokens, logprobs=logprobs,
                          parse_s=t1 - t0)

    def _gather_logits(self, local: torch.Tensor) -> torch.Tensor | None:
        """Full-vocabulary logits on the stage's first tensor rank, None elsewhere."""
        model = self.model
        if model.tp_group is None:
            return local
        dst = self.topo.rank(model.stage, 0)
        parts = [torch.empty_like(local) for _ in range(self.topo.tp)] if model.tp_rank == 0 else None
        dist.gather(local, parts, dst=dst, group=model.tp_group)
        return torch.cat(parts, dim=-1) if parts is not None else None


def _wait_all(works: list[dist.Work]) -> None:
    """Wait for every exchange before raising the first failure: a peer that died fails only the
    exchanges with it, and the live peers still get what this rank sends them — otherwise they
    would sit in their receives until the collective timeout instead of failing fast too."""
    errors = []
    for work in works:
        try:
            work.wait()
        except RuntimeError as exc:
            errors.append(exc)
    if errors:
        raise errors[0]


def sample(logits: torch.Tensor, seqs: list[SeqWork]) -> tuple[list[int], list]:
    tokens, logprobs = [], []
    for row, s in zip(logits, seqs):
        token = sample_row(row, s.temperature, s.top_p, s.top_k, s.seed, s.out_pos)
        tokens.append(token)
        if s.logprobs is None:
            logprobs.append(None)
            continue
        lp = torch.log_softmax(row, dim=-1)
        top = torch.topk(lp, s.logprobs) if s.logprobs else None
        entries = [[token, float(lp[token])]]
        if top is not None:
            entries += [[int(i), float(v)] for v, i in zip(top.values, top.indices)]
        logprobs.append(entries)
    return tokens, logprobs


def _failure(exc: BaseException, doing: str = "") -> tuple[dict, str]:
    """The info and message of an "error" reply: the traceback, and what failed while doing what."""
    return {"traceback": traceback.format_exc()}, f"{doing}{type(exc).__name__}: {exc}"


def _heartbeat(ctx: zmq.Context, addr: str, rank: int, stop: threading.Event) -> None:
    """Beat on a socket of its own while the process runs: a worker blocked in a collective keeps
    beating, one that is stopped or wedged does not, which is how the engine tells them apart."""
    sock = ctx.socket(zmq.PUSH)
    # Queue every beat while nobody reads them (a few bytes each): the engine reads the newest
    # one's time when it next looks, so it never takes a stale beat for the last one.
    sock.setsockopt(zmq.SNDHWM, 100_000)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    pid = os.getpid()
    try:
        while True:
            try:
                sock.send(encode(WorkerReply(rank=rank, kind="heartbeat", info={"t": time.monotonic(), "pid": pid})),
                          zmq.NOBLOCK)
            except zmq.Again:  # nobody is draining beats right now; a fresh one follows
                pass
            if stop.wait(HEARTBEAT_INTERVAL_S):
                break
    finally:
        sock.close()  # an open socket would block ctx.term() at exit


def worker_main(rank: int, pool_size: int, backend: str, cmd_addr: str, result_addr: str,
                beat_addr: str, cut_path: str, model_path: str, dtype: str, device: str) -> None:
    """Process entry point (dtype is a torch attribute name such as 'float32').

    Runs until a ShutdownCommand, or until its parent (the engine) is gone. A failed command —
    a step or a reconfiguration — is reported and the prepared state dropped, and the process
    lives on: the failure may be a lost peer, after which the engine re-forms the world (Reform)
    and this rank serves again; start-up failures are fatal.
    """
    use_threads(1)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack: where is it stuck?
    parent = os.getppid()
    ctx = zmq.Context()
    cmds = ctx.socket(zmq.PULL)
    cmds.connect(cmd_addr)
    results = ctx.socket(zmq.PUSH)
    results.setsockopt(zmq.LINGER, 1000)
    results.connect(result_addr)

    def reply(kind: str, info: dict | None = None, message: str = "") -> None:
        results.send(encode(WorkerReply(rank=rank, kind=kind, message=message, info=info or {})))

    stop_beating = threading.Event()
    beats = threading.Thread(target=_heartbeat, args=(ctx, beat_addr, rank, stop_beating), daemon=True)
    beats.start()
    # Work that runs beside the steps (building a target, pre-copying KV) is done on this thread
    # and answers on a socket of its own the moment it is done, not after the step under way.
    builder = background_pool()
    builder_out = ctx.socket(zmq.PUSH)  # used on the builder thread only
    builder_out.setsockopt(zmq.LINGER, 1000)
    builder_out.connect(result_addr)

    def in_background(kind: str, switch_id: int, work: Callable[[], dict | None]) -> Future:
        def run() -> None:
            try:
                info, reply_kind, message = {**(work() or {}), "switch": switch_id}, kind, ""
            except Exception as exc:
                # Drop only what the builder made: the layout in use (and one committed but not yet
                # confirmed, whose Confirm may still wait in the main thread's inbox) is the main
                # thread's, and an Abort from the engine restores it there.
                worker.target = None
                failure, message = _failure(exc, f"{kind}: ")
                info, reply_kind = {**failure, "switch": switch_id}, "error"
            builder_out.send(encode(WorkerReply(rank=rank, kind=reply_kind, message=message, info=info)))
        return builder.submit(run)

    # The command socket belongs to this thread, which starts background work the moment it
    # arrives — not behind the steps already queued for this rank (a pipeline stage has up to pp
    # of them) — and hands every other command to the main thread, with the background work
    # submitted before it: a control command acts on what the builder made.
    inbox: queue.SimpleQueue[tuple[object, Future | None]] = queue.SimpleQueue()

    stop_receiving = threading.Event()  # set when the main loop ends, whatever ended it

    def receive() -> None:
        building: Future | None = None
        try:
            while not stop_receiving.is_set():
                if not cmds.poll(1000):
                    if os.getppid() != parent:
                        inbox.put((ShutdownCommand(), None))
                        return
                    continue
                msg = decode(cmds.recv())
                if isinstance(msg, PrepareCommand):
                    building = in_background("prepared", msg.switch_id, lambda msg=msg: worker.prepare(msg))
                elif isinstance(msg, PrecopyCommand):
                    building = in_background("precopied", msg.switch_id, lambda msg=msg: worker.precopy(msg))
                elif isinstance(msg, StepCommand):
                    inbox.put((msg, None))
                elif isinstance(msg, ReformCommand):
                    worker.newest_formation = max(worker.newest_formation, msg.formation)
                    inbox.put((msg, building))
                    building = None
                else:
                    inbox.put((msg, building))
                    building = None
                    if isinstance(msg, ShutdownCommand):
                        return
        except BaseException as exc:  # the main thread reports it and stops
            inbox.put((exc, None))

    receiver = threading.Thread(target=receive, name="remp-commands", daemon=True)
    try:
        worker = Worker(rank, pool_size, backend, model_path, getattr(torch, dtype), device,
                        CutFlags(cut_path, pool_size))
        receiver.start()
        # Started: the slow part (imports, config, weight store) is done. The world is joined when
        # the engine sends the first Reform, once every member has said this — so a rendezvous
        # only ever waits on members that are up, for milliseconds.
        reply("started", {"pid": os.getpid()})
        while True:
            msg, building = inbox.get()
            if isinstance(msg, BaseException):
                raise msg
            if isinstance(msg, ShutdownCommand):
                break
            if isinstance(msg, StepCommand):
                try:
                    result = worker.step(msg)
                except Exception as exc:
                    failure, message = _failure(exc, "step: ")
                    reply("error", {**failure, "formation": worker.formation}, message)
                    continue
                if result is not None:
                    results.send(encode(result))
                continue
            if building is not None:
                wait([building])
            if isinstance(msg, ReformCommand) and msg.formation < worker.newest_formation:
                continue  # the engine gave that world up and asked for a newer one: join that instead
            # A commit's answer carries its switch (one of a switch given up for a lost peer is
            # dropped) and a Reform's its formation (a failed rendezvous is told from stale reports);
            # an error the world it happened in (one of a world since re-formed is dropped).
            tag = ({"switch": msg.switch_id} if isinstance(msg, CommitCommand) else
                   {"formation": msg.formation} if isinstance(msg, (ReformCommand, LeaveCommand)) else {})
            try:
                answer = worker.control(msg)
            except Exception as exc:
                worker.abort()
                failure, message = _failure(exc, f"{type(msg).__name__}: ")
                reply("error", {**failure, "formation": worker.formation, **tag}, message)
                continue
            if answer is not None:
                reply(answer[0], {**answer[1], **tag})
    except Exception as exc:  # a failed start-up (or a broken command socket): report, then die
        reply("error", *_failure(exc))
        raise
    finally:
        stop_beating.set()
        beats.join()
        stop_receiving.set()
        if receiver.is_alive():
            receiver.join()
        builder.shutdown(wait=True)
        builder_out.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        results.close()
        cmds.close(linger=0)
        ctx.term()


if __name__ == "__main__":
    worker_main(**json.loads(sys.argv[1]))
