"""The simulator against a real server on this machine: the tiny model is profiled, then a short
slice of the shipped Azure trace is replayed both on a real `remp serve` (fixed layout) and in
`simulate` with that profile. The predictions must be within a stated tolerance of what the
server did; the errors are printed (pytest -s) for docs/benchmarks.md.

Tolerances, from the spread seen on 2 shared cores (three runs as below: median TPOT +2%, -18%,
-3%; median E2E +7%, -8%, +7%): output throughput within 10%, median TPOT and median end-to-end
latency within 40%.
TTFT is reported, not held to a bound: the profile times the engine alone, and on the tiny model
the HTTP front end and tokenizer are about half of a 12 ms TTFT (the simulator is ~50% low).

The simulator reads the mean of four profiles, two taken before the real run and two after.
A tiny-model decode step is ~4 ms, and its speed on these two shared cores wanders by +-25%
from one second to the next (medians of 1 s windows in one engine: 2.3-4.0 ms); a profile's
decode point is timed over ~0.1 s, the real run over 20 s. With one profile before the run the
TPOT was once 42% slow, once 49% fast. Bracketing the run also makes a slower drift of the
machine fall on both sides alike."""
from __future__ import annotations

import asyncio
import statistics

import pytest
from helpers import MAX_MODEL_LEN, remp_server

from remp.bench.serve import BenchConfig, benchmark, load_workload
from remp.bench.workload import sample_trace_path
from remp.config import EngineConfig
from remp.policy.profile import Profile
from remp.policy.profiler import profile_model
from remp.sim.simulator import simulate
from remp.topology import Topology

pytestmark = pytest.mark.slow

TOLERANCE = {"output_throughput": 0.10, "median_tpot_ms": 0.40, "median_e2el_ms": 0.40}
NUM_KV_BLOCKS = 128  # what remp_server passes
PROFILES_EACH_SIDE = 2  # profiles taken before the real run, and again after it
# 40 s of the trace at twice its speed: 89 requests in 20 s, prompts ~86 tokens, outputs ~40.
TRACE = dict(trace=str(sample_trace_path()), trace_time_scale=2.0, trace_length_scale=0.25,
             trace_max_input_len=128, trace_max_output_len=112, trace_duration=40.0, seed=0)


def profile_tp1pp1(model: str) -> Profile:
    return profile_model(EngineConfig(dtype="float32", model=model, worker_pool_size=1, max_model_len=MAX_MODEL_LEN,
                                      num_kv_blocks=NUM_KV_BLOCKS, threads_per_worker=1),
                         layouts=[Topology(1, 1)], batch_sizes=[1, 4, 16], context_lens=[32, 128],
                         prefill_tokens=[16, 128, 512], progress=False)


def mean_profile(profiles: list[Profile]) -> Profile:
    """The first profile, each of whose prefill and decode times becomes the mean over all of
    them (the same grid on the same engine config, so the points pair up in order)."""
    first, *rest = [p.layouts["tp1pp1"] for p in profiles]
    for points in (lambda lp: lp.prefill, lambda lp: lp.decode):
        for mine, *theirs in zip(points(first), *map(points, rest), strict=True):
            mine.seconds = statistics.mean([mine.seconds, *(p.seconds for p in theirs)])
    return profiles[0]


def test_simulated_fixed_layout_matches_a_real_run(tiny_gqa, tmp_path):
    before = [profile_tp1pp1(tiny_gqa) for _ in range(PROFILES_EACH_SIDE)]
    items = load_workload(BenchConfig(**TRACE))
    assert len(items) > 80
    with remp_server(tiny_gqa, tmp_path / "serve.log", "--worker-pool-size", "1") as url:
        real = asyncio.run(benchmark(BenchConfig(base_url=url, disable_tqdm=True, **TRACE)))
    assert real.metrics.completed == len(items)
    profile = mean_profile(before + [profile_tp1pp1(tiny_gqa) for _ in range(PROFILES_EACH_SIDE)])
    sim = simulate(items, profile, "tp1pp1").metrics
    pairs = {"output_throughput": (real.metrics.output_throughput, sim.output_throughput),
             "median_ttft_ms": (real.metrics.ttft.median_ms, sim.ttft.median_ms),
             "median_tpot_ms": (real.metrics.tpot.median_ms, sim.tpot.median_ms),
             "median_e2el_ms": (real.metrics.e2el.median_ms, sim.e2el.median_ms)}
    errors = {key: (s - r) / r for key, (r, s) in pairs.items()}
    print("simulated vs real, tp1pp1: " + "; ".join(f"{k} {s:.1f} vs {r:.1f} ({100 * errors[k]:+.0f}%)"
                                                     for k, (r, s) in pairs.items()))
    for key, bound in TOLERANCE.items():
        assert abs(errors[key]) <= bound, f"{key}: simulated {pairs[key][1]:.1f}, real {pairs[key][0]:.1f}"
