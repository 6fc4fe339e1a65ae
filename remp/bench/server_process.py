"""Start and stop a real server process — `remp serve`, or a peer engine's OpenAI-compatible
server — for benchmarks that need a fresh one, and time a restart the way a user pays for it."""
from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp

from remp.topology import Topology
import httpx

REMP_SERVE = (sys.executable, "-m", "remp.cli", "serve", "--log-level", "warning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]



def serve_flags(layout: Topology) -> list[str]:
    """The `remp serve` flags that start a server in `layout`."""
    flags = ["-tp", str(layout.tp), "-pp", str(layout.pp), "-dp", str(layout.dp)]
    if layout.ep:
        flags += ["--enable-expert-parallel", "--expert-placement-strategy", layout.placement]
    return flags

class ServerProcess:
    """`PROGRAM MODEL --port P ARGS...` on 127.0.0.1 (PROGRAM: `remp serve` unless told, e.g.
    vLLM's `python -m vllm.entrypoints.openai.api_server --model`); `start()` returns once
    /health answers 200."""

    def __init__(self, model: str, args: list[str], log_path: str | None = None,
                 program: Sequence[str] = REMP_SERVE, env: Mapping[str, str] | None = None):
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.cmd = [*program, model, "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.log_path = log_path or os.devnull
        self.proc: subprocess.Popen | None = None
        self.exit_code: int | None = None  # of the last process stopped

    def start(self, timeout_s: float = 600.0) -> float:
        """Launch and wait until healthy; returns the seconds that took."""
        t0 = time.perf_counter()
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(self.cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env)
        while time.perf_counter() - t0 < timeout_s:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; log: {self.log_path}")
            try:
                if httpx.get(f"{self.base_url}/health", timeout=1.0).status_code == 200:
                    return time.perf_counter() - t0
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise TimeoutError(f"server not healthy after {timeout_s:.0f} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None:
            self.exit_code = self.proc.returncode
            self._log.close()
        self.proc = None

    def __enter__(self) -> "ServerProcess":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


async def first_token_s(base_url: str, headers: Mapping[str, str], payload: dict[str, Any]) -> float:
    """Seconds from sending `payload` (a streamed completion) to its first generated text."""
    from remp.bench.serve import COMPLETIONS, send_request  # the load generator imports slowly

    async with aiohttp.ClientSession(headers=dict(headers)) as session:
        record = await send_request(session, base_url + COMPLETIONS, COMPLETIONS, payload, len(payload["prompt"]))
    if not record.success:
        raise RuntimeError(f"first request after start-up failed: {record.error}")
    return record.ttft


def launch_to_first_token(server: ServerProcess, payload: dict[str, Any],
                          headers: Mapping[str, str] | None = None) -> float:
    """Start `server` and stream one token: the seconds a restart costs a user (launch, load,
    warm-up, /health, first token). The server is left running."""
    t0 = time.perf_counter()
    server.start()
    asyncio.run(first_token_s(server.base_url, headers or {}, {**payload, "max_tokens": 1}))
    return time.perf_counter() - t0
