"""`remp profile`: measure what each layout costs on this machine, as a `Profile`.

One engine (in-process, no HTTP) starts once on a worker pool and walks `switch_tour` over the
layouts, so every ordered pair is switched exactly once in the same run, under the same light
load (a couple of requests mid-generation, so the pause includes moving live KV as it does in
real use). On its first visit to a layout the engine is idle and the layout's compute costs are
taken there, through `LLMEngine.step()` exactly as the server drives it, so a pipeline keeps
its micro-batches in flight and the numbers include that overlap:

- prefill: B random prompts of L tokens with max_tokens=1, timed from submission until every
  one has its first token (one step: B*L never exceeds the step token budget);
- decode: B greedy sequences at context ~L that ignore EOS; once all are decoding, the time
  until each has gained a few more tokens, times B over the tokens gained = the wall time for
  every sequence to gain one token (TPOT at batch B). The sequences for every batch size at a
  context are prefilled once, at the largest batch, and aborted down to each smaller one.

Every figure is the median of a few repeats; prompts are ordinary (non-special) token ids from
a fixed seed.
"""
from __future__ import annotations

import math
import os
import random
import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from tqdm import tqdm

from remp.config import EngineConfig, ModelConfig
from remp.engine.llm_engine import LLMEngine
from remp.engine.outputs import RequestOutput
from remp.engine.sampling import SamplingParams
from remp.policy.profile import DecodePoint, LayoutProfile, PrefillPoint, Profile, SwitchCost
from remp.reconfig.tour import switch_tour
from remp.topology import Topology, TopologyError, valid_layouts

# Small enough that SmolLM2-135M's 5 layouts take minutes on a 2-core CPU: what dominates is
# prefilling the decode sequences (32 x (64 + 256) tokens a layout), which bounds the contexts.
DEFAULT_BATCH_SIZES = (1, 4, 16, 32)
DEFAULT_CONTEXT_LENS = (64, 256)
DEFAULT_PREFILL_TOKENS = (64, 256, 1024)
REPEATS = 5  # each point is the median of this many timings: a short repeat is within a shared CPU's jitter
DECODE_TOKENS = 4  # tokens every sequence gains in one timed decode repeat
SEED = 0
LOAD_REQUESTS = 2  # requests mid-generation during each switch
LOAD_PROMPT_LEN = 32
LOAD_TOKENS_BEFORE_SWITCH = 2


@dataclass
class LayoutGrid:
    """The points one layout is measured at, after clipping to its limits."""

    prefill: list[tuple[int, int]]  # (prompts, tokens per prompt)
    decode: dict[int, list[int]]  # prompt length -> batch sizes, largest first

    @property
    def num_points(self) -> int:
        return len(self.prefill) + sum(len(sizes) for sizes in self.decode.values())


