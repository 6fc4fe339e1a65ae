"""The synchronous engine core: requests in, one pipeline step at a time, outputs out.

`step()` fills the pipeline (up to pp micro-batches in flight, so every stage works at
once), then waits for the oldest step's tokens and books them: appends tokens, detokenises,
applies stop conditions and frees finished requests' blocks.

With data parallelism (dp > 1) each group has a scheduler of its own — its own running
requests, queue and KV blocks, as each group's workers hold their own KV cache — and a request
goes to the group with the fewest requests when it arrives. A step is one micro-batch per group,
sent together (a group with nothing to run still takes part: its mixture-of-experts layers
exchange tokens with the others).
"""
from __future__ import annotations

import itertools
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

from remp.config import EngineConfig, ModelConfig, resolve_dtype, resolve_pack_weights
from remp.engine.detokenizer import DetokState, Detokenizer
from remp.engine.outputs import RequestMetrics, RequestOutput
from remp.engine.sampling import SamplingParams
from remp.engine.scheduler import ScheduledSeq, Scheduler, Sequence, SeqStatus
from remp.executor.local import LOST_PEER_GRACE_S, LocalExecutor, PoolLostError, WorkerError
from remp.executor.messages import SeqWork, StepCommand
from remp.kv.blocks import BlockManager
from remp.kv.cache import blocks_for_budget
from remp.kv.placement import BlockSpace, Placement, RequestKV
from remp.reconfig.transaction import ReconfigResult, run_transaction
from remp.topology import Topology

log = logging.getLogger("remp.engine")


@dataclass
class EngineStats:
    num_running: int
    num_waiting: int
    kv_usage: float
    num_kv_blocks: int
    num_preemptions: int
    step_count: int
    steps_cut: int  # stopped by a layout switch that wanted its pause (see remp.executor.cut); run again
    control_plane_s: float  # engine + worker time spent building, sending and parsing step commands
    step_wall_s: float  # summed wall time from submit to result
    num_worker_replacements: int


@dataclass
class Recovery:
    """What replacing lost workers cost: the ranks restarted and the requests whose KV went with
    them (they recompute, so their tokens do not change)."""

    replaced_ranks: list[int]
    preempted_request_ids: list[str]
    cause: str  # e.g. "rank 1 exited (code -9)", "rank 2 hung"


# How many times a recovery rebuilds the pool (each try may lose another worker) before giving up.
MAX_RECOVERY_ATTEMPTS = 3


def _cause(executor: LocalExecutor, ranks: list[int]) -> str:
    return ", ".join(f"rank {r} exited (code {executor.procs[r].returncode})"
                     if executor.procs[r].poll() is not None else f"rank {r} hung" for r in ranks)


