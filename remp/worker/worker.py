"""A worker process: one rank of the pool. This module is the work (class Worker) and the
process's entry point; remp.worker.router says which thread runs each command.

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
import signal
import sys
import threading
import time
from concurrent.futures import Executor
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import nn

from remp.config import ModelConfig
from remp.engine.sampling import is_greedy, sample_row
from remp.executor.cut import CutFlags
from remp.executor.messages import (FAULT_ENV, Aborted, BuildTimes, CommitCommand, Committed, Digest,
                                    DigestCommand, KVMoveRows, LeaveCommand, Left, PrecopyCommand, Precopied,
                                    PrepareCommand,
                                    Prepared, ReformCommand, Reformed, SeqWork, StepCommand, StepResult)
from remp.kernels import paged_attention
from remp.kv.cache import KVCache
from remp.layers.packed import adopt_packed, drop_packed
from remp.kv.migration import KVTransfer
from remp.layers.batch import Batch
from remp.models.registry import model_class
from remp.parallel.context import ParallelContext, StepCut
from remp.parallel.groups import Groups, init_world
from remp.topology import Topology
from remp.weights.loader import load_weights
from remp.weights.store import WeightStore
from remp.worker.router import CommandRouter
from remp.worker.threads import use_threads


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


@dataclass
class LayoutState:
    """A layout as this rank holds it: the topology, this rank's stage of the model and its KV
    cache; and, where weights are packed, the layers still to pack (packed once the switch that
    made it the layout in use is confirmed)."""

    topo: Topology
    model: nn.Module
    kv: KVCache
    unpacked: list[nn.Module] = field(default_factory=list)


@dataclass
class ReplacedLayout:
    """What a commit replaced, kept until a ConfirmCommand: an Abort or Reform before then goes back to it."""

    layout: LayoutState | None  # None: standby, or nothing loaded yet
    loaded: bool  # Worker.loaded before the commit
    threads: int  # the main thread's OpenMP threads before the commit


class Worker:
    """The work of one rank: build layouts, move KV, switch, join worlds, run steps. Its methods
    take a command and return the reply to send (None: no reply); remp.worker.router calls them
    from the thread each command belongs to."""

    def __init__(self, rank: int, pool_size: int, backend: str, model_path: str, dtype: torch.dtype, device: str,
                 cut_flags: CutFlags, weights_path: str | None = None, pack_weights: bool = False,
                 background: Executor | None = None):
        self.rank = rank
        self.pool_size = pool_size
        self.backend = backend
        self.dtype = dtype
        self.device = torch.device(device)
        # Linear weights packed for oneDNN (remp.layers.packed): a layout is built on views, and its
        # layers are packed once the switch is final, on `background` (the builder thread), beside the steps.
        self.pack_weights = pack_weights
        self.background = background
        self.switch_waiting = threading.Event()  # a Prepare is queued: background packing gives way
        self.model_config = ModelConfig.from_pretrained(model_path)
        self.hf_config = self.model_config.hf_config()
        # Imported now, with the rest of start-up: a standby rank's first layout is built in a switch.
        self.model_class = model_class(self.model_config.architecture)
        if self.device.type == "cpu":
            paged_attention.load()  # likewise; built by scripts/setup.sh, else here, once per machine
        self.store = WeightStore(weights_path or model_path)
        self.groups: Groups | None = None  # made when the world forms (the first Reform: joining it)
        self.formation = 0  # of the world this rank is in (ReformCommand.formation); tags its error reports
        self.layout: LayoutState | None = None  # in use; None: standby, or nothing loaded yet
        self.target: LayoutState | None = None  # prepared, not yet committed
        self.previous: ReplacedLayout | None = None  # what a commit replaced, until its Confirm
        self._pending_sends: list[dist.Work] = []
        self.block_size = 0  # of the KV cache, set by the first Prepare (the same for every layout)
        self.loaded = False  # a first layout (or standby) has been committed
        self.cut_flags = cut_flags  # steps up to this rank's id stop at their next check (written by the engine)
        self.pause_buffer: torch.Tensor | None = None  # the pause's exchange buffer, touched in the pre-copy
        # Models built in this world whose every parameter is a view of the mapped checkpoint: they
        # cost no memory to keep, so a switch back to their layout builds nothing.
        self._built: dict[Topology, nn.Module] = {}

    # The layout in use, part by part (None on a standby rank or before the first layout).
    @property
    def topo(self) -> Topology | None:
        return self.layout.topo if self.layout else None

    @property
    def model(self) -> nn.Module | None:
        return self.layout.model if self.layout else None

    @property
    def kv(self) -> KVCache | None:
        return self.layout.kv if self.layout else None

    def prepare(self, cmd: PrepareCommand) -> Prepared:
        """Build the target layout beside the steps that keep coming: this rank's model, its
        weights as views of the weight store (or the model built for this layout before, in this
        world), and its KV cache (layers in place are shared). The groups were formed with the world."""
        topo = Topology.from_dict(cmd.layout)
        self.switch_waiting.clear()
        self.target = None
        self.block_size = cmd.block_size
        if self.loaded:
            inject_fault("prepare", self.rank)
        if topo.coords(self.rank) is None:
            return Prepared(self.rank, cmd.switch_id, standby=True)
        model, copied = self._built.get(topo), 0
        t0 = t_groups = t_model = time.perf_counter()
        if model is None:
            ctx = ParallelContext(topo, self.rank, self.groups, self.cut_flags, self.device)
            t_groups = time.perf_counter()
            model = self.model_class(self.model_config, ctx, self.hf_config)
            t_model = time.perf_counter()
            copied = self._load(model)
        # Packed weights: adopt those of the model in use for the layers that stay (no copy); the
        # rest are packed once the switch is final (`confirm`).
        unpacked = adopt_packed(model, self.model if self._same_split(model) else None) if self.pack_weights else []
        t_shard = time.perf_counter()
        # A layer's cache is shared with the layout in use only where this rank keeps its data-parallel
        # group and the groups keep their requests (the same dp): otherwise the KV the target receives
        # belongs to other requests than the layout in use writes there, at ids that are free now but
        # that the layout in use may hand out again before the pause.
        same_group = (self.topo is not None and self.topo.dp == topo.dp
                      and self.topo.coords(self.rank).dp_rank == topo.coords(self.rank).dp_rank)
        kv = KVCache(self.model_config, topo, self.rank, cmd.num_blocks, cmd.block_size, self.dtype, self.device,
                     reuse=self.kv if same_group else None)
        self.target = LayoutState(topo, model, kv, unpacked)
        t_kv = time.perf_counter()
        return Prepared(self.rank, cmd.switch_id, standby=False, layout=str(topo),
                        weight_bytes=copied,
                        build=BuildTimes(groups=t_groups - t0, shard=t_shard - t_model, model=t_model - t_groups,
                                         kv=t_kv - t_shard))

    def _same_split(self, model: nn.Module) -> bool:
        """Whether `model` cuts every weight as the model in use does (same tp size and rank)."""
        old = self.model
        return old is not None and old.ctx.tp_size == model.ctx.tp_size and old.ctx.tp_rank == model.ctx.tp_rank

    def _load(self, model: nn.Module) -> int:
        """Put `model`'s weights in place, taking over the tensors of the model in use where the
        tensor split is the same; returns the bytes that had to be copied (converted or moved to
        the device). A model made of views of the mapping only is kept for later switches (packed
        weights are not part of it: a layout's are dropped when a switch leaves it, see `confirm`)."""
        reuse = dict(self.model.named_parameters()) if self._same_split(model) else {}
        load_weights(model, self.store, self.dtype, self.device, reuse)
        if all(self.store.maps(w) for w in model.parameters()):
            self._built[model.ctx.topo] = model
        return sum(w.numel() * w.element_size() for k, w in model.named_parameters()
                   if not (self.store.maps(w) or reuse.get(k) is w))

    def _pack_in_background(self, layout: LayoutState) -> None:
        """Pack the layers of `layout` (the one in use) on the builder thread, one at a time, while
        the steps run: each layer switches to its packed weight when it is ready (the same bits,
        so a step may mix packed and unpacked layers). It gives way to a switch: when a Prepare is
        waiting (`switch_waiting`, set by the router) the layers left go back to `layout.unpacked`,
        packed after that switch is confirmed — or aborted, if the layout is kept."""
        layers, layout.unpacked = layout.unpacked, []

        def pack() -> None:
            t0, done = time.perf_counter(), 0
            for i, layer in enumerate(layers):
                if self.layout is not layout:
                    return
                if self.switch_waiting.is_set():
                    layout.unpacked = layers[i:]
                    return
                done += layer.pack()
            print(f"rank {self.rank}: packed {len(layers)} layers ({done / 2**20:.1f} MiB) for oneDNN in "
                  f"{1e3 * (time.perf_counter() - t0):.0f} ms", file=sys.stderr, flush=True)

        if self.background is None:
            pack()
        else:
            self.background.submit(pack)

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
                pause_buffer: torch.Tensor | None = None) -> int:
        """Send the slices this rank holds to their new owners and receive its own: one buffer
        per peer each way, posted together (batch_isend_irecv) so no pair can deadlock. Each
        slice is copied once on each side: gathered from the old cache straight into its place
        in the send buffer, scattered from the receive buffer straight into the new cache. The
        slices that stay on this rank are copied while the others cross, not before this rank's
        sends go out. The buffers are carved from `pause_buffer` when it is big enough (set aside
        by `get_pause_ready`), else allocated; returns the bytes allocated. `rows` are KVTransfer
        fields; block src_blocks[i] of the old cache is dst_blocks[i] of the new."""
        inject_fault("migrate", self.rank)
        new_kv = self.target.kv if self.target else None
        local, sends, recvs = self._routes(rows)
        # A rank whose preparation failed has nowhere to put its slices (a pre-copy is queued
        # behind the preparation, not after its success): it still sends what it holds and takes
        # what it is sent, so no peer waits on it, and then fails.
        unprepared = new_kv is None and bool(local or recvs)
        # A layer whose cache the target shares with the one in use already has its blocks in place:
        # a cache is shared only when dp and the block count stay, and then every block keeps its id
        # (remp.kv.placement).
        local = [] if unprepared else [t for t in local if t.layer not in new_kv.reused]
        src_idx = torch.tensor(src_blocks, device=self.device)
        dst_idx = torch.tensor(dst_blocks, device=self.device)
        shape = (len(src_blocks), 2, self.block_size, -1, self.model_config.head_dim)
        per_head = self._head_elements(len(src_blocks))
        peers = [*sends.items(), *recvs.items()]
        total = sum(t.num_heads for _, ts in peers for t in ts) * per_head
        fits = pause_buffer is not None and pause_buffer.numel() >= total
        buffer = pause_buffer if fits else torch.empty(total, dtype=self.dtype, device=self.device)
        flats, parts, offset = [], [], 0
        for _, ts in peers:  # one flat buffer per peer and direction, each transfer's part of it
            size = sum(t.num_heads for t in ts) * per_head
            flats.append(buffer[offset:offset + size])
            bounds = itertools.accumulate((t.num_heads * per_head for t in ts), initial=offset)
            parts.append([buffer[a:b].view(shape) for a, b in itertools.pairwise(bounds)])
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
        return 0 if fits else total * buffer.element_size()

    def migrate_all(self, moves: list[KVMoveRows], pause_buffer: torch.Tensor | None = None) -> int:
        """`migrate` each move in turn, as every rank does in the same order; returns the bytes
        allocated. A move that fails here (this rank's preparation failed, say) does not stop the
        ones after it: the peers wait on this rank in those too. The first failure is raised after."""
        allocated, failure = 0, None
        for move in moves:
            if not move.src_blocks:
                continue
            try:
                allocated += self.migrate(move.transfers, move.src_blocks, move.dst_blocks, pause_buffer)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return allocated

    def precopy(self, cmd: PrecopyCommand) -> Precopied:
        """Beside the steps: copy the full blocks, then get the pause ready for the rest."""
        self.migrate_all(cmd.moves)
        self.get_pause_ready(cmd)
        return Precopied(self.rank, cmd.switch_id)

    def get_pause_ready(self, cmd: PrecopyCommand) -> None:
        """Touch now what the pause will write (see PrecopyCommand): the exchange buffer for the
        largest of the pause's moves on this rank (it walks them one after another), and the target's
        blocks still filling in every layer the pause writes (all but the layers shared with the cache
        in use, where the data already is)."""
        elements = 0
        for move, blocks in zip(cmd.moves, cmd.pause_blocks):
            _, sends, recvs = self._routes(move.transfers)
            heads = sum(t.num_heads for ts in [*sends.values(), *recvs.values()] for t in ts)
            elements = max(elements, heads * self._head_elements(blocks))
        self.pause_buffer = torch.zeros(elements, dtype=self.dtype, device=self.device)
        new_kv = self.target.kv if self.target else None
        if new_kv is None:  # leaving the layout (it may still send) or standby
            return
        group = self.target.topo.coords(self.rank).dp_rank
        filling = cmd.filling[group] if group < len(cmd.filling) else []
        blocks = torch.tensor(filling, dtype=torch.long, device=self.device)
        for layer, cache in new_kv.layers.items():
            if layer not in new_kv.reused:
                cache.index_fill_(0, blocks, 0)

    def commit(self, cmd: CommitCommand) -> Committed:
        """Move the KV left for the pause, then switch, tentatively (see CommitCommand). The commit
        may follow steps still in flight elsewhere: the hidden states this rank sent the next
        stage are taken first (dropping a send under way would lose it)."""
        try:
            _wait_all(self._pending_sends)
        finally:
            self._pending_sends.clear()
        t0 = time.perf_counter()
        allocated = self.migrate_all(cmd.moves, self.pause_buffer)
        self.pause_buffer = None
        answer = Committed(self.rank, cmd.switch_id, migrate_s=time.perf_counter() - t0, allocated_bytes=allocated)
        self.previous = ReplacedLayout(self.layout, self.loaded, torch.get_num_threads())
        use_threads(cmd.threads)
        self.loaded = True
        self.layout = self.target  # no target: standby
        self.target = None
        return answer

    def confirm(self) -> None:
        """Every rank has committed: the switch is final, forget what it replaced (no reply), and
        pack the new layout's weights, now that the pause is over on every rank."""
        left = self.previous and self.previous.layout
        self.previous = None
        if left and (self.layout is None or left.model is not self.layout.model):
            drop_packed(left.model)  # the layers that stay hold their own reference
        if self.layout is not None and self.layout.unpacked:
            self._pack_in_background(self.layout)

    def abort(self) -> Aborted:
        """Drop the prepared layout, and go back to the old one if a commit was not yet confirmed."""
        self.target = None
        self.pause_buffer = None
        if self.previous is not None:
            self.layout, self.loaded = self.previous.layout, self.previous.loaded
            use_threads(self.previous.threads)
            self.previous = None
        if self.layout is not None and self.layout.unpacked:  # packing gave way to the switch given up
            self._pack_in_background(self.layout)
        return Aborted(self.rank)

    def drop_target(self) -> None:
        """Forget the prepared layout only: what the builder made, when its work failed."""
        self.target = None

    def reform(self, cmd: ReformCommand) -> Reformed:
        """Join the world at `cmd.dist_init`, leaving the one a lost peer broke, if any. The
        layout, shard and KV stay (the next Prepare of the same layout reuses them) — the old ones
        when a commit was not confirmed yet (the switch failed in its pause); every group is
        rebuilt. A rendezvous that fails (a member lost meanwhile) leaves this rank in no world,
        ready for the next Reform."""
        self._leave_world()
        self.formation = cmd.formation
        init_world(self.rank, self.pool_size, cmd.dist_init, self.backend)
        self.groups = Groups(self.rank)
        return Reformed(self.rank, cmd.formation)

    def leave(self, cmd: LeaveCommand) -> Left:
        """Leave the broken world before `cmd.formation` forms (see `_leave_world`)."""
        self._leave_world()
        return Left(self.rank, cmd.formation)

    def _leave_world(self) -> None:
        """Leave the world, if in one: go back to the layout in use (see `abort`) and let go of
        every group, so that their connections close now — a peer still blocked in an exchange
        with this rank fails at once and takes its own Leave, instead of waiting out DIST_TIMEOUT.
        (The models keep their weights: the next Prepare builds them anew around new groups.)"""
        self.abort()
        self._pending_sends.clear()
        for layout in (self.layout, self.target, self.previous and self.previous.layout):
            if layout is not None:
                layout.model.ctx.release()
        for model in self._built.values():
            model.ctx.release()
        self._built.clear()
        self.groups = None
        if dist.is_initialized():
            dist.destroy_process_group()
        gc.collect()

    def digest(self, cmd: DigestCommand) -> Digest:
        """Hashes of this rank's KV slices of `cmd.blocks` (none on a standby rank)."""
        return Digest(self.rank, self.kv.digests(cmd.blocks) if self.kv else {})

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
        model = self.model
        ctx: ParallelContext = model.ctx
        self._pending_sends = [w for w in self._pending_sends if not w.is_completed()]
        ctx.begin_step(cmd.step_id)
        if not cmd.seqs:
            return self._idle_step(cmd.step_id, model, ctx, time.perf_counter() - t0)
        batch = self._batch(cmd.seqs, self.kv.block_size)
        t1 = time.perf_counter()
        num_tokens, hidden_size = len(batch.input_ids), self.model_config.hidden_size
        out = None
        failure: Exception | None = None
        try:
            hidden = None if ctx.is_first else ctx.recv_hidden(num_tokens, hidden_size, self.dtype)
            out = model(batch, hidden, self.kv)
        except StepCut:
            pass
        except Exception as exc:
            # A step that fails (a lost tensor peer, say) still passes a cut on: the next stage would
            # wait for this hidden state until the collective timeout, and no Reform would break
            # that wait, as this rank's next command may be a commit sent right behind the cut.
            if ctx.is_last:
                raise
            failure = exc
        if not ctx.is_last:
            try:
                self._pending_sends.append(ctx.send_hidden(out, num_tokens, hidden_size, self.dtype))
            finally:
                if failure is not None:
                    raise failure
            return None
        if out is None:  # every rank of the stage agreed (see ParallelContext.all_reduce); the first answers
            return StepResult(step_id=cmd.step_id, token_ids=[], logprobs=[], parse_s=t1 - t0,
                              cut=True, dp_rank=ctx.dp_rank) if ctx.tp_rank == 0 else None
        logits = ctx.gather_to_first(out)
        if logits is None:
            return None
        tokens, logprobs = sample(logits[:, :self.model_config.vocab_size].float(), cmd.seqs)
        return StepResult(step_id=cmd.step_id, token_ids=tokens, logprobs=logprobs,
                          parse_s=t1 - t0, dp_rank=ctx.dp_rank)

    @staticmethod
    def _idle_step(step_id: int, model: nn.Module, ctx: ParallelContext, parse_s: float) -> StepResult | None:
        """A step with no sequences for this rank's data-parallel group: nothing to compute, but the
        group joins the exchanges between groups (and their cut votes) so the others can run; its
        last stage's first tensor rank answers for the group, with no tokens."""
        cut = False
        if ctx.votes_in_exchange:
            try:
                model.join_exchanges()
            except StepCut:
                cut = True
        if ctx.is_last and ctx.tp_rank == 0:
            return StepResult(step_id=step_id, token_ids=[], logprobs=[], parse_s=parse_s, cut=cut,
                              dp_rank=ctx.dp_rank)
        return None


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
    """One token per row (and its log-probabilities where asked). Greedy rows, the common case,
    take one argmax over the whole batch (sample_row's greedy choice, ties to the lowest id)."""
    greedy = [is_greedy(s.temperature, s.top_k) for s in seqs]
    best = logits.argmax(dim=-1).tolist() if any(greedy) else []
    tokens, logprobs = [], []
    for i, (row, s) in enumerate(zip(logits, seqs)):
        token = best[i] if greedy[i] else sample_row(row, s.temperature, s.top_p, s.top_k, s.seed, s.out_pos)
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


def worker_main(rank: int, pool_size: int, backend: str, cmd_addr: str, result_addr: str,
                beat_addr: str, cut_path: str, model_path: str, weights_path: str, dtype: str, device: str,
                pack_weights: bool = False) -> None:
    """Process entry point (dtype is a torch attribute name such as 'float32'; `weights_path` is the
    checkpoint in the serving dtype, remp.weights.serving_copy, or `model_path` itself): the Worker of
    `rank`, served by a CommandRouter until a ShutdownCommand or until the engine is gone. A failed
    command is reported and the process lives on; a failed start-up is reported and ends it."""
    use_threads(1)
    faulthandler.register(signal.SIGUSR1)  # `kill -USR1 PID` prints every thread's stack: where is it stuck?
    router = CommandRouter(rank, cmd_addr, result_addr, beat_addr)
    router.serve(lambda: Worker(rank, pool_size, backend, model_path, getattr(torch, dtype), device,
                                CutFlags(cut_path, pool_size), weights_path, pack_weights, router.background))


if __name__ == "__main__":
    worker_main(**json.loads(sys.argv[1]))
