"""What a user sees when a worker process dies: /health turns 503 (also while idle), so a
load balancer or supervisor stops sending traffic and restarts the server."""
from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from helpers import remp_server

pytestmark = pytest.mark.slow


def worker_pids(port: int) -> list[int]:
    """Worker processes of the `remp serve --port PORT` running on this machine."""
    procs = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            procs[int(entry.name)] = (cmdline, ppid)
    servers = {pid for pid, (cmd, _) in procs.items() if b"serve" in cmd and str(port).encode() in cmd}
    return [pid for pid, (cmd, ppid) in procs.items() if ppid in servers and b"remp.worker.worker" in cmd]


def test_dead_worker_turns_health_503(tiny_gqa, tmp_path):
    with remp_server(tiny_gqa, tmp_path / "serve.log", "--worker-pool-size", "2") as url:
        assert httpx.get(f"{url}/health").status_code == 200
        pids = worker_pids(int(url.rsplit(":", 1)[1]))
        assert len(pids) == 2
        os.kill(pids[-1], signal.SIGKILL)
        deadline = time.monotonic() + 30
        while httpx.get(f"{url}/health").status_code == 200:
            assert time.monotonic() < deadline, "/health still 200 after a worker died"
            time.sleep(0.2)
        assert httpx.get(f"{url}/health").status_code == 503