class LLMEngine:
    def __init__(self, config: EngineConfig):
        from transformers import AutoTokenizer

        self.config = config
        self.model_config = ModelConfig.from_pretrained(config.model)
        topo = config.topology
        topo.validate(self.model_config, config.pool_size)
        self.max_model_len = config.max_model_len or min(self.model_config.max_position_embeddings, 4096)
        if self.max_model_len > self.model_config.max_position_embeddings:
            raise ValueError(f"max_model_len {self.max_model_len} exceeds the model's "
                             f"max_position_embeddings {self.model_config.max_position_embeddings}")
        self.max_num_batched_tokens = max(config.max_num_batched_tokens or 2048, self.max_model_len)
        self.served_model_name = config.served_model_name or config.model
        dtype, why = resolve_dtype(config.dtype, self.model_config, config.device)
        self.dtype = dtype
        self.pack_weights, why_pack = resolve_pack_weights(config.pack_weights, self.dtype, config.device)
        log.info("serving in %s (%s); linear weights %s (%s)", str(self.dtype).removeprefix("torch."), why,
                 "packed for oneDNN" if self.pack_weights else "views of the weight store", why_pack)
        self.tokenizer = AutoTokenizer.from_pretrained(config.model)
        self.detokenizer = Detokenizer(self.tokenizer)
        self.eos_token_ids = set(self.model_config.eos_token_ids)
        if self.tokenizer.eos_token_id is not None:
            self.eos_token_ids.add(self.tokenizer.eos_token_id)
        num_blocks = self.num_blocks_for(topo)
        self.executor = LocalExecutor(config.model, config.pool_size, str(self.dtype).removeprefix("torch."),
                                      config.device, hang_timeout_s=config.worker_hang_timeout_s,
                                      pack_weights=self.pack_weights)
        try:
            self.executor.load(topo, num_blocks, config.block_size, self.threads_for(topo))
        except BaseException:
            self.executor.shutdown()
            raise
        self.schedulers = self._schedulers(topo.dp, num_blocks)
        self._seqs: dict[str, Sequence] = {}
        self._detok: dict[str, DetokState] = {}
        self._batches: dict[int, list[list[ScheduledSeq]]] = {}  # per step, per data-parallel group
        self._submit_times: dict[int, float] = {}
        self._step_ids = itertools.count()
        self._seq_ids = itertools.count()
        self._rng = random.Random(config.seed)
        self.step_count = 0
        self.steps_cut = 0
        self.control_plane_s = 0.0
        self.step_wall_s = 0.0
        self.num_worker_replacements = 0

    def _schedulers(self, dp: int, num_blocks: int) -> list[Scheduler]:
        return [Scheduler(BlockManager(num_blocks, self.config.block_size), self.config.max_num_seqs,
                          self.max_num_batched_tokens) for _ in range(dp)]

    @property
    def scheduler(self) -> Scheduler:
        """The first data-parallel group's scheduler: the only one when dp is 1."""
        return self.schedulers[0]

    def num_blocks_for(self, topo: Topology) -> int:
        cfg = self.config
        num_blocks = cfg.num_kv_blocks or blocks_for_budget(self.model_config, topo, cfg.block_size, self.dtype,
                                                            cfg.kv_cache_space_gb * 2**30)
        if num_blocks * cfg.block_size < self.max_model_len:
            raise ValueError(f"the KV cache holds {num_blocks * cfg.block_size} tokens under {topo}, fewer than "
                             f"max_model_len {self.max_model_len}: raise --kv-cache-space or lower --max-model-len")
        return num_blocks

    def threads_for(self, topo: Topology) -> int:
        return self.config.threads_per_worker or max(1, (os.cpu_count() or 1) // topo.world_size)

    @property
    def topology(self) -> Topology:
        return self.executor.topology

    # requests
    def check_request(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (the API's 400) for a request that cannot run."""
        params.validate()
        if not prompt_token_ids:
            raise ValueError("the prompt is empty")
        vocab = self.model_config.vocab_size
        if any(not 0 <= t < vocab for t in prompt_token_ids):
            raise ValueError(f"prompt token ids must lie in [0, {vocab})")
        if len(prompt_token_ids) + params.max_tokens > self.max_model_len:
            raise ValueError(f"this model's maximum context length is {self.max_model_len} tokens; the request "
                             f"has {len(prompt_token_ids)} prompt tokens and asks for {params.max_tokens} more")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        self.check_request(prompt_token_ids, params)
        if request_id in self._seqs:
            raise ValueError(f"request id {request_id!r} is already running")
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(next(self._seq_ids), request_id, list(prompt_token_ids), params, seed,
                       RequestMetrics(arrival_time or time.monotonic()))
        self._seqs[request_id] = seq
        self._detok[request_id] = self.detokenizer.start(seq.prompt_token_ids)
        # The least loaded data-parallel group takes it (the first of equals).
        seq.group = min(range(len(self.schedulers)), key=lambda d: self.schedulers[d].num_requests)
        self.schedulers[seq.group].add(seq)

    def abort_request(self, request_id: str) -> None:
        seq = self._seqs.pop(request_id, None)
        if seq is not None and seq.status is not SeqStatus.FINISHED:
            self.schedulers[seq.group].finish(seq, "abort")
        self._detok.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return any(s.has_work() for s in self.schedulers) or bool(self.executor.in_flight)

    # stepping
    def _submit(self, groups: list[list[ScheduledSeq]]) -> None:
        t0 = time.perf_counter()
        step_id = next(self._step_ids)
        commands = []
        for items in groups:
            works = []
            for it in items:
                seq, p = it.seq, it.seq.params
                works.append(SeqWork(seq_id=seq.seq_id, token_ids=it.token_ids, start=it.start,
                                     block_table=list(seq.block_ids), temperature=p.temperature, top_p=p.top_p,
                                     top_k=p.top_k, seed=seq.seed, out_pos=len(seq.output_token_ids),
                                     logprobs=p.logprobs))
            commands.append(StepCommand(step_id, works))
        # Booked before it is sent: a send that finds a worker gone still leaves the step in flight,
        # for the recovery to take back.
        self._batches[step_id] = groups
        self._submit_times[step_id] = time.perf_counter()
        self.executor.submit(commands)
        self.control_plane_s += time.perf_counter() - t0

    def step(self, interrupt: Callable[[], bool] | None = None) -> list[RequestOutput]:
        """Fill the pipeline, then book the oldest step's tokens (see `collect` for `interrupt`)."""
        self.fill()
        return self.collect(interrupt) if self.executor.in_flight else []

    def fill(self) -> None:
        """Submit steps until the pipeline holds pp of them or nothing more can be scheduled."""
        pp = self.topology.pp
        while len(self.executor.in_flight) < pp:
            free = pp - len(self.executor.in_flight)
            groups = [scheduler.schedule(free) for scheduler in self.schedulers]
            if not any(groups):
                break
            self._submit(groups)

    def collect(self, interrupt: Callable[[], bool] | None = None) -> list[RequestOutput]:
        """Wait for the oldest step in flight and book its tokens (submits nothing). If
        `interrupt()`, asked while waiting, turns true, return nothing and leave the step in
        flight: the next `step` or `collect` books it."""
        results = self.executor.next_result(interrupt=interrupt)
        if results is None:
            return []
        step_id = results[0].step_id
        self.step_wall_s += time.perf_counter() - self._submit_times.pop(step_id)
        self.control_plane_s += sum(r.parse_s for r in results)
        groups = self._batches.pop(step_id)
        outputs = []
        now = time.monotonic()
        for scheduler, items, result in zip(self.schedulers, groups, results):
            if result.cut:
                for item in items:
                    scheduler.step_done(item, cut=True)
                continue
            for item, token, lps in zip(items, result.token_ids, result.logprobs):
                if scheduler.step_done(item):
                    outputs.append(self._append(item.seq, token, lps, now))
        # A step of several groups may be cut in some and end in others (dense groups stop alone).
        self.steps_cut += any(r.cut for r in results)
        self.step_count += not all(r.cut for r in results)
        return outputs

    def _append(self, seq: Sequence, token: int, lps: list | None, now: float) -> RequestOutput:
        seq.output_token_ids.append(token)
        if lps is not None:
            seq.logprobs.append({int(t): lp for t, lp in lps})
        m = seq.metrics
        if m.first_token_time is None:
            m.first_token_time = now
        m.last_token_time = now
        p = seq.params
        reason = None
        if (token in self.eos_token_ids and not p.ignore_eos) or token in p.stop_token_ids:
            reason = "stop"
        elif len(seq.output_token_ids) >= p.max_tokens or seq.num_tokens >= self.max_model_len:
            reason = "length"
        state = self._detok[seq.request_id]
        text, new_text, hit = self.detokenizer.update(state, seq.output_token_ids, p.stop, reason is not None)
        if hit:
            reason = "stop"
        if reason is not None:
            self.schedulers[seq.group].finish(seq, reason)
            m.finished_time = now
            del self._seqs[seq.request_id], self._detok[seq.request_id]
        return RequestOutput(request_id=seq.request_id, prompt_token_ids=seq.prompt_token_ids,
                             token_ids=list(seq.output_token_ids), text=text, new_text=new_text,
                             new_token_ids=[token], finished=reason is not None, finish_reason=reason,
                             logprobs=list(seq.logprobs) if p.logprobs is not None else None, metrics=m,
                             num_preemptions=seq.num_preemptions)

    def drain(self, on_outputs: Callable[[list[RequestOutput]], None]) -> None:
        """Collect every step in flight, cut or not (submits nothing)."""
        while self.executor.in_flight:
            on_outputs(self.collect())

    # what a layout switch asks of the engine (remp.reconfig.host.SwitchHost)
    @property
    def num_kv_blocks(self) -> int:
        return self.scheduler.blocks.num_blocks

    def pause_admission(self) -> None:
        """Admit no new prompt until `resume_admission`; running requests keep stepping. A switch
        pauses it while it prepares: a prompt admitted then would make the switch wait for its
        prefill (the longest step there is) and would move all its KV in the pause."""
        for scheduler in self.schedulers:
            scheduler.admitting = False

    def resume_admission(self) -> None:
        for scheduler in self.schedulers:
            scheduler.admitting = True

    def num_running(self) -> int:
        return sum(len(scheduler.running) for scheduler in self.schedulers)

    def running_kv(self) -> list[RequestKV]:
        """Every running request's KV blocks (global ids: group g's block b is g * num_kv_blocks + b),
        how many of them are full, and their hand-out counts now. Steps in flight write only past
        `num_computed`, so a full block is not written again unless it is freed and handed out anew,
        which its hand-out count then shows: what lets a switch pre-copy full blocks."""
        space, bs = BlockSpace(self.num_kv_blocks), self.config.block_size
        return [RequestKV(seq.seq_id, seq.request_id, group, tuple(space.to_global(group, b) for b in seq.block_ids),
                          seq.num_computed // bs, tuple(scheduler.blocks.handouts(b) for b in seq.block_ids))
                for group, scheduler in enumerate(self.schedulers) for seq in scheduler.running]

    def preempt_requests(self, keys: list[int]) -> list[str]:
        """Preempt the running requests with these sequence ids, in that order (newest first: each
        goes to the front of its queue, so the oldest ends up first); they recompute later. Returns
        their request ids. No step may be in flight."""
        running = {seq.seq_id: seq for scheduler in self.schedulers for seq in scheduler.running}
        out = []
        for key in keys:
            seq = running[key]
            self.schedulers[seq.group].preempt(seq)
            out.append(seq.request_id)
        return out

    def adopt_placement(self, num_blocks: int, dp: int, placement: Placement) -> None:
        """Take the workers' KV after a switch: `dp` groups of `num_blocks` blocks each, running
        request k in group placement.groups[k] with its block b (global id) at placement.renumber[b].
        Block tables follow, the rest is free, and hand-out counts start over. Waiting requests keep
        their group where it still exists, else go to the least loaded one. No step may be in flight."""
        old, space = self.schedulers, BlockSpace(num_blocks)
        new = self._schedulers(dp, num_blocks) if dp != len(old) else old
        # Oldest first (sequence ids follow arrival); in the queues, preempted requests stay ahead.
        running = sorted((seq for scheduler in old for seq in scheduler.running), key=lambda s: s.seq_id)
        waiting = sorted((seq for scheduler in old for seq in scheduler.waiting),
                         key=lambda s: (s.num_preemptions == 0, s.seq_id))
        used: list[list[int]] = [[] for _ in range(dp)]
        if new is not old:
            new[0].num_preemptions = sum(scheduler.num_preemptions for scheduler in old)
            for scheduler in new:
                scheduler.admitting = old[0].admitting
            for seq in running:
                new[placement.groups[seq.seq_id]].running.append(seq)
            for seq in waiting:
                seq.group = seq.group if seq.group < dp else min(range(dp), key=lambda g: new[g].num_requests)
                new[seq.group].waiting.append(seq)
        source = BlockSpace(self.num_kv_blocks)
        for seq in running:
            blocks = [placement.renumber[source.to_global(seq.group, b)] for b in seq.block_ids]
            seq.group = placement.groups[seq.seq_id]
            seq.block_ids = [space.local(b) for b in blocks]
            used[seq.group] += seq.block_ids
        for group, scheduler in enumerate(new):
            scheduler.blocks = BlockManager(num_blocks, self.config.block_size, used=used[group])
        self.schedulers = new

    def reconfigure(self, target: Topology, on_outputs: Callable[[list[RequestOutput]], None],
                    requested_at: float | None = None) -> ReconfigResult:
        """Switch the layout live (see remp.reconfig.transaction); steps may be in flight.
        `requested_at` (time.perf_counter) is when the switch was asked for, if before this call."""
        return run_transaction(self, target, on_outputs, requested_at=requested_at)

    def recover(self, on_outputs: Callable[[list[RequestOutput]], None]) -> Recovery:
        """Replace every worker that died or hung and serve on at the current layout. If all lost
        ranks were standby, nothing live was on them: steps in flight finish and every request
        keeps its KV. Otherwise the steps in flight are dropped and every running request is
        preempted to recompute (its KV was partly on the lost rank; with several data-parallel
        groups, those of the other groups too: the world is re-formed under all of them). Raises
        WorkerError if the pool cannot be rebuilt."""
        executor, topo = self.executor, self.executor.topology
        failed = executor.failed_ranks()
        cause = _cause(executor, failed)
        executor.kill(failed)
        preempted: list[str] = []
        if any(topo.coords(r) is not None for r in failed):
            preempted = self._drop_kv()
        else:
            self.drain(on_outputs)
        replaced: set[int] = set()
        for attempt in range(1, MAX_RECOVERY_ATTEMPTS + 1):
            try:
                replaced.update(executor.replace())
                executor.load(topo, self.scheduler.blocks.num_blocks, self.config.block_size, self.threads_for(topo))
                break
            except PoolLostError:
                raise
            except WorkerError as exc:  # lost another worker while rebuilding: replace it too
                lost = executor.failed_ranks(wait_s=LOST_PEER_GRACE_S)
                if not lost or attempt == MAX_RECOVERY_ATTEMPTS:
                    raise PoolLostError(f"could not rebuild the worker pool in {attempt} tries; last: {exc}") from exc
                cause += f"; then {_cause(executor, lost)} while replacing"
                executor.kill(lost)
                if any(topo.coords(r) is not None for r in lost) and not preempted:
                    preempted = self._drop_kv()
        if not preempted and any(topo.coords(r) is not None for r in replaced):
            # A serving survivor was lost while the world formed (replace kills one that dies or
            # stays silent): its KV went with it.
            preempted = self._drop_kv()
        self.num_worker_replacements += len(replaced)
        return Recovery(sorted(replaced), preempted, cause)

    def _drop_kv(self) -> list[str]:
        """A serving rank is lost and the KV with it: forget the steps in flight and preempt every
        running request (it recomputes; its tokens do not change). Returns their ids."""
        for groups in self._batches.values():
            for scheduler, items in zip(self.schedulers, groups):
                for item in items:
                    scheduler.step_done(item, cut=True)
        self._batches.clear()
        self._submit_times.clear()
        preempted = []
        for scheduler in self.schedulers:
            for seq in reversed(list(scheduler.running)):
                scheduler.preempt(seq)
                preempted.append(seq.request_id)
        return preempted

    def kv_digests(self, blocks: list[int]) -> dict[str, set[str]]:
        """Hash of every (layer, KV head, block) slice of `blocks` (global ids, as `running_kv`
        gives them), gathered over the ranks holding it (replicated heads give one hash per holder,
        all equal unless something is wrong). Keys are "layer:head:block" with the global id."""
        space, topo = BlockSpace(self.num_kv_blocks), self.topology
        per_group: list[list[int]] = [[] for _ in range(topo.dp)]
        for b in blocks:
            per_group[space.group_of(b)].append(space.local(b))
        out: dict[str, set[str]] = {}
        for rank, digests in self.executor.kv_digests(per_group).items():
            group = topo.coords(rank).dp_rank if topo.coords(rank) else 0
            for key, value in digests.items():
                layer, head, block = key.split(":")
                out.setdefault(f"{layer}:{head}:{space.to_global(group, int(block))}", set()).add(value)
        return out

    def stats(self) -> EngineStats:
        groups = self.schedulers
        return EngineStats(num_running=sum(len(s.running) for s in groups),
                           num_waiting=sum(len(s.waiting) for s in groups),
                           kv_usage=sum(s.blocks.usage for s in groups) / len(groups),
                           num_kv_blocks=sum(s.blocks.num_blocks for s in groups),
                           num_preemptions=sum(s.num_preemptions for s in groups),
                           step_count=self.step_count, steps_cut=self.steps_cut, control_plane_s=self.control_plane_s,
                           step_wall_s=self.step_wall_s, num_worker_replacements=self.num_worker_replacements)

    def shutdown(self) -> None:
        self.executor.shutdown()
