"""The command router of a worker process: its sockets, its threads, and which thread runs each
command. The work itself is remp.worker.worker.Worker's.

Four threads:
- the receiver owns the command socket. It starts the work done beside the steps (Prepare,
  Precopy) on the builder the moment it arrives — not behind the steps already queued for this
  rank (a pipeline stage has up to pp of them) — and hands every other command to the main
  thread in order, together with the background work submitted before it: a control command
  acts on what the builder made, so the main thread waits for that work first.
- the builder (one thread, see remp.worker.threads.background_pool) builds targets and pre-copies
  KV, and answers on a socket of its own the moment it is done, not after the step under way.
- the main thread runs the steps and the control commands (Commit, Confirm, Abort, Reform, Leave,
  Digest) in the order they came.
- the heartbeat thread beats on a socket of its own while the process runs: a worker blocked in
  a collective keeps beating, one that is stopped or wedged does not, which is how the engine
  tells them apart.

A failed command is reported (WorkerFailed) and the process lives on: the failure may be a lost
peer, after which the engine re-forms the world (Reform) and this rank serves again. A failed
start-up is reported and ends the process. The process ends at a ShutdownCommand, or when its
parent (the engine) is gone.
"""
from __future__ import annotations

import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import Executor, Future, wait
from typing import TYPE_CHECKING, Any

import torch.distributed as dist
import zmq

from remp.executor.messages import (AbortCommand, CommitCommand, ConfirmCommand, DigestCommand, Heartbeat,
                                    LeaveCommand, PrecopyCommand, PrepareCommand, ReformCommand, Reply,
                                    ShutdownCommand, Started, StepCommand, WorkerFailed, decode, encode)
from remp.worker.threads import background_pool

if TYPE_CHECKING:
    from remp.worker.worker import Worker

HEARTBEAT_INTERVAL_S = 0.5
# How long the receiver waits for a command before it checks that its parent is still there.
PARENT_CHECK_MS = 1000

Handler = Callable[[Any], Reply | None]


