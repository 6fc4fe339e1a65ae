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
from typing import AsyncIterator

from remp.config import EngineConfig
from remp.engine.llm_engine import EngineStats, LLMEngine
from remp.engine.outputs import RequestOutput
from remp.engine.sampling import SamplingParams
from remp.reconfig.transaction import ReconfigInProgress, ReconfigResult
from remp.topology import Topology

log = logging.getLogger("remp.engine")


class EngineDeadError(RuntimeError):
    """The engine loop stopped (a worker failed); no request can be served."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
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
        self._thread = threading.Thread(target=self._loop, name="remp-engine", daemon=True)
        self._thread.start()

    @classmethod
    def start(cls, config: EngineConfig) -> "AsyncEngine":
        return cls(LLMEngine(config))

    @property
    def topology(self) -> Topology:
        return self.engine.topology

    @property
    def alive(self) -> bool:
        return self.error is None and self._thread.is_alive()

    def stats(self) -> EngineStats:
        return self.engine.stats()

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
        self._inbox.put(("add", request_id, list(prompt_token_ids), params))
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
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished:
                self._inbox.put(("abort", request_id))

    async def abort(self, request_id: str) -> None:
        self._inbox.put(("abort", request_id))

    async def reconfigure(self, target: Topology) -> ReconfigResult:
        """Switch the layout while serving. Raises TopologyError/ValueError for a target that cannot
        run (nothing changes) and ReconfigInProgress while another switch runs."""
        if self._reconfiguring:
            raise ReconfigInProgress("a layout switch is already running")
        if not self.alive:
            raise EngineDeadError(f"the engine has stopped: {self.error}")
        target.validate(self.model_config, self.config.pool_size)
        self._reconfiguring = True
        try:
            loop = asyncio.get_running_loop()
            done = loop.create_future()
            self._inbox.put(("reconfigure", target, loop, done))
            return await done
        finally:
            self._reconfiguring = False

    def _deliver(self, request_id: str, item) -> None:
        target = self._streams.get(request_id)
        if target is not None:
            loop, q = target
            loop.call_soon_threadsafe(q.put_nowait, item)

    def _pump(self, outputs: list[RequestOutput]) -> None:
        """Deliver outputs, then admit requests that arrived meanwhile (also mid-switch)."""
        for out in outputs:
            self._deliver(out.request_id, out)
        try:
            while True:
                self._handle(self._inbox.get_nowait())
        except queue.Empty:
            pass

    def _reconfigure(self, target: Topology, loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        try:
            result = self.engine.reconfigure(target, self._pump)
        except Exception as exc:  # an invalid target, or a failure the abort could not undo
            loop.call_soon_threadsafe(done.set_exception, exc)
        else:
            loop.call_soon_threadsafe(done.set_result, result)

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
                if not self.engine.has_unfinished():
                    try:
                        self._handle(self._inbox.get(timeout=0.1))
                    except queue.Empty:
                        continue
                self._pump(self.engine.step())
        except BaseException as exc:  # a dead worker ends serving; tell every waiting request why
            log.exception("engine loop failed")
            self.error = exc
            for request_id in list(self._streams):
                self._deliver(request_id, exc)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        self.engine.shutdown()
