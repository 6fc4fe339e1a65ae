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
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque

import zmq

from remp.executor.messages import (LoadCommand, ShutdownCommand, StepCommand, StepResult, WorkerReply,
                                    decode, encode)
from remp.topology import Topology


class WorkerError(RuntimeError):
    """A worker died, reported an error or did not answer in time."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalExecutor:
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
        dist_init = f"tcp://127.0.0.1:{_free_port()}"
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
            self.procs.append(subprocess.Popen([sys.executable, "-m", "remp.worker.worker", json.dumps(spec)]))
        self.topology: Topology | None = None
        self.in_flight: deque[int] = deque()
        self._early: dict[int, StepResult] = {}
        self._wait_replies("ready", range(pool_size), start_timeout_s)

    def _recv(self, timeout_s: float):
        """Next message from any worker; raises WorkerError if a worker dies or time runs out."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._results.poll(100):
                msg = decode(self._results.recv())
                if isinstance(msg, WorkerReply) and msg.kind == "error":
                    raise WorkerError(f"worker {msg.rank} failed: {msg.message}")
                return msg
            dead = [f"rank {r} (exit code {p.returncode})" for r, p in enumerate(self.procs) if p.poll() is not None]
            if dead:
                raise WorkerError(f"worker process exited: {', '.join(dead)}")
            if time.monotonic() > deadline:
                raise WorkerError(f"no answer from the workers within {timeout_s:.0f} s")

    def _wait_replies(self, kind: str, ranks, timeout_s: float) -> dict[int, WorkerReply]:
        waiting, got = set(ranks), {}
        deadline = time.monotonic() + timeout_s
        while waiting:
            msg = self._recv(max(0.0, deadline - time.monotonic()))
            if isinstance(msg, StepResult):
                self._early[msg.step_id] = msg
                continue
            if msg.kind == kind and msg.rank in waiting:
                waiting.discard(msg.rank)
                got[msg.rank] = msg
        return got

    def load(self, topo: Topology, num_blocks: int, block_size: int, threads: int,
             timeout_s: float = 300.0) -> dict[int, dict]:
        """Put every pool worker on `topo` (ranks outside it go standby). Not for use with
        steps in flight: a live switch is a reconfiguration transaction."""
        assert not self.in_flight, "load() with steps in flight"
        cmd = encode(LoadCommand(tp=topo.tp, pp=topo.pp, num_blocks=num_blocks, block_size=block_size,
                                 threads=threads))
        for sock in self._cmds:
            sock.send(cmd)
        replies = self._wait_replies("loaded", range(self.pool_size), timeout_s)
        self.topology = topo
        return {r: m.info for r, m in replies.items()}

    def submit(self, cmd: StepCommand) -> None:
        data = encode(cmd)
        for rank in range(self.topology.world_size):
            self._cmds[rank].send(data)
        self.in_flight.append(cmd.step_id)

    def next_result(self, timeout_s: float = 600.0) -> StepResult:
        """The result of the oldest step in flight (steps complete in submission order)."""
        step_id = self.in_flight[0]
        while step_id not in self._early:
            msg = self._recv(timeout_s)
            if isinstance(msg, StepResult):
                self._early[msg.step_id] = msg
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