class Driver:
    """The engine plus what every measurement books: unique request ids, seeded random prompts
    and how many tokens each live request has so far."""

    def __init__(self, engine: LLMEngine, seed: int = SEED):
        self.engine = engine
        self.generated: dict[str, int] = {}  # unfinished requests only
        self._rng = random.Random(seed)
        special = set(engine.tokenizer.all_special_ids) | engine.eos_token_ids
        self._ordinary = [t for t in range(engine.model_config.vocab_size) if t not in special]
        self._next_id = 0

    def add(self, count: int, prompt_len: int, params: SamplingParams) -> list[str]:
        ids = []
        for _ in range(count):
            request_id = f"profile-{self._next_id}"
            self._next_id += 1
            self.engine.add_request(request_id, self._rng.choices(self._ordinary, k=prompt_len), params)
            self.generated[request_id] = 0
            ids.append(request_id)
        return ids

    def book(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished:
                self.generated.pop(out.request_id, None)
            else:
                self.generated[out.request_id] = len(out.token_ids)

    def step(self) -> None:
        self.book(self.engine.step())

    def finish(self, ids: list[str]) -> None:
        """Step until every request in `ids` has finished."""
        while any(i in self.generated for i in ids):
            self.step()

    def step_until(self, ids: list[str], gain: int) -> tuple[float, int]:
        """Step until every request in `ids` has `gain` more tokens; (seconds, tokens gained)."""
        start = {i: self.generated[i] for i in ids}
        t0 = time.perf_counter()
        while True:
            if any(i not in self.generated for i in ids):
                raise RuntimeError("a decoding sequence finished before its measurement did")
            if min(self.generated[i] - start[i] for i in ids) >= gain:
                break
            self.step()
        return time.perf_counter() - t0, sum(self.generated[i] - start[i] for i in ids)

    def abort(self, ids: Iterable[str]) -> None:
        for i in list(ids):
            self.engine.abort_request(i)
            self.generated.pop(i, None)

    def drain(self) -> None:
        """Abort whatever is live and collect the steps in flight: the engine is idle after."""
        self.abort(self.generated)
        while self.engine.has_unfinished():
            self.step()


def decode_headroom(engine: LLMEngine, topo: Topology, batch: int, prompt_len: int, num_sizes: int) -> int:
    """Most tokens a decode sequence may generate while its context is measured at `num_sizes`
    batch sizes: while the batch is prefilled over several steps the first ones decode already,
    and each batch size takes a warm-up round and REPEATS rounds that may overshoot by one."""
    prefill_steps = math.ceil(batch * prompt_len / engine.max_num_batched_tokens) + topo.pp
    return prefill_steps + 1 + num_sizes * (1 + REPEATS * (DECODE_TOKENS + 1))


def plan_grid(engine: LLMEngine, topo: Topology, batch_sizes: Iterable[int], context_lens: Iterable[int],
              prefill_tokens: Iterable[int]) -> LayoutGrid:
    """Clip the requested grid to what `topo` can run without preempting: max_num_seqs, the
    step token budget, max_model_len and the layout's KV blocks. A data-parallel layout runs
    max_num_seqs and holds its KV blocks per group, and the engine gives each new request to the
    least loaded group, so a batch spreads evenly over them. Raises ValueError when nothing is
    left to measure."""
    blocks, seqs = engine.num_blocks_for(topo), topo.dp * engine.config.max_num_seqs
    per_seq = engine.scheduler.blocks.blocks_needed

    def fits(batch: int, tokens: int) -> bool:
        return math.ceil(batch / topo.dp) * per_seq(tokens) <= blocks

    prefill = []
    for total in sorted({min(t, engine.max_num_batched_tokens) for t in prefill_tokens if t > 0}):
        batch = math.ceil(total / (engine.max_model_len - 1))
        point = (batch, total // batch)
        if batch <= seqs and fits(batch, point[1] + 1) and point not in prefill:
            prefill.append(point)
    sizes = sorted({min(b, seqs) for b in batch_sizes if b > 0}, reverse=True)
    decode = {}
    for length in sorted({c for c in context_lens if c > 0}):
        headroom = decode_headroom(engine, topo, sizes[0], length, len(sizes)) if sizes else 0
        length = min(length, engine.max_model_len - headroom)
        fitting = [b for b in sizes if fits(b, length + headroom)]
        if length > 0 and fitting:
            decode.setdefault(length, fitting)
    if not prefill or not decode:
        raise ValueError(f"no {'prefill' if not prefill else 'decode'} point of the grid fits {topo} "
                         f"(max_model_len {engine.max_model_len}, {blocks} KV blocks of {engine.config.block_size})")
    return LayoutGrid(prefill, decode)


def measure_prefill(driver: Driver, batch: int, prompt_len: int) -> PrefillPoint:
    """Idle engine, `batch` prompts submitted at once, until every first token."""
    times = []
    for _ in range(REPEATS):
        ids = driver.add(batch, prompt_len, SamplingParams(max_tokens=1, temperature=0))
        t0 = time.perf_counter()
        driver.finish(ids)
        times.append(time.perf_counter() - t0)
    return PrefillPoint(num_tokens=batch * prompt_len, seconds=statistics.median(times))


def measure_decode(driver: Driver, prompt_len: int, sizes: list[int], bar: tqdm) -> list[DecodePoint]:
    """Prefill sizes[0] sequences once, then time decoding at each batch size, aborting the
    surplus between sizes; the context recorded is the mean over each size's timed rounds."""
    engine = driver.engine
    params = SamplingParams(max_tokens=engine.max_model_len - prompt_len, temperature=0, ignore_eos=True)
    ids = driver.add(sizes[0], prompt_len, params)
    driver.step_until(ids, 1)  # every sequence prefilled
    points = []
    for batch in sizes:
        bar.set_description(f"{engine.topology} decode b={batch} ctx={prompt_len}")
        driver.abort(ids[batch:])
        ids = ids[:batch]
        driver.step_until(ids, 1)  # the pipeline refilled at this batch
        first = statistics.mean(driver.generated[i] for i in ids)
        per_token = []
        for _ in range(REPEATS):
            seconds, gained = driver.step_until(ids, DECODE_TOKENS)
            per_token.append(seconds * batch / gained)
        context = prompt_len + (first + statistics.mean(driver.generated[i] for i in ids)) / 2
        points.append(DecodePoint(batch_size=batch, context_len=round(context), seconds=statistics.median(per_token)))
        bar.update()
    driver.drain()
    return points


def measure_layout(driver: Driver, grid: LayoutGrid, bar: tqdm) -> LayoutProfile:
    """Compute costs of the engine's current layout, which must be idle."""
    engine = driver.engine
    topo = engine.topology
    decode = []
    for prompt_len, sizes in grid.decode.items():
        decode += measure_decode(driver, prompt_len, sizes, bar)
    prefill = []
    for batch, prompt_len in grid.prefill:
        bar.set_description(f"{topo} prefill {batch}x{prompt_len}")
        prefill.append(measure_prefill(driver, batch, prompt_len))
        bar.update()
    return LayoutProfile.of(topo, num_kv_blocks=engine.scheduler.blocks.num_blocks,
                            block_size=engine.config.block_size, max_num_seqs=engine.config.max_num_seqs,
                            prefill=prefill, decode=decode)


def measure_switch(driver: Driver, target: Topology) -> SwitchCost:
    """Switch with LOAD_REQUESTS requests mid-generation (so live KV moves), then go idle."""
    engine = driver.engine
    prompt_len = min(LOAD_PROMPT_LEN, engine.max_model_len // 2)
    params = SamplingParams(max_tokens=engine.max_model_len - prompt_len, temperature=0, ignore_eos=True)
    ids = driver.add(LOAD_REQUESTS, prompt_len, params)
    driver.step_until(ids, LOAD_TOKENS_BEFORE_SWITCH)
    source = engine.topology
    result = engine.reconfigure(target, driver.book)
    driver.drain()
    if result.outcome != "committed":
        raise RuntimeError(f"switch {source} -> {target} {result.outcome}: {result.reason}")
    return SwitchCost(seconds=result.timings_s["total"], pause_seconds=result.timings_s["pause"])


def check_layouts(model: ModelConfig, pool_size: int, layouts: list[Topology] | None) -> list[Topology]:
    """The layouts asked for, deduplicated and validated, or every valid one when none were:
    `valid_layouts`, what a live switch may target (expert-parallel and data-parallel layouts
    included), since the profile is taken by switching along a tour of them."""
    if layouts is None:
        return valid_layouts(model, pool_size)
    for layout in layouts:
        layout.validate(model, pool_size)
    if not layouts:
        raise TopologyError("no layout to profile")
    return list(dict.fromkeys(layouts))


def profile_model(config: EngineConfig, layouts: list[Topology] | None = None,
                  batch_sizes: Iterable[int] = DEFAULT_BATCH_SIZES, context_lens: Iterable[int] = DEFAULT_CONTEXT_LENS,
                  prefill_tokens: Iterable[int] = DEFAULT_PREFILL_TOKENS, progress: bool = True) -> Profile:
    """Measure every layout of `layouts` (default: all valid on config's pool) and every switch
    between them with one engine; config's own layout is ignored, the pool size is what counts.
    Raises ValueError (TopologyError, ModelError) for a request that cannot run."""
    pool = config.pool_size
    layouts = check_layouts(ModelConfig.from_pretrained(config.model), pool, layouts)
    tour = switch_tour(layouts)
    first = tour[0]
    engine = LLMEngine(replace(config.with_topology(first), worker_pool_size=pool))
    try:
        grids = {topo: plan_grid(engine, topo, batch_sizes, context_lens, prefill_tokens) for topo in layouts}
        driver = Driver(engine)
        profiled: dict[Topology, LayoutProfile] = {}
        switches: dict[str, SwitchCost] = {}
        total = sum(g.num_points for g in grids.values()) + len(tour) - 1
        with tqdm(total=total, unit="point", disable=not progress) as bar:
            for here, target in zip(tour, [*tour[1:], None]):
                if here not in profiled:
                    profiled[here] = measure_layout(driver, grids[here], bar)
                if target is not None:
                    bar.set_description(f"switch {here} -> {target}")
                    switches[f"{here}->{target}"] = measure_switch(driver, target)
                    bar.update()
        dtype = str(engine.dtype).removeprefix("torch.")
        return Profile(model=Path(config.model).name, pool_size=pool,
                       device=f"{config.device}, {os.cpu_count()} cores, {dtype}",
                       layouts={str(t): profiled[t] for t in layouts}, switch=switches)
    finally:
        engine.shutdown()


def summary(profile: Profile) -> str:
    """A markdown table of the headline numbers: the largest prefill measured, and the TPOT at
    the smallest and largest batch at the shortest context."""
    lines = ["| layout | KV tokens | prefill | TPOT small batch | TPOT large batch |", "|---|---|---|---|---|"]
    for name, lp in profile.layouts.items():
        big = max(lp.prefill, key=lambda p: p.num_tokens)
        context = min(p.context_len for p in lp.decode)
        low, high = min(p.batch_size for p in lp.decode), max(p.batch_size for p in lp.decode)
        lines.append(f"| {name} | {lp.kv_capacity_tokens} | {big.seconds:.3f} s @ {big.num_tokens} tok | "
                     f"{lp.decode_seconds(low, context) * 1e3:.1f} ms @ b={low} | "
                     f"{lp.decode_seconds(high, context) * 1e3:.1f} ms @ b={high} |")
    if profile.switch:
        costs = list(profile.switch.values())
        lines.append(f"\n{len(costs)} switches: total median {statistics.median(c.seconds for c in costs):.2f} s, "
                     f"pause median {statistics.median(c.pause_seconds for c in costs) * 1e3:.0f} ms, "
                     f"pause max {max(c.pause_seconds for c in costs) * 1e3:.0f} ms")
    return "\n".join(lines)
