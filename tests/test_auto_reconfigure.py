"""`remp serve --auto-reconfigure` end to end: a real server under a low -> high -> low request
rate switches to the high-capacity layout and back by itself, and every request finishes with
the tokens it has without a switch. The profile is made up so the right layout at each rate is
known (the real profiles and the gains are measured by the benchmarks, not asserted here)."""
from __future__ import annotations

import asyncio
import subprocess
import time

import httpx
import pytest
from helpers import REPO, remp, remp_server

from remp.bench.workload import schedule_arrivals
from remp.policy.profile import DecodePoint, LayoutProfile, PrefillPoint, Profile, SwitchCost

pytestmark = pytest.mark.slow

PROMPTS = [[5, 17, 99, 3, 42], list(range(30, 41)), [400, 2, 250, 7, 7, 7, 19, 11]]
MAX_TOKENS = 16
SCHEDULE = [(1.0, 10.0), (15.0, 15.0), (1.0, 25.0)]  # req/s, seconds


def made_up_layout(tp: int, pp: int, base_ms: float, per_seq_ms: float) -> LayoutProfile:
    """TPOT = base + per_seq * batch; prefill 2 ms per prompt token."""
    return LayoutProfile(tp=tp, pp=pp, num_kv_blocks=128, block_size=16, max_num_seqs=64,
                         prefill=[PrefillPoint(n, 0.002 * n) for n in (8, 64, 512)],
                         decode=[DecodePoint(b, c, (base_ms + per_seq_ms * b) / 1e3) for b in (1, 8, 64)
                                 for c in (16, 128)])


def write_profile(path) -> None:
    """tp2pp1: fast alone, saturates near 8 req/s; tp1pp2: 8x slower alone, 10x the capacity."""
    layouts = {lp.name: lp for lp in (made_up_layout(2, 1, base_ms=5, per_seq_ms=8),
                                      made_up_layout(1, 2, base_ms=40, per_seq_ms=0.2))}
    switch = {f"{a}->{b}": SwitchCost(0.5, 0.05) for a in layouts for b in layouts if a != b}
    Profile(model="tiny", pool_size=2, device="made up for the test", layouts=layouts, switch=switch).save(path)


async def drive(url: str) -> tuple[list[list[str]], list[str]]:
    """Send the schedule's arrivals (cycling through PROMPTS) and sample the layout meanwhile;
    returns each prompt's completions and the layouts seen, in order."""
    arrivals = schedule_arrivals(SCHEDULE, input_len=1, output_len=MAX_TOKENS, seed=0)
    texts: list[list[str]] = [[] for _ in PROMPTS]
    layouts: list[str] = []
    async with httpx.AsyncClient(timeout=120) as client:
        async def one(i: int) -> None:
            body = {"model": "tiny", "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": MAX_TOKENS,
                    "temperature": 0, "ignore_eos": True}
            reply = await client.post(f"{url}/v1/completions", json=body)
            assert reply.status_code == 200, reply.text
            texts[i % len(PROMPTS)].append(reply.json()["choices"][0]["text"])

        async def watch() -> None:
            while True:
                topo = (await client.get(f"{url}/v1/admin/topology")).json()
                name = f"tp{topo['tensor_parallel_size']}pp{topo['pipeline_parallel_size']}"
                if not layouts or layouts[-1] != name:
                    layouts.append(name)
                await asyncio.sleep(0.25)

        watcher = asyncio.create_task(watch())
        start = time.monotonic()
        tasks = []
        for i, item in enumerate(arrivals):
            await asyncio.sleep(max(0.0, start + item.arrival_s - time.monotonic()))
            tasks.append(asyncio.create_task(one(i)))
        await asyncio.gather(*tasks)
        watcher.cancel()
    return texts, layouts


def test_switches_up_and_down_with_the_load(tiny_gqa, tmp_path):
    profile = tmp_path / "profile.json"
    write_profile(profile)
    with remp_server(tiny_gqa, tmp_path / "serve.log", "--served-model-name", "tiny", "-tp", "2",
                     "--auto-reconfigure", "--profile", str(profile), "--policy-interval", "1",
                     "--policy-window", "8", "--policy-dwell", "2", "--policy-horizon", "30") as url:
        expected = [httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": p, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
        }).json()["choices"][0]["text"] for p in PROMPTS]
        texts, layouts = asyncio.run(drive(url))
        metrics = httpx.get(f"{url}/metrics").text
    assert layouts[:3] == ["tp2pp1", "tp1pp2", "tp2pp1"], layouts
    for want, got in zip(expected, texts):
        assert got and all(t == want for t in got)
    assert 'remp:reconfigurations_total{model_name="tiny",outcome="committed"}' in metrics
    assert 'remp:policy_decisions_total{decision="tp1pp2",model_name="tiny"}' in metrics
    assert "remp:policy_last_decision_info" in metrics


def test_auto_reconfigure_without_a_profile_is_a_clear_error(tiny_gqa, tmp_path):
    proc = subprocess.run(remp("serve", tiny_gqa, "--auto-reconfigure", "--port", "1"), cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "remp profile" in proc.stderr and "remp_profile.json" in proc.stderr
