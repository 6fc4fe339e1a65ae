"""The worker pool on this host: one process per rank, driven over ZeroMQ.

Commands go to each worker on its own PUSH socket (reliable, ordered, no slow-joiner
loss as with PUB/SUB); replies and sampled tokens come back on one PULL socket. Sockets
are Unix-domain (ipc://) in a private temporary directory, so nothing listens on the
network. The engine never blocks forever on a worker: every wait polls, checks that all
processes are alive, that each has sent a heartbeat recently (a stopped or wedged process
stops beating, one blocked in a collective on a lost peer does not), and honours a timeout.
A worker that died or hung is replaced by `replace`: the survivors re-form the world group
with a fresh process in the lost rank's place.
"""
from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterable

import torch
import zmq

from remp.executor.cut import CutFlags
from remp.weights.serving_copy import serving_weights
from remp.executor.messages import (FAULT_ENV, AbortCommand, Aborted, CommitCommand, Committed, ConfirmCommand,
                                    Digest, DigestCommand, Heartbeat, KVMoveRows, LeaveCommand, Left, PrecopyCommand,
                                    Precopied, PrepareCommand, Prepared, ReformCommand, Reformed, Reply,
                                    ShutdownCommand, Started, StepCommand, StepResult, WorkerFailed, decode, encode)
from remp.parallel.groups import RENDEZVOUS_TIMEOUT
from remp.topology import Topology


log = logging.getLogger("remp.executor")

# How long a survivor's report of a failure is given to turn out to be a lost peer (see
# `LocalExecutor.failed_ranks`) before it is taken for a failure of its own.
LOST_PEER_GRACE_S = 5.0
# How long a command may wait to be queued for a worker. A live worker's queue always takes it
# (nothing sends it a thousand commands unread); a gone one has no connection left, and a
# blocking send would wait for a reconnection that never comes.
COMMAND_SEND_TIMEOUT_MS = 1000
# How often a wait checks the pool for lost workers, however busy the result socket is.
CHECK_INTERVAL_S = 0.1
# How many worlds `replace` tries to form (fresh processes each time for the ranks lost) before the
# pool is given up (PoolLostError).
MAX_FORMATION_ATTEMPTS = 3
# How long members of a failed rendezvous may take to report it (each gives up after
# RENDEZVOUS_TIMEOUT); one that says nothing by then is taken for hung.
SETTLE_S = RENDEZVOUS_TIMEOUT.total_seconds() + 5.0


class WorkerError(RuntimeError):
    """A worker died, reported an error or did not answer in time."""


class WorkerReportedError(WorkerError):
    """A worker is alive and reported that a command failed."""

    def __init__(self, message: str, reply: WorkerFailed):
        super().__init__(message)
        self.reply = reply


class PoolLostError(WorkerError):
    """The pool could not be rebuilt after lost workers (MAX_FORMATION_ATTEMPTS tries): nothing
    can be served any more."""


def check_built(topo: Topology, answers: dict[int, Prepared]) -> None:
    """Raise WorkerError unless every rank that built something built `topo` (a layout field lost
    on the way to the workers would otherwise serve the wrong layout with the right name)."""
    wrong = {r: a.layout for r, a in answers.items() if not a.standby and a.layout != str(topo)}
    if wrong:
        raise WorkerError(f"asked for {topo}, but {', '.join(f'rank {r} built {name}' for r, name in wrong.items())}")