class CommandRouter:
    """Routes one worker process's commands to its Worker (see the module's docstring)."""

    def __init__(self, rank: int, cmd_addr: str, result_addr: str, beat_addr: str):
        self.rank = rank
        self._parent = os.getppid()
        self._ctx = zmq.Context()
        self._cmds = self._ctx.socket(zmq.PULL)  # the receiver's
        self._cmds.connect(cmd_addr)
        self._results = self._ctx.socket(zmq.PUSH)  # the main thread's
        self._results.setsockopt(zmq.LINGER, 1000)
        self._results.connect(result_addr)
        # Beating from now on: the engine watches a rank from its first beat, start-up included.
        self._stop_beating = threading.Event()
        self._beats = threading.Thread(target=_heartbeat, args=(self._ctx, beat_addr, rank, self._stop_beating),
                                       name="remp-heartbeat", daemon=True)
        self._beats.start()
        self._builder = background_pool()
        self._builder_out = self._ctx.socket(zmq.PUSH)  # the builder thread's
        self._builder_out.setsockopt(zmq.LINGER, 1000)
        self._builder_out.connect(result_addr)
        # Commands for the main thread, each with the background work submitted before it (or an
        # exception of the receiver's, which the main thread raises).
        self._inbox: queue.SimpleQueue[tuple[object, Future | None]] = queue.SimpleQueue()
        self._stop_receiving = threading.Event()  # set when serving ends, whatever ended it
        self._receiver = threading.Thread(target=self._receive, name="remp-commands", daemon=True)
        self._newest_formation = 0  # of the newest Reform received (written by the receiver)
        self._worker: Worker | None = None
        self._beside_steps: dict[type, Handler] = {}  # run on the builder
        self._in_order: dict[type, Handler] = {}  # run on the main thread, after the steps sent before

    @property
    def background(self) -> Executor:
        """The builder thread, for work the Worker starts itself (packing weights after a switch):
        it runs before any Prepare or Precopy received after it was submitted."""
        return self._builder

    def serve(self, make_worker: Callable[[], Worker]) -> None:
        """Make the Worker (config and weight store: the slow part of start-up), say Started, and
        route commands to it until a ShutdownCommand or the parent's exit; then close everything.
        The world is joined at the engine's first Reform, sent once every member has said
        Started — so a rendezvous only ever waits on members that are up."""
        try:
            worker = self._worker = make_worker()
            self._beside_steps = {PrepareCommand: worker.prepare, PrecopyCommand: worker.precopy}
            self._in_order = {CommitCommand: worker.commit, ConfirmCommand: lambda _: worker.confirm(),
                              AbortCommand: lambda _: worker.abort(), ReformCommand: worker.reform,
                              LeaveCommand: worker.leave, DigestCommand: worker.digest}
            self._receiver.start()
            self._reply(Started(self.rank, os.getpid()))
            while True:
                msg, building = self._inbox.get()
                if isinstance(msg, BaseException):
                    raise msg
                if isinstance(msg, ShutdownCommand):
                    break
                if isinstance(msg, StepCommand):
                    self._step(msg)
                else:
                    self._control(msg, building)
        except Exception as exc:  # a failed start-up (or a broken command socket): report, then die
            self._reply(self._failure(exc))
            raise
        finally:
            self._close()

    def _receive(self) -> None:
        """The receiver thread: see the module's docstring."""
        building: Future | None = None
        try:
            while not self._stop_receiving.is_set():
                if not self._cmds.poll(PARENT_CHECK_MS):
                    if os.getppid() != self._parent:
                        self._inbox.put((ShutdownCommand(), None))
                        return
                    continue
                msg = decode(self._cmds.recv())
                if type(msg) in self._beside_steps:
                    if isinstance(msg, PrepareCommand):
                        self._worker.switch_waiting.set()  # background packing gives way (Worker)
                    building = self._builder.submit(self._run_beside_steps, self._beside_steps[type(msg)], msg)
                elif isinstance(msg, StepCommand):
                    self._inbox.put((msg, None))
                else:
                    if isinstance(msg, ReformCommand):
                        self._newest_formation = max(self._newest_formation, msg.formation)
                    self._inbox.put((msg, building))
                    building = None
                    if isinstance(msg, ShutdownCommand):
                        return
        except BaseException as exc:  # the main thread reports it and stops
            self._inbox.put((exc, None))

    def _run_beside_steps(self, work: Handler, cmd: PrepareCommand | PrecopyCommand) -> None:
        """On the builder thread: run `work` and answer at once, on the builder's socket."""
        try:
            answer = work(cmd)
        except Exception as exc:
            # Drop only what the builder made: the layout in use (and one committed but not yet
            # confirmed, whose Confirm may still wait in the main thread's inbox) is the main
            # thread's, and an Abort from the engine restores it there.
            self._worker.drop_target()
            answer = self._failure(exc, cmd, switch=cmd.switch_id)
        self._builder_out.send(encode(answer))

    def _step(self, cmd: StepCommand) -> None:
        """Run a step; the rank that sampled its tokens (or saw it cut) sends the result."""
        try:
            result = self._worker.step(cmd)
        except Exception as exc:
            self._reply(self._failure(exc, cmd, formation=self._worker.formation))
            return
        if result is not None:
            self._results.send(encode(result))

    def _control(self, cmd: object, building: Future | None) -> None:
        """Run a control command once the background work submitted before it is done. A Reform
        for a world older than the newest one asked for is skipped: the engine gave it up, and
        this rank joins the newer one instead. A failure drops the prepared state (`abort`) and
        is tagged with the world it happened in — for a Reform or Leave, the world it was about —
        so that one of a world since re-formed is dropped; a commit's also with its switch, so
        that one of a switch given up for a lost peer is dropped."""
        if building is not None:
            wait([building])
        if isinstance(cmd, ReformCommand) and cmd.formation < self._newest_formation:
            return
        worker = self._worker
        try:
            handler = self._in_order.get(type(cmd))
            if handler is None:
                raise TypeError(f"unknown command {type(cmd).__name__}")
            answer = handler(cmd)
        except Exception as exc:
            worker.abort()
            formation = cmd.formation if isinstance(cmd, (ReformCommand, LeaveCommand)) else worker.formation
            switch = cmd.switch_id if isinstance(cmd, CommitCommand) else None
            self._reply(self._failure(exc, cmd, formation=formation, switch=switch))
            return
        if answer is not None:
            self._reply(answer)

    def _reply(self, reply: Reply) -> None:
        """Answer on the main thread's socket."""
        self._results.send(encode(reply))

    def _failure(self, exc: Exception, cmd: object = None, formation: int | None = None,
                 switch: int | None = None) -> WorkerFailed:
        """The report of `exc`, being handled now, raised by `cmd` (None: by the start-up)."""
        doing = f"{type(cmd).__name__}: " if cmd is not None else ""
        return WorkerFailed(rank=self.rank, message=f"{doing}{type(exc).__name__}: {exc}",
                            traceback=traceback.format_exc(), formation=formation, switch=switch)

    def _close(self) -> None:
        """Stop every thread (the builder after its work under way), leave the world, close the sockets."""
        self._stop_beating.set()
        self._beats.join()
        self._stop_receiving.set()
        if self._receiver.is_alive():
            self._receiver.join()
        self._builder.shutdown(wait=True)
        self._builder_out.close()
        if dist.is_initialized():
            dist.destroy_process_group()
        self._results.close()
        self._cmds.close(linger=0)
        self._ctx.term()


def _heartbeat(ctx: zmq.Context, addr: str, rank: int, stop: threading.Event) -> None:
    """The heartbeat thread: a Heartbeat every HEARTBEAT_INTERVAL_S until `stop` is set."""
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
                sock.send(encode(Heartbeat(rank=rank, t=time.monotonic(), pid=pid)), zmq.NOBLOCK)
            except zmq.Again:  # nobody is draining beats right now; a fresh one follows
                pass
            if stop.wait(HEARTBEAT_INTERVAL_S):
                break
    finally:
        sock.close()  # an open socket would block ctx.term() at exit
