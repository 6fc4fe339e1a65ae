"""The engine behind the HTTP server.

The synchronous `LLMEngine` runs on its own thread, stepping while there is work and
sleeping on a queue when there is none; coroutines hand requests in through that queue
and receive each step's `RequestOutput`s on a per-request asyncio queue. Workers run in
separate processes, so this thread spends its time waiting on sockets, not holding the GIL.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import AsyncIterator

from remp.config import EngineConfig
from remp.engine.llm_engine import EngineStats, LLMEngine
from remp.engine.outputs import RequestOutput
from remp.engine.sampling import SamplingParams
from remp.executor.local import LOST_PEER_GRACE_S, PoolLostError, WorkerError
from remp.policy.stats import LoadTracker
from remp.reconfig.transaction import ReconfigInProgress, ReconfigResult
from remp.topology import Topology

log = logging.getLogger("remp.engine")


class EngineDeadError(RuntimeError):
    """The engine loop stopped (a worker failed); no request can be served."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine, load_window_s: float = 30.0):
        self.engine = engine
        # Arrivals and finishes over a sliding window: what --auto-reconfigure decides from.
        # Touched only on the event loop.
        self.load = LoadTracker(load_window_s, start=time.monotonic())
        self.config = engine.config
        self.model_config = engine.model_config
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.served_model_name = engine.served_model_name
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self._reconfiguring = False
        self._deferred: list[tuple] = []  # switch requests that arrived during a switch
        # Liveness, read by /health: when the engine thread last made progress (a step booked, an
        # idle turn of its loop), and since when a switch or a recovery has been running.
        self.progress_at = time.monotonic()
        self.switch_since: float | None = None
        self.recovery_since: float | None = None
        self._thread = threading.Thread(target=self._loop, name="remp-engine", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, config: EngineConfig, load_window_s: float = 30.0) -> "AsyncEngine":
        return cls(LLMEngine(config), load_window_s)

    @property
    def topology(self) -> Topology:
        return self.engine.topology

    @property
    def alive(self) -> bool:
        """False once the engine loop stopped: a lost worker it could not replace, or shutdown."""
        return self.error is None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self.engine.stats()

    def stalled(self, bound_s: float) -> str | None:
        """Why the engine is not serving, or None while it is: it stopped, or for more than
        `bound_s` it has booked no step and not come round its loop, or a switch or a recovery has
        been running (each of its waits is bounded on its own; this bounds them all)."""
        if not self.alive:
            return f"the engine has stopped: {self.error}"
        now = time.monotonic()
        for what, since in (("a layout switch", self.switch_since), ("replacing a lost worker", self.recovery_since),
                            ("the engine loop made no progress", self.progress_at)):
            if since is not None and now - since > bound_s:
                return f"{what} for {now - since:.0f} s (bound {bound_s:.0f} s)"
        return None

    def workers(self) -> list[dict]:
        """Each pool rank's process id and role, and how long that process took to start."""
        executor, topo = self.engine.executor, self.engine.topology
        return [{"rank": rank, "pid": proc.pid if proc is not None else None,
                 "role": "active" if topo is not None and topo.coords(rank) is not None else "standby"}
                for rank, proc in enumerate(list(executor.procs))]

    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        """Stream one request's outputs. Raises ValueError before the first output for a request
        that cannot run; stopping the iteration early aborts the request."""
        if not self.alive:
            raise EngineDeadError(f"the engine has stopped: {self.error}")
        self.engine.check_request(prompt_token_ids, params)
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already running")
        q: asyncio.Queue = asyncio.Queue()
        self._streams[request_id] = (asyncio.get_running_loop(), q)
        if not self.alive:  # died between the check above and registering: nobody would answer
            self._streams.pop(request_id)
            raise EngineDeadError(f"the engine has stopped: {self.error}")
        self._inbox.put(("add", request_id, list(prompt_token_ids), params))
        self.load.on_arrival(time.monotonic(), len(prompt_token_ids), params.max_tokens)
        finished = False
        try:
            while True:
                out = await q.get()
                if isinstance(out, ValueError):
                    raise out
                if isinstance(out, BaseException):
                    raise EngineDeadError(f"the engine has stopped: {out}") from out
                yield out
                if out.finished:
                    finished = True
                    self.load.on_finish(time.monotonic(), len(out.token_ids))
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))

    async def reconfigure(self, target: Topology) -> ReconfigResult:
        """Switch the layout while serving. Raises TopologyError/ValueError for a target that cannot
        run (nothing changes) and ReconfigInProgress while another switch runs."""
        if self._reconfiguring:
            raise ReconfigInProgress("a layout switch is already running")
        if not self.alive:
            raise EngineDeadError(f"the engine has stopped: {self.error}")
        target.validate(self.model_config, self.config.pool_size)
        # Cleared by the engine thread when the switch has run, not when this coroutine ends:
        # a caller that goes away must not let a second switch start under the first.
        self._reconfiguring = True
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        self._inbox.put(("reconfigure", target, loop, done, time.perf_counter()))
        return await asyncio.shield(done)

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _pump(self, outputs: list[RequestOutput]) -> None:
        """Deliver outputs, then admit requests (and aborts) that arrived meanwhile — also in the
        middle of a switch; a switch request waits for the loop, never nests in another."""
        if outputs:
            self.progress_at = time.monotonic()
        for out in outputs:
            self._deliver(out.request_id, out)
        try:
            while True:
                msg = self._inbox.get_nowait()
                if msg[0] == "reconfigure":
                    self._deferred.append(msg)
                else:
                    self._handle(msg)
        except queue.Empty:
            pass

    def _switch_waiting(self) -> bool:
        """Asked every few ms while a step runs: take in what arrived, and say whether a switch now
        waits. It then starts at once, its preparation beside the step under way, rather than after
        that step (which the switch would otherwise wait out and then also wait for the next one)."""
        self._pump([])
        return bool(self._deferred)

    def _reconfigure(self, target: Topology, loop: asyncio.AbstractEventLoop, done: asyncio.Future,
                     requested_at: float) -> None:
        self.switch_since = time.monotonic()
        try:
            outcome = (done.set_result, self.engine.reconfigure(target, self._pump, requested_at))
        except WorkerError as exc:  # the abort could not undo the switch: the pool is in doubt
            loop.call_soon_threadsafe(self._settle, done, done.set_exception, exc)
            raise  # to the loop, which replaces a lost worker or, with none lost, stops serving
        except Exception as exc:  # an invalid target: nothing changed
            outcome = (done.set_exception, exc)
        finally:
            self.switch_since = None
            self.progress_at = time.monotonic()
        loop.call_soon_threadsafe(self._settle, done, *outcome)

    def _settle(self, done: asyncio.Future, setter, value) -> None:
        """On the event loop: the switch is over; hand its result to a caller still waiting."""
        self._reconfiguring = False
        if not done.cancelled():
            setter(value)

    def _handle(self, msg: tuple) -> None:
        if msg[0] == "reconfigure":
            self._reconfigure(*msg[1:])
        elif msg[0] == "add":
            _, request_id, prompt, params = msg
            try:
                self.engine.add_request(request_id, prompt, params)
            except ValueError as exc:
                self._deliver(request_id, exc)
        elif msg[0] == "abort":
            self.engine.abort_request(msg[1])

    def _loop(self) -> None:
        try:
            while not self._stop.is_set():
                self.progress_at = time.monotonic()
                try:
                    while self._deferred:
                        self._handle(self._deferred.pop(0))
                    if not self.engine.has_unfinished():
                        # Watch the pool while idle too: a worker lost now is replaced before a
                        # request needs it.
                        self.engine.executor.check_workers()
                        try:
                            self._handle(self._inbox.get(timeout=0.1))
                        except queue.Empty:
                            continue
                    self._pump(self.engine.step(interrupt=self._switch_waiting))
                except PoolLostError:
                    raise
                except WorkerError:
                    if not self.engine.executor.failed_ranks(wait_s=LOST_PEER_GRACE_S):
                        raise  # a worker reported a failure of its own: nothing to replace
                    log.exception("lost a worker; replacing it")
                    self.recovery_since = time.monotonic()
                    try:
                        recovery = self._recover()
                    finally:
                        self.recovery_since = None
                    log.warning("replaced worker rank %s; %d running requests recompute",
                                recovery.replaced_ranks, len(recovery.preempted_request_ids))
        except BaseException as exc:  # a worker that cannot be replaced ends serving; tell everyone why
            log.exception("engine loop failed")
            self.error = exc
            self._fail_all(exc)

    def _recover(self):
        """Replace the lost workers; if another is lost on the way (while the steps in flight of a
        lost standby are collected, say), recover again. PoolLostError ends it."""
        while True:
            try:
                return self.engine.recover(self._pump)
            except PoolLostError:
                raise
            except WorkerError:
                if not self.engine.executor.failed_ranks(wait_s=LOST_PEER_GRACE_S):
                    raise
                log.exception("lost another worker while replacing one; replacing it too")

    def _fail_all(self, exc: BaseException) -> None:
        """Fail every open stream and every queued switch, so no caller waits forever."""
        pending = self._deferred
        try:
            while True:
                pending.append(self._inbox.get_nowait())
        except queue.Empty:
            pass
        for msg in pending:
            if msg[0] == "reconfigure":
                _, _, loop, done, _ = msg
                loop.call_soon_threadsafe(self._settle, done, done.set_exception, EngineDeadError(str(exc)))
        for request_id in list(self._streams):
            self._deliver(request_id, exc)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()
