"""The worker pool on this host: one process per rank, driven over ZeroMQ.

Commands go to each worker on its own PUSH socket (reliable, ordered, no slow-joiner
loss as with PUB/SUB); replies and sampled tokens come back on one PULL socket. Sockets
are Unix-domain (ipc://) in a private temporary directory, so nothing listens on the
network. The engine never blocks forever on a worker: every wait polls, checks that all
processes are alive and honours a timeout.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable

import zmq

from remp.executor.messages import (AbortCommand, CommitCommand, DigestCommand, MigrateCommand, PrepareCommand,
                                    ShutdownCommand, StepCommand, StepResult, WorkerReply, decode, encode)
from remp.topology import Topology


class WorkerError(RuntimeError):
    """A worker died, reported an error or did not answer in time."""


class LocalExecutor:
    """One worker process per pool rank on this host, the engine's only way to reach them."""

    def __init__(self, model_path: str, pool_size: int, dtype: str, device: str = "cpu",
                 start_timeout_s: float = 180.0):
        self.pool_size = pool_size
        self._dir = tempfile.mkdtemp(prefix="remp-")
        os.chmod(self._dir, 0o700)
        self._ctx = zmq.Context()
        self._results = self._ctx.socket(zmq.PULL)
        result_addr = f"ipc://{self._dir}/results"
        self._results.bind(result_addr)
        self._cmds = []
        backend = "nccl" if device.startswith("cuda") else "gloo"
        # A file store in the private directory: a TCP store would listen on every interface.
        dist_init = f"file://{self._dir}/store"
        env = {**os.environ, "GLOO_SOCKET_IFNAME": os.environ.get("GLOO_SOCKET_IFNAME", "lo")}
        self.procs: list[subprocess.Popen] = []
        for rank in range(pool_size):
            sock = self._ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 0)
            addr = f"ipc://{self._dir}/cmd{rank}"
            sock.bind(addr)
            self._cmds.append(sock)
            worker_device = f"cuda:{rank}" if device == "cuda" else device
            spec = dict(rank=rank, pool_size=pool_size, dist_init=dist_init, backend=backend, cmd_addr=addr,
                        result_addr=result_addr, model_path=model_path, dtype=dtype, device=worker_device)
            self.procs.append(subprocess.Popen([sys.executable, "-m", "remp.worker.worker", json.dumps(spec)], env=env))
        self.topology: Topology | None = None
        self.in_flight: deque[int] = deque()
        self._early: dict[int, StepResult] = {}
        self._replies: dict[tuple[str, int], WorkerReply] = {}
        try:
            self._wait_replies("ready", range(pool_size), start_timeout_s)
        except BaseException:
            self.shutdown()
            raise

    def _poll(self, timeout_ms: int):
        """The next message if one arrives within `timeout_ms`, else None; a worker's error report raises."""
        if not self._results.poll(timeout_ms):
            return None
        msg = decode(self._results.recv())
        if isinstance(msg, WorkerReply) and msg.kind == "error":
            raise WorkerError(f"worker {msg.rank} failed: {msg.message}")
        return msg

    def _recv(self, timeout_s: float):
        """Next message from any worker; raises WorkerError if a worker dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        while (msg := self._poll(100)) is None:
            dead = [f"rank {r} (exit code {p.returncode})" for r, p in enumerate(self.procs) if p.poll() is not None]
            if dead:
                raise WorkerError(f"worker process exited: {', '.join(dead)}")
            if time.monotonic() > deadline:
                raise WorkerError(f"no answer from the workers within {timeout_s:.0f} s")
        return msg

    def _take(self, msg) -> None:
        """File a message that is not the one being waited for."""
        if isinstance(msg, StepResult):
            self._early[msg.step_id] = msg
        else:
            self._replies[(msg.kind, msg.rank)] = msg

    def has_replies(self, kind: str, ranks: Iterable[int]) -> bool:
        """True once every rank in `ranks` has answered `kind`; never blocks."""
        while (msg := self._poll(0)) is not None:
            self._take(msg)
        return all((kind, r) in self._replies for r in ranks)

    def _wait_replies(self, kind: str, ranks: Iterable[int], timeout_s: float) -> dict[int, WorkerReply]:
        ranks = list(ranks)
        deadline = time.monotonic() + timeout_s
        while not all((kind, r) in self._replies for r in ranks):
            self._take(self._recv(max(0.0, deadline - time.monotonic())))
        return {r: self._replies.pop((kind, r)) for r in ranks}

    def _broadcast(self, cmd, ranks=None) -> None:
        data = encode(cmd)
        for rank in range(self.pool_size) if ranks is None else ranks:
            self._cmds[rank].send(data)

    # layout changes: prepare (while serving) -> migrate -> commit, or abort
    def prepare(self, topo: Topology, num_blocks: int, block_size: int) -> None:
        """Ask every pool worker to get ready for `topo`; answers arrive while steps go on."""
        self._broadcast(PrepareCommand(tp=topo.tp, pp=topo.pp, num_blocks=num_blocks, block_size=block_size))

    def wait_prepared(self, timeout_s: float) -> dict[int, dict]:
        return {r: m.info for r, m in self._wait_replies("prepared", range(self.pool_size), timeout_s).items()}

    def migrate(self, transfers: list[list[int]], src_blocks: list[int], dst_blocks: list[int],
                timeout_s: float) -> dict[int, dict]:
        assert not self.in_flight, "migrate() with steps in flight"
        self._broadcast(MigrateCommand(transfers, src_blocks, dst_blocks))
        return {r: m.info for r, m in self._wait_replies("migrated", range(self.pool_size), timeout_s).items()}

    def commit(self, topo: Topology, threads: int, timeout_s: float) -> None:
        self._broadcast(CommitCommand(threads=threads))
        self._wait_replies("committed", range(self.pool_size), timeout_s)
        self.topology = topo

    def abort(self, timeout_s: float) -> None:
        """Drop every worker's prepared layout. Each worker answers in command order, so once all
        have said "aborted" no reply of the abandoned switch is still on its way: forget them,
        or the next switch would take them for its own."""
        self._broadcast(AbortCommand())
        self._wait_replies("aborted", range(self.pool_size), timeout_s)
        self._replies = {key: msg for key, msg in self._replies.items() if key[0] not in ("prepared", "migrated")}

    def load(self, topo: Topology, num_blocks: int, block_size: int, threads: int, timeout_s: float = 300.0) -> None:
        """Put an idle pool on `topo` (nothing live to carry over)."""
        assert not self.in_flight, "load() with steps in flight"
        self.prepare(topo, num_blocks, block_size)
        self.wait_prepared(timeout_s)
        self.commit(topo, threads, timeout_s)

    def kv_digests(self, blocks: list[int], timeout_s: float = 60.0) -> dict[int, dict[str, str]]:
        """Per rank, sha1 of each (layer, KV head, block) slice it holds."""
        self._broadcast(DigestCommand(blocks))
        return {r: m.info for r, m in self._wait_replies("digest", range(self.pool_size), timeout_s).items()}

    def submit(self, cmd: StepCommand) -> None:
        data = encode(cmd)
        for rank in range(self.topology.world_size):
            self._cmds[rank].send(data)
        self.in_flight.append(cmd.step_id)

    def next_result(self, timeout_s: float = 600.0) -> StepResult:
        """The result of the oldest step in flight (steps complete in submission order)."""
        step_id = self.in_flight[0]
        while step_id not in self._early:
            self._take(self._recv(timeout_s))
        self.in_flight.popleft()
        return self._early.pop(step_id)

    def shutdown(self) -> None:
        data = encode(ShutdownCommand())
        for proc, sock in zip(self.procs, self._cmds):
            if proc.poll() is None:
                try:
                    sock.send(data, zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for sock in self._cmds:
            sock.close(linger=0)
        self._results.close(linger=0)
        self._ctx.term()
        shutil.rmtree(self._dir, ignore_errors=True)