class LocalExecutor:
    """One worker process per pool rank on this host, the engine's only way to reach them."""

    def __init__(self, model_path: str, pool_size: int, dtype: str, device: str = "cpu",
                 start_timeout_s: float = 180.0, hang_timeout_s: float = 15.0, pack_weights: bool = False):
        self.pool_size = pool_size
        self.hang_timeout_s = hang_timeout_s
        # Served in another dtype than the checkpoint's: converted once, here, into shared memory
        # (remp.weights.serving_copy), so every worker maps the same converted pages.
        self._weights_path, self._weights_copy = serving_weights(model_path, getattr(torch, dtype))
        try:
            self._open(pool_size)
        except BaseException:
            self._remove_weights_copy()
            raise
        self._backend = "nccl" if device.startswith("cuda") else "gloo"
        self._model_path, self._dtype, self._device = model_path, dtype, device
        self._pack_weights = pack_weights
        self._generation = itertools.count()
        self.procs: list[subprocess.Popen] = [None] * pool_size
        self._cmds: list[zmq.Socket] = [None] * pool_size
        self._spawned_at = [0.0] * pool_size
        self._last_beat = [0.0] * pool_size
        self._hung: set[int] = set()
        self._lost: set[int] = set()  # killed, awaiting `replace`: waits no longer watch them
        self._beating: set[int] = set()  # ranks past start-up: their silence means a hang
        self.topology: Topology | None = None
        self.in_flight: deque[int] = deque()
        self._early: dict[tuple[int, int], StepResult] = {}  # by (step id, data-parallel group)
        self._replies: dict[tuple[str, int], Reply] = {}  # by (kind, rank)
        self._checked_at = 0.0  # when the pool was last checked for lost workers
        self._switch_id = 0  # of the switch under way; replies of older (or abandoned) ones are dropped
        self._formation = 0  # of the last world begun (Leave, then Reform); replies of older ones are dropped
        # Seconds from spawning a process to its joining the world, for every process started
        # (the first pool and every replacement): what a recovery is measured against.
        self.startup_s: deque[float] = deque(maxlen=64)
        try:
            self._form(list(range(pool_size)), [], start_timeout_s, os.environ)
        except BaseException:
            self.shutdown()
            raise

    def _open(self, pool_size: int) -> None:
        """The private directory, the cut flags and the sockets workers answer on."""
        self._dir = tempfile.mkdtemp(prefix="remp-")
        os.chmod(self._dir, 0o700)
        self._cut_path = f"{self._dir}/cut"
        self._cut_flags = CutFlags(self._cut_path, pool_size, create=True)
        self._ctx = zmq.Context()
        self._results = self._ctx.socket(zmq.PULL)
        self._result_addr = f"ipc://{self._dir}/results"
        self._results.bind(self._result_addr)
        self._beats = self._ctx.socket(zmq.PULL)
        self._beat_addr = f"ipc://{self._dir}/beats"
        self._beats.bind(self._beat_addr)

    def _remove_weights_copy(self) -> None:
        if self._weights_copy is not None:
            shutil.rmtree(self._weights_copy, ignore_errors=True)
            self._weights_copy = None

    def _new_store(self) -> str:
        """A fresh rendezvous for a (re-)formed world: a file store in the private directory (a TCP
        store would listen on every interface)."""
        return f"file://{self._dir}/store{next(self._generation)}"

    def _spawn(self, rank: int, env: dict[str, str]) -> None:
        """Start the process for `rank` with its own command socket (a new address per process,
        so nothing queued for a lost one reaches its replacement)."""
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.SNDTIMEO, COMMAND_SEND_TIMEOUT_MS)
        addr = f"ipc://{self._dir}/cmd{rank}-{next(self._generation)}"
        sock.bind(addr)
        if self._cmds[rank] is not None:
            self._cmds[rank].close(linger=0)
        self._cmds[rank] = sock
        device = f"cuda:{rank}" if self._device == "cuda" else self._device
        spec = dict(rank=rank, pool_size=self.pool_size, backend=self._backend,
                    cmd_addr=addr, result_addr=self._result_addr, beat_addr=self._beat_addr,
                    cut_path=self._cut_path, model_path=self._model_path, weights_path=self._weights_path,
                    dtype=self._dtype, device=device, pack_weights=self._pack_weights)
        env = {**env, "GLOO_SOCKET_IFNAME": env.get("GLOO_SOCKET_IFNAME", "lo")}
        self._last_beat[rank] = self._spawned_at[rank] = time.monotonic()
        self._beating.discard(rank)
        self._lost.discard(rank)  # a new process: its exit counts from now on
        self._replies = {key: msg for key, msg in self._replies.items() if key[1] != rank}  # the old one's
        self.procs[rank] = subprocess.Popen([sys.executable, "-m", "remp.worker.worker", json.dumps(spec)], env=env)

    def _poll(self, timeout_ms: int):
        """The next message if one arrives within `timeout_ms`, else None; a worker's error report raises."""
        if not self._results.poll(timeout_ms):
            return None
        msg = decode(self._results.recv())
        # A reply that names its switch or its world (see remp.executor.messages) and is from a switch
        # given up (its replies may trail the Aborted ones) or an old world is dropped.
        switch, formation = getattr(msg, "switch", None), getattr(msg, "formation", None)
        if switch not in (None, self._switch_id) or formation not in (None, self._formation):
            return None
        if isinstance(msg, Started) and msg.pid != self.procs[msg.rank].pid:
            return None  # from a process of this rank that died since (its replacement says so itself)
        if isinstance(msg, WorkerFailed):
            raise WorkerReportedError(f"worker {msg.rank} failed: {msg.message}", msg)
        return msg

    def _recv(self, timeout_s: float, interrupt: Callable[[], bool] | None = None):
        """Next message from any worker, or None as soon as `interrupt()` (asked before each
        wait of up to 10 ms) is true; raises WorkerError if a worker dies or hangs, or time runs out."""
        deadline = time.monotonic() + timeout_s
        while interrupt is None or not interrupt():
            # Checked even while messages keep coming: the steps of a small model answer every
            # few ms, and a standby lost meanwhile would go unnoticed until they paused.
            if time.monotonic() - self._checked_at > CHECK_INTERVAL_S:
                self.check_workers()
            if (msg := self._poll(100 if interrupt is None else 10)) is not None:
                return msg
            self.check_workers()
            if time.monotonic() > deadline:
                raise WorkerError(f"no answer from the workers within {timeout_s:.0f} s")
        return None

    def check_workers(self) -> None:
        """Raise WorkerError naming every rank that exited, or that has sent no heartbeat for
        hang_timeout_s since its last beat (a process not beating yet, still importing, is the start
        timeout's business)."""
        dead, silent = self._lost_members()
        if dead:
            raise WorkerError(f"worker process exited: "
                              f"{', '.join(f'rank {r} (exit code {self.procs[r].returncode})' for r in dead)}")
        if silent:
            raise WorkerError(f"worker rank {', '.join(map(str, silent))} sent no heartbeat for "
                              f"{self.hang_timeout_s:.0f} s (hung)")

    def _lost_members(self) -> tuple[list[int], list[int]]:
        """The watched ranks whose process exited, and those silent for hang_timeout_s (filed as
        hung). A beat carries the time it was sent and none is dropped (see
        remp.worker.router._heartbeat), so a rank's last beat is known even when nobody read beats
        for a while: a standby stopped while the steps run on is found as surely as a rank the steps
        wait for."""
        self._checked_at = time.monotonic()
        while self._beats.poll(0):
            beat = decode(self._beats.recv())
            if not isinstance(beat, Heartbeat) or beat.pid != self.procs[beat.rank].pid:
                continue  # a beat of a process of this rank that died since
            self._last_beat[beat.rank] = max(self._last_beat[beat.rank], beat.t)
            if beat.rank not in self._lost:
                self._beating.add(beat.rank)  # beating: from now on its silence counts, even before Started
        dead = [r for r, p in enumerate(self.procs) if r not in self._lost and p is not None and p.poll() is not None]
        now = time.monotonic()
        silent = [r for r in sorted(self._beating - self._lost - set(dead))
                  if now - self._last_beat[r] > self.hang_timeout_s]
        self._hung.update(silent)
        return dead, silent

    def failed_ranks(self, wait_s: float = 0.0) -> list[int]:
        """Ranks whose process exited or was found hung: the ones `replace` restarts. When there
        are none, `wait_s` gives an exit that long to show: a survivor reports a lost peer (its
        connection reset) while the peer's process is still being torn down, not yet reaped."""
        deadline = time.monotonic() + wait_s
        while not (failed := sorted({r for r, p in enumerate(self.procs) if p.poll() is not None} | self._hung)):
            if time.monotonic() >= deadline:
                break
            time.sleep(0.01)
        return failed

    def _take(self, msg) -> None:
        """File a message that is not the one being waited for. A rank that says it has started (or
        re-formed) is past start-up: from now on its silence counts, whether or not a heartbeat of
        it has arrived yet (one stopped right after start-up may never send any)."""
        if isinstance(msg, StepResult):
            self._early[(msg.step_id, msg.dp_rank)] = msg
            return
        self._replies[(msg.kind, msg.rank)] = msg
        if isinstance(msg, (Started, Reformed)):
            self._last_beat[msg.rank] = max(self._last_beat[msg.rank], time.monotonic())
            self._beating.add(msg.rank)

    def has_replies(self, kinds: Iterable[str], ranks: Iterable[int]) -> bool:
        """True once every rank in `ranks` has answered each of `kinds`; never blocks, but raises
        WorkerError for a worker that died or hung."""
        while (msg := self._poll(0)) is not None:
            self._take(msg)
        self.check_workers()
        return all((kind, r) in self._replies for kind in kinds for r in ranks)

    def _wait_for(self, wanted: set[tuple[str, int]], timeout_s: float,
                  raises: Callable[[WorkerFailed], bool] | None = None) -> None:
        """File messages until every (kind, rank) in `wanted` has answered. A worker's error
        report raises — with `raises`, only one it picks (while a world forms, a survivor's late
        report of the step or switch a lost peer broke is passed over)."""
        deadline = time.monotonic() + timeout_s
        while not wanted <= self._replies.keys():
            try:
                self._take(self._recv(max(0.0, deadline - time.monotonic())))
            except WorkerReportedError as exc:
                if raises is None or raises(exc.reply):
                    raise

    def _wait_replies(self, kind: str, ranks: Iterable[int], timeout_s: float) -> dict[int, Reply]:
        ranks = list(ranks)
        self._wait_for({(kind, r) for r in ranks}, timeout_s)
        return {r: self._replies.pop((kind, r)) for r in ranks}

    def _broadcast(self, cmd, ranks=None) -> None:
        """Send `cmd` to every rank of `ranks` (all by default) that takes it; then raise WorkerError
        naming those whose process is gone (found before the engine saw the exit: a survivor's
        report of the lost peer can come first, and the rollback's Abort goes to every rank)."""
        data = encode(cmd)
        gone = []
        for rank in range(self.pool_size) if ranks is None else ranks:
            try:
                self._cmds[rank].send(data)
            except zmq.Again:
                gone.append(rank)
        if gone:
            raise WorkerError(f"worker rank {', '.join(map(str, gone))} took no command for "
                              f"{COMMAND_SEND_TIMEOUT_MS / 1000:.0f} s (its process is gone)")

    # layout changes: prepare -> precopy (both while serving) -> commit (carries the KV left for
    # the pause) -> confirm, or abort
    def prepare(self, topo: Topology, num_blocks: int, block_size: int) -> None:
        """Ask every pool worker to get ready for `topo`; answers arrive while steps go on."""
        self._switch_id += 1
        # A new switch forgets the replies of the last one (committed or given up): those sent in
        # command order are all in by the time it ended; the builder thread's may trail, and
        # the new id tells them apart.
        self._replies = {key: msg for key, msg in self._replies.items()
                         if key[0] not in (Prepared.kind, Precopied.kind, Committed.kind)}
        self._broadcast(PrepareCommand(layout=topo.as_dict(), num_blocks=num_blocks, block_size=block_size,
                                       switch_id=self._switch_id))

    def precopy(self, moves: list[KVMoveRows], filling: list[list[int]], pause_blocks: list[int]) -> None:
        """Ask every pool worker to copy the KV the `moves` carry into the prepared layout once it is
        built, and to get the pause ready for the `filling` blocks and about `pause_blocks` blocks
        per move (see PrecopyCommand); the answers (Precopied) arrive while steps go on."""
        self._broadcast(PrecopyCommand(moves, self._switch_id, filling, pause_blocks))

    def answers(self, kind: str, timeout_s: float) -> dict[int, Reply]:
        """Every pool worker's answer of `kind` (a reply type's `kind`, e.g. "prepared" for
        Prepared), waiting for those not in yet."""
        return self._wait_replies(kind, range(self.pool_size), timeout_s)

    def start_commit(self, threads: int, moves: list[KVMoveRows] | None = None) -> None:
        """Ask every worker to move the live KV not yet in place (`moves`) and switch to the prepared
        layout, in one command. A worker runs it after the steps sent to it before, so it may go out
        with steps still in flight (cut ones, say)."""
        self._broadcast(CommitCommand(threads, self._switch_id, moves or []))

    def finish_commit(self, topo: Topology, timeout_s: float) -> dict[int, Committed]:
        """Every worker's answer to the commit. Once all have answered the
        switch is confirmed (no reply awaited); on a WorkerError before that, the workers that
        did switch go back on `abort` (or when re-formed)."""
        answers = self.answers(Committed.kind, timeout_s)
        # Every worker has switched: the switch is done, whatever happens to one of them from now on
        # (a rank lost before its Confirm is found by the next check and replaced on `topo`).
        self.topology = topo
        with contextlib.suppress(WorkerError):
            self._broadcast(ConfirmCommand())
        return answers

    def abort(self, timeout_s: float) -> None:
        """Drop every worker's prepared layout (a worker that committed already goes back). From
        now on replies of the abandoned switch are dropped on arrival (its id is retired); those
        already filed are forgotten by the next `prepare`."""
        self._switch_id += 1
        self._broadcast(AbortCommand())
        self._wait_replies(Aborted.kind, range(self.pool_size), timeout_s)

    def load(self, topo: Topology, num_blocks: int, block_size: int, threads: int, timeout_s: float = 300.0) -> None:
        """Put an idle pool on `topo` (nothing live to carry over)."""
        assert not self.in_flight, "load() with steps in flight"
        self.prepare(topo, num_blocks, block_size)
        check_built(topo, self.answers(Prepared.kind, timeout_s))
        self.start_commit(threads)
        self.finish_commit(topo, timeout_s)

    def kill(self, ranks: list[int]) -> None:
        """Make sure the processes of `ranks` (dead or hung) are gone — which also breaks any
        survivor's pending exchange with them — and stop watching them until `replace`. A switch
        under way is given up: its id is retired, so the failures its background work reports
        now that a peer is gone (a pre-copy to the lost rank) are dropped, not taken for new ones."""
        self._switch_id += 1
        for rank in ranks:
            if self.procs[rank].poll() is None:
                self.procs[rank].kill()
            self.procs[rank].wait(timeout=10)
            self._lost.add(rank)
            self._beating.discard(rank)

    def _form(self, fresh: list[int], survivors: list[int], timeout_s: float, env) -> None:
        """Start a process for each rank of `fresh` and form a world of them and `survivors`: once
        every fresh one has started (the slow part: imports, config, weight store), every member
        is told to join a new store at the same moment, so the rendezvous only waits on members
        that are up. Raises WorkerError when a member exits, hangs or reports a failure first
        (members still in a failed rendezvous are given SETTLE_S to report it: the next world
        must find them free; one that does not is filed as hung)."""
        self._formation += 1  # the world about to form: Leave, Reform and their answers carry it
        if survivors:
            self._leave(survivors)
        for rank in fresh:
            self._spawn(rank, env)
        try:
            self._wait_for({(Started.kind, r) for r in fresh}, timeout_s, raises=lambda reply: reply.rank in fresh)
        except WorkerError:
            # A fresh process that has not started by now is replaced too, whatever became of it.
            self._hung.update(r for r in fresh
                              if (Started.kind, r) not in self._replies and self.procs[r].poll() is None)
            raise
        members = sorted([*fresh, *survivors])
        deadline, failure, answered = time.monotonic() + timeout_s, None, set()
        try:
            self._broadcast(ReformCommand(self._new_store(), self._formation), members)
        except WorkerError as exc:  # a member is gone: the others are told, and must report before the next try
            failure, deadline = str(exc), time.monotonic() + SETTLE_S
        while len(answered) < len(members):
            try:
                msg = self._poll(100)
            except WorkerReportedError as exc:
                if exc.reply.formation != self._formation:
                    continue  # a survivor's late report of what the lost peer broke
                answered.add(exc.reply.rank)
                if failure is None:
                    failure = str(exc)
                    log.warning("rank %d failed to join world %d: %s", exc.reply.rank, self._formation,
                                exc.reply.traceback[-1500:])
                deadline = min(deadline, time.monotonic() + SETTLE_S)
                continue
            if isinstance(msg, Reformed):
                answered.add(msg.rank)
            if msg is not None:
                self._take(msg)
            dead, silent = self._lost_members()
            if dead or silent:
                answered.update(dead + silent)
                failure = failure or (f"rank {', '.join(map(str, dead + silent))} "
                                      f"{'exited' if dead else 'hung'} while the world formed")
                deadline = min(deadline, time.monotonic() + SETTLE_S)
            if time.monotonic() > deadline:
                late = [r for r in members if r not in answered]
                for rank in late:  # where is it stuck? its stacks go to the server's log
                    with contextlib.suppress(OSError):
                        os.kill(self.procs[rank].pid, signal.SIGUSR1)
                if late:
                    time.sleep(0.5)  # let them finish printing before they are killed
                self._hung.update(late)
                failure = failure or f"no answer from rank {', '.join(map(str, late))} while the world formed"
                break
        if failure is not None:
            log.warning("forming the world of ranks %s failed: %s (answered: %s)", members, failure, sorted(answered))
            raise WorkerError(failure)
        now = time.monotonic()
        self.startup_s.extend(now - self._spawned_at[r] for r in fresh)
        for rank in members:
            self._replies.pop((Started.kind, rank), None)
            self._replies.pop((Reformed.kind, rank), None)

    def _leave(self, survivors: list[int]) -> None:
        """Have every survivor leave the broken world (LeaveCommand) before a new one forms. One
        that cannot answer within hang_timeout_s is stuck — in an exchange with a peer that is
        itself stuck, say — and is filed as hung (WorkerError): it is replaced rather than left
        to make the new world's rendezvous wait for it."""
        with contextlib.suppress(WorkerError):  # a gone survivor is found below
            self._broadcast(LeaveCommand(self._formation), survivors)
        deadline = time.monotonic() + self.hang_timeout_s
        left: set[int] = set()
        while len(left) < len(survivors) and time.monotonic() < deadline:
            try:
                msg = self._poll(50)
            except WorkerReportedError as exc:
                if exc.reply.formation == self._formation:
                    left.add(exc.reply.rank)  # it failed to tear the old world down; the Reform will say more
                continue
            if isinstance(msg, Left):
                left.add(msg.rank)
            elif msg is not None:
                self._take(msg)
            dead, silent = self._lost_members()
            if dead or silent:
                raise WorkerError(f"rank {', '.join(map(str, dead + silent))} "
                                  f"{'exited' if dead else 'hung'} while leaving the broken world")
        stuck = [r for r in survivors if r not in left]
        if stuck:
            self._hung.update(stuck)
            raise WorkerError(f"rank {', '.join(map(str, stuck))} did not leave the broken world within "
                              f"{self.hang_timeout_s:.0f} s (stuck)")

    def replace(self, timeout_s: float = 300.0) -> list[int]:
        """Have every survivor leave the broken world group and meet, in a new one, a fresh process
        for each rank lost to `kill`; returns those ranks. A try that fails (a replacement that
        dies starting up, a member lost while the world forms) is followed by another, with fresh
        processes for the ranks lost by then, up to MAX_FORMATION_ATTEMPTS; then PoolLostError.
        The survivors keep their layout, shards and KV but no groups: `load` the layout again to
        rebuild them. Steps still in flight are forgotten; the caller has booked or dropped them."""
        env = {k: v for k, v in os.environ.items() if k != FAULT_ENV}  # a replacement runs clean
        replaced: list[int] = []
        for attempt in range(1, MAX_FORMATION_ATTEMPTS + 1):
            ranks = sorted(self._lost)
            replaced = sorted({*replaced, *ranks})
            self.in_flight.clear()
            self._hung.clear()
            try:
                self._form(ranks, [r for r in range(self.pool_size) if r not in ranks], timeout_s, env)
                break
            except WorkerError as exc:
                failed = self.failed_ranks(wait_s=LOST_PEER_GRACE_S)
                if attempt == MAX_FORMATION_ATTEMPTS:
                    raise PoolLostError(f"could not rebuild the worker pool in {attempt} tries; last: {exc}") from exc
                self.kill(failed)
        self._lost.clear()
        self._replies.clear()
        self._early.clear()
        return replaced

    def kv_digests(self, blocks: list[list[int]], timeout_s: float = 60.0) -> dict[int, dict[str, str]]:
        """Per rank, sha1 of each (layer, KV head, block) slice it holds of blocks[g] (ids in the
        cache of data-parallel group g, its group)."""
        topo = self.topology
        for rank in range(self.pool_size):
            coords = topo.coords(rank)
            self._broadcast(DigestCommand(blocks[coords.dp_rank] if coords else []), [rank])
        return {r: answer.digests for r, answer in self.answers(Digest.kind, timeout_s).items()}

    def cut(self) -> None:
        """Stop every step in flight at its next check (remp.executor.cut); each comes back cut
        (its result has `cut` set and no tokens) unless it ended first."""
        if self.in_flight:
            self._cut_flags.cut(self.in_flight[-1], range(self.topology.world_size))

    def submit(self, groups: list[StepCommand]) -> None:
        """Send one step: groups[d] to every rank of data-parallel group d (all with one step id).
        Every group gets its part before a rank that is gone is reported (the others would wait in
        the step's exchanges between groups for one that never came)."""
        topo, failure = self.topology, None
        for d, cmd in enumerate(groups):
            try:
                self._broadcast(cmd, [topo.rank(s, t, d) for s in range(topo.pp) for t in range(topo.tp)])
            except WorkerError as exc:
                failure = failure or exc
        self.in_flight.append(groups[0].step_id)
        if failure is not None:
            raise failure

    def next_result(self, timeout_s: float = 600.0,
                    interrupt: Callable[[], bool] | None = None) -> list[StepResult] | None:
        """The results of the oldest step in flight, one per data-parallel group in group order
        (steps complete in submission order); None, with the step still in flight, if
        `interrupt()` turned true first."""
        step_id, dp = self.in_flight[0], self.topology.dp
        keys = [(step_id, d) for d in range(dp)]

        def complete() -> bool:
            return all(key in self._early for key in keys)

        # `interrupt` may file the results itself (has_replies files every message that is in).
        stop = None if interrupt is None else (lambda: complete() or interrupt())
        while not complete():
            msg = self._recv(timeout_s, stop)
            if msg is not None:
                self._take(msg)
            elif not complete():
                return None
        self.in_flight.popleft()
        return [self._early.pop(key) for key in keys]

    def shutdown(self) -> None:
        try:
            data = encode(ShutdownCommand())
            live = [(p, c) for p, c in zip(self.procs, self._cmds) if p is not None]
            for proc, sock in live:
                if proc.poll() is None:
                    try:
                        sock.send(data, zmq.NOBLOCK)
                    except zmq.ZMQError:
                        pass
            for proc, _ in live:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=5)
            for sock in self._cmds:
                if sock is not None:
                    sock.close(linger=0)
            self._results.close(linger=0)
            self._beats.close(linger=0)
            self._cut_flags.close()
            self._ctx.term()
            shutil.rmtree(self._dir, ignore_errors=True)
        finally:
            self._remove_weights_copy()
