"""Helpers for end-to-end tests that run `remp` as a user would: real processes on 127.0.0.1."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from remp.bench.server_process import free_port

REPO = Path(__file__).resolve().parents[1]
MAX_MODEL_LEN = 256
STARTUP_TIMEOUT_S = 240


def remp(*args: str) -> list[str]:
    return [sys.executable, "-m", "remp.cli", *args]


def serve_pids(port: int) -> list[int]:
    """The `remp serve --port PORT` processes running on this machine."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0") if entry.name.isdigit() else []
        except OSError:
            continue
        if b"remp.cli" in cmdline and b"serve" in cmdline and str(port).encode() in cmdline:
            pids.append(int(entry.name))
    return pids


@contextmanager
def remp_server(model: str, log_path: Path, *extra: str) -> Iterator[str]:
    """Run `remp serve` until /health answers and yield its base URL; then SIGTERM it and
    expect a clean exit (SIGKILL to its whole session if it hangs, so no worker outlives
    the test)."""
    port = free_port()
    cmd = remp("serve", model, "--port", str(port), "--max-model-len", str(MAX_MODEL_LEN),
               "--num-kv-blocks", "128", "--threads-per-worker", "1", *extra)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"remp serve exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"remp serve not healthy after {STARTUP_TIMEOUT_S} s:\n{log_path.read_text()[-4000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        yield url
        proc.terminate()
        assert proc.wait(timeout=30) == 0, log_path.read_text()[-4000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


