"""Live layout switches: requests mid-generation keep their tokens, live KV moves byte for byte,
a smaller target cache preempts (and later recomputes) instead of dropping, bad targets change
nothing. One pool of 4 workers walks every ordered pair of the six layouts in one tour."""
from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
import torch
from transformers import AutoModelForCausalLM

from remp.config import EngineConfig
from remp.engine.llm_engine import LLMEngine
from remp.engine.sampling import SamplingParams
from remp.config import ModelConfig
from remp.executor.local import LocalExecutor, WorkerReportedError
from remp.kv.migration import plan_kv_migration, to_rows
from remp.executor.messages import FAULT_ENV, KVMoveRows, SeqWork, StepCommand
from remp.reconfig.tour import switch_tour
from remp.topology import Topology, TopologyError

# dense layouts, two of them data-parallel (replicas inside the server): whole requests move between
# groups when dp changes, and their KV bytes arrive intact
LAYOUTS = [Topology(1, 1), Topology(2, 1), Topology(1, 2), Topology(2, 2), Topology(4, 1), Topology(1, 4),
           Topology(1, 1, dp=2), Topology(1, 2, dp=2)]
PROMPTS = [[5, 17, 99, 3, 42], list(range(30, 71)), [400, 2, 250, 7, 7, 7, 19, 11, 12, 13, 14, 15, 16, 17, 18]]
MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_gqa) -> list[list[int]]:
    hf = AutoModelForCausalLM.from_pretrained(tiny_gqa, dtype=torch.float32)
    return [hf.generate(torch.tensor([p]), max_new_tokens=MAX_TOKENS, do_sample=False,
                        eos_token_id=None)[0, len(p):].tolist() for p in PROMPTS]


@pytest.fixture(scope="module")
def engine(tiny_gqa):
    eng = LLMEngine(EngineConfig(dtype="float32", model=tiny_gqa, worker_pool_size=4, max_model_len=128, block_size=4))
    yield eng
    eng.shutdown()


def full_blocks(engine: LLMEngine) -> dict[str, int]:
    """Blocks whose every slot is written (paged KV is append-only: they cannot change)."""
    return {f"{r.request_id}/{i}": b for r in engine.running_kv() for i, b in enumerate(r.blocks[:r.full])}


def start_prompts(engine: LLMEngine, tag: str, steps: int = 3) -> tuple[dict, Callable[[list], None]]:
    """Add PROMPTS as requests `tag`0.. and step `steps` times; returns the finished outputs by
    request id (filled as they finish) and the callback that books them."""
    done: dict = {}

    def book(outs: list) -> None:
        done.update({o.request_id: o for o in outs if o.finished})

    for i, p in enumerate(PROMPTS):
        engine.add_request(f"{tag}{i}", p, GREEDY)
    for _ in range(steps):
        book(engine.step())
    return done, book


def test_every_switch_keeps_tokens_and_kv_bytes(engine, reference):
    tour = switch_tour(LAYOUTS)
    assert len(tour) == len(LAYOUTS) * (len(LAYOUTS) - 1) + 1
    engine.reconfigure(tour[0], lambda outs: None)
    for n, target in enumerate(tour[1:]):
        done = {}

        def book(outs):
            done.update({o.request_id: o for o in outs if o.finished})

        for i, p in enumerate(PROMPTS):
            engine.add_request(f"s{n}-{i}", p, GREEDY)
        for _ in range(2 + n % 4):  # switch at a different point of generation each time
            book(engine.step())
        while engine.executor.in_flight:
            book(engine.collect())
        blocks_before = full_blocks(engine)
        assert blocks_before, "the switch should happen with live KV"
        before = engine.kv_digests(list(blocks_before.values()))
        result = engine.reconfigure(target, book)
        assert result.outcome == "committed", result.reason
        assert engine.topology == target
        assert result.precopied_kv_blocks > 0, "full blocks are copied before the pause"
        assert result.kv_bytes_in_pause <= result.kv_bytes_moved
        blocks_after = full_blocks(engine)
        after = engine.kv_digests(list(blocks_after.values()))
        assert all(len(v) == 1 for v in after.values())  # replicated heads agree
        slices = [(layer, head) for layer in range(engine.model_config.num_layers)
                  for head in range(engine.model_config.num_kv_heads)]
        for key in blocks_before.keys() & blocks_after.keys():
            for layer, head in slices:
                assert after[f"{layer}:{head}:{blocks_after[key]}"] == before[f"{layer}:{head}:{blocks_before[key]}"]
        while engine.has_unfinished():
            book(engine.step())
        assert [done[f"s{n}-{i}"].token_ids for i in range(len(PROMPTS))] == reference, str(target)


def test_requests_arriving_during_a_switch_wait_for_the_target(engine, reference):
    engine.reconfigure(Topology(1, 2), lambda outs: None)
    done, book = start_prompts(engine, "early")
    admitting = []

    def book_during_switch(outs):
        book(outs)
        admitting.append(engine.scheduler.admitting)
        if len(admitting) == 1:
            engine.add_request("late", PROMPTS[1], GREEDY)

    result = engine.reconfigure(Topology(2, 1), book_during_switch)
    assert result.outcome == "committed", result.reason
    assert admitting and not any(admitting), "the switch steps the old layout, admitting no new prompt"
    assert [s.request_id for s in engine.scheduler.waiting] == ["late"]
    assert engine.scheduler.admitting
    while engine.has_unfinished():
        book(engine.step())
    assert done["late"].token_ids == reference[1]
    assert [done[f"early{i}"].token_ids for i in range(len(PROMPTS))] == reference


def test_a_switch_starts_with_a_step_in_flight(engine, reference):
    engine.reconfigure(Topology(1, 1), lambda outs: None)
    done, book = start_prompts(engine, "mid")
    engine.fill()
    assert engine.executor.in_flight
    result = engine.reconfigure(Topology(2, 2), book)
    assert result.outcome == "committed", result.reason
    assert result.timings_s["queued"] == 0 and result.timings_s["total"] >= result.timings_s["prepare"]
    while engine.has_unfinished():
        book(engine.step())
    assert [done[f"mid{i}"].token_ids for i in range(len(PROMPTS))] == reference


def test_invalid_target_changes_nothing(engine):
    before = engine.topology
    for bad in [Topology(3, 1), Topology(1, 5), Topology(4, 2)]:
        with pytest.raises(TopologyError):
            engine.reconfigure(bad, lambda outs: None)
        assert engine.topology == before


def test_smaller_target_cache_preempts_newest_and_recomputes(tiny_gqa, reference):
    # 2 KiB per block under tp1pp1 (4 layers x 2 heads), a quarter of that per worker under
    # tp2pp2: the same budget holds 24 blocks there and 96 here.
    eng = LLMEngine(EngineConfig(dtype="float32", model=tiny_gqa, tensor_parallel_size=2, pipeline_parallel_size=2, max_model_len=64,
                                 block_size=4, kv_cache_space_gb=24 * 2048 / 2**30))
    try:
        assert eng.scheduler.blocks.num_blocks == 96
        done = {}

        def book(outs):
            done.update({o.request_id: o for o in outs if o.finished})

        for i, p in enumerate(PROMPTS * 3):
            eng.add_request(f"r{i}", p, GREEDY)
        for _ in range(4):
            book(eng.step())
        result = eng.reconfigure(Topology(1, 1), book)
        assert result.outcome == "committed" and result.num_kv_blocks == {"before": 96, "after": 24}
        assert result.preempted_request_ids, "live KV exceeded the target cache: someone must be preempted"
        assert all(b < 24 for s in eng.scheduler.running for b in s.block_ids)
        while eng.has_unfinished():
            book(eng.step())
        assert [done[f"r{i}"].token_ids for i in range(len(PROMPTS) * 3)] == reference * 3
    finally:
        eng.shutdown()


def test_shards_are_views_of_the_mapped_checkpoint(engine):
    """Served in the checkpoint's dtype (float32), no switch copies a weight: every shard is a
    view of the mapped file, whatever the layout."""
    engine.reconfigure(Topology(1, 1), lambda outs: None)
    for target in (Topology(1, 2), Topology(2, 2), Topology(1, 1)):
        result = engine.reconfigure(target, lambda outs: None)
        assert result.outcome == "committed" and result.weight_bytes_loaded == 0


@pytest.mark.parametrize("pack", [False, True], ids=["views", "packed"])
def test_served_in_another_dtype_no_switch_copies_a_weight(tiny_gqa, pack):
    """Served in bfloat16 from a float32 checkpoint: the engine converts it once into shared memory
    and the workers map that copy, so no switch copies a weight, whatever it changes; requests keep
    their tokens across pipeline switches (each layer's bf16 arithmetic is the no-switch run's);
    the copy is removed at shutdown. With weights packed for oneDNN the same holds: a layout is
    built on views and packed after its commit, beside the steps."""
    from pathlib import Path

    from remp.config import cpu_has_native_bf16
    from remp.layers.packed import packing_works

    if pack and not (packing_works() and cpu_has_native_bf16()):
        pytest.skip("packing is the default only on CPUs with native bfloat16")
    eng = LLMEngine(EngineConfig(model=tiny_gqa, worker_pool_size=4, max_model_len=128, block_size=4,
                                 dtype="bfloat16", pack_weights=pack))
    copy = Path(eng.executor._weights_path)
    try:
        assert copy != Path(tiny_gqa) and copy.is_dir()
        for target in (Topology(2, 1), Topology(2, 2), Topology(4, 1), Topology(1, 2), Topology(1, 1)):
            result = eng.reconfigure(target, lambda outs: None)
            assert result.outcome == "committed" and result.weight_bytes_loaded == 0, (target, result.reason)
        plain, book = start_prompts(eng, "plain", steps=0)
        while eng.has_unfinished():
            book(eng.step())
        switched, book = start_prompts(eng, "switched", steps=2)
        for target in (Topology(1, 2), Topology(1, 4), Topology(1, 1)):
            result = eng.reconfigure(target, book)
            assert result.outcome == "committed" and result.weight_bytes_loaded == 0, (target, result.reason)
            book(eng.step())
        while eng.has_unfinished():
            book(eng.step())
        assert [switched[f"switched{i}"].token_ids for i in range(len(PROMPTS))] == \
            [plain[f"plain{i}"].token_ids for i in range(len(PROMPTS))]
    finally:
        eng.shutdown()
    assert not copy.exists()


def test_a_stage_prepares_while_a_step_ahead_of_it_waits(tiny_gqa, reference):
    """A pipeline stage has up to pp steps queued ahead of a switch's PrepareCommand; its
    preparation starts at once, beside them. Here the last stage is sent a step whose activation
    never comes (stage 0 is not asked to run it), so it sits in that step — and still prepares.
    Then stage 0 runs the step, and the last stage finishes it with the right token."""
    executor = LocalExecutor(tiny_gqa, 2, "float32")
    try:
        executor.load(Topology(1, 2), num_blocks=8, block_size=4, threads=1)
        step = StepCommand(step_id=1, seqs=[SeqWork(seq_id=0, token_ids=PROMPTS[0], start=0, block_table=[0, 1],
                                                     temperature=0.0, top_p=1.0, top_k=0, seed=0, out_pos=0)])
        executor._broadcast(step, ranks=[1])
        executor.prepare(Topology(1, 1), num_blocks=8, block_size=4)
        answers = executor.answers("prepared", timeout_s=30)
        assert [answers[r].standby for r in (0, 1)] == [False, True]
        executor._broadcast(step, ranks=[0])
        executor.in_flight.append(step.step_id)
        token = executor.next_result(timeout_s=30)[0].token_ids
        executor.abort(timeout_s=30)
    finally:
        executor.shutdown()
    assert token == reference[0][:1]


def test_a_commit_behind_a_step_in_flight_waits_until_the_next_stage_takes_its_hidden_state(tiny_gqa, reference):
    """The commit goes out right behind the cut, with steps still in flight: each worker runs it
    after its own steps. Here stage 1 is stopped while stage 0 runs a step and reaches the
    commit: its send of the hidden state is still under way, and dropping it (as the commit did
    when it always came after every step had ended) would leave stage 1 waiting for it forever.
    Resumed, stage 1 ends the step with the right token, the switch commits, and the next step
    on the target gets the next right token."""
    source, target = Topology(1, 2), Topology(1, 1)
    executor = LocalExecutor(tiny_gqa, 2, "float32")
    stage1 = executor.procs[1].pid
    try:
        executor.load(source, num_blocks=8, block_size=4, threads=1)
        executor.prepare(target, num_blocks=8, block_size=4)
        executor.answers("prepared", timeout_s=30)
        wire = to_rows(plan_kv_migration(ModelConfig.from_pretrained(tiny_gqa), source, target))
        os.kill(stage1, signal.SIGSTOP)
        try:
            executor.submit([StepCommand(1, [SeqWork(seq_id=0, token_ids=PROMPTS[0], start=0, block_table=[0, 1],
                                                    temperature=0.0, top_p=1.0, top_k=0, seed=0, out_pos=0)])])
            executor.start_commit(1, [KVMoveRows(wire, [0, 1], [0, 1])])
            time.sleep(1)  # stage 0 has run the step and is in the commit
        finally:
            os.kill(stage1, signal.SIGCONT)
        first = executor.next_result(timeout_s=30)[0].token_ids
        executor.finish_commit(target, timeout_s=30)
        second = decode_step(executor, 2, first, len(PROMPTS[0]), 1)
    finally:
        executor.shutdown()
    assert first + second == reference[0][:2]


@pytest.mark.parametrize("room", [3, 1])
def test_the_pause_uses_the_buffers_the_precopy_set_aside(tiny_gqa, room):
    """The pre-copy moves the full blocks and sets aside the pause's exchange buffers for `room`
    blocks; the pause moves the three filling ones. With room for them it allocates nothing;
    with too little it allocates its own. Either way every slice arrives byte for byte."""
    source, target = Topology(1, 1), Topology(1, 2)
    prompt = PROMPTS[1]  # 41 tokens: blocks 0-9 full, block 10 filling (block size 4)
    blocks = list(range(11))
    executor = LocalExecutor(tiny_gqa, 2, "float32")
    try:
        executor.load(source, num_blocks=16, block_size=4, threads=1)
        executor.submit([StepCommand(1, [SeqWork(seq_id=0, token_ids=prompt, start=0, block_table=blocks,
                                                temperature=0.0, top_p=1.0, top_k=0, seed=0, out_pos=0)])])
        executor.next_result(timeout_s=30)
        before = executor.kv_digests([blocks])[0]
        executor.prepare(target, num_blocks=16, block_size=4)
        wire = to_rows(plan_kv_migration(ModelConfig.from_pretrained(tiny_gqa), source, target))
        executor.precopy([KVMoveRows(wire, blocks[:8], blocks[:8])], filling=[blocks[8:]], pause_blocks=[room])
        executor.answers("prepared", timeout_s=30)
        executor.answers("precopied", timeout_s=30)
        executor.start_commit(1, [KVMoveRows(wire, blocks[8:], blocks[8:])])
        allocated = sum(answer.allocated_bytes for answer in executor.finish_commit(target, timeout_s=30).values())
        after = executor.kv_digests([blocks])
    finally:
        executor.shutdown()
    assert {**after[0], **after[1]} == before
    assert (allocated == 0) == (room >= 3)


@pytest.mark.parametrize("layout", [Topology(1, 2), Topology(2, 1)], ids=str)
def test_a_cut_step_stops_on_every_rank_and_runs_again_right(tiny_gqa, reference, layout):
    """A switch that wants its pause cuts the steps under way at their next check. Here the
    cut is set for rank 0 only, as when rank 0 reads its slot after the engine wrote it and its
    peer read before: in a pipeline the next stage learns it from the hidden state it receives;
    across tensor ranks it rides on the all-reduce, so both stop at the same point (one stopping
    alone would leave the other in its next all-reduce). Run again, the step overwrites what the
    cut one wrote and samples the reference token."""
    executor = LocalExecutor(tiny_gqa, 2, "float32")
    try:
        executor.load(layout, num_blocks=8, block_size=4, threads=1)
        executor._cut_flags.cut(1, [0])
        executor.submit([StepCommand(1, [SeqWork(seq_id=0, token_ids=PROMPTS[0], start=0, block_table=[0, 1],
                                                temperature=0.0, top_p=1.0, top_k=0, seed=0, out_pos=0)])])
        cut, = executor.next_result(timeout_s=30)
        again = decode_step(executor, 2, PROMPTS[0], 0, 0)
    finally:
        executor.shutdown()
    assert cut.cut and cut.token_ids == []
    assert again == reference[0][:1]


def decode_step(executor: LocalExecutor, step_id: int, tokens: list[int], start: int, out_pos: int) -> list[int]:
    """Run one greedy step of sequence 0 (blocks 0 and 1) straight on the executor; its token."""
    executor.submit([StepCommand(step_id, [SeqWork(seq_id=0, token_ids=tokens, start=start, block_table=[0, 1],
                                                  temperature=0.0, top_p=1.0, top_k=0, seed=0, out_pos=out_pos)])])
    return executor.next_result(timeout_s=30)[0].token_ids


def test_a_commit_that_fails_on_one_rank_is_undone_on_the_others(tiny_gqa, reference):
    """Migrate and commit are one round trip, so a rank can switch while a peer fails. Here the
    receiving rank's copy fails (a destination block past its new cache) after the sending rank
    has switched to the target; the abort takes that rank back to the old layout, and the request
    decodes on from its KV there with the right token. A confirmed switch, though, is final: an
    abort after it changes nothing."""
    source, target = Topology(1, 1), Topology(1, 2)
    executor = LocalExecutor(tiny_gqa, 2, "float32")
    try:
        executor.load(source, num_blocks=8, block_size=4, threads=1)
        executor.abort(timeout_s=30)  # the load's commit was confirmed: rank 0 stays on tp1pp1
        first = decode_step(executor, 1, PROMPTS[0], 0, 0)
        executor.prepare(target, num_blocks=8, block_size=4)
        executor.answers("prepared", timeout_s=30)
        wire = to_rows(plan_kv_migration(ModelConfig.from_pretrained(tiny_gqa), source, target))
        with pytest.raises(WorkerReportedError, match="worker 1 failed"):
            executor.start_commit(1, [KVMoveRows(wire, [0, 1], [0, 99])])
            executor.finish_commit(target, 30)
        executor.abort(timeout_s=30)
        second = decode_step(executor, 2, first, len(PROMPTS[0]), 1)
    finally:
        executor.shutdown()
    assert first + second == reference[0][:2]


def test_a_lost_peer_retires_the_switch_so_its_background_failures_are_dropped(tiny_gqa, reference, monkeypatch):
    """A pre-copy whose peer died fails and says so on the background socket, possibly after the
    engine has seen the death and begun to recover — collecting the steps still in flight, when
    the lost rank held nothing of them. That report belongs to the abandoned switch: it must not
    be taken for a failure of those steps. Here rank 1 (standby, joining the target) dies as its
    pre-copy starts, and rank 0's pre-copy to it fails."""
    monkeypatch.setenv(FAULT_ENV, "migrate:1:kill")
    source, target = Topology(1, 1), Topology(1, 2)
    executor = LocalExecutor(tiny_gqa, 2, "float32")
    try:
        executor.load(source, num_blocks=8, block_size=4, threads=1)
        first = decode_step(executor, 1, PROMPTS[0], 0, 0)
        executor.prepare(target, num_blocks=8, block_size=4)
        executor.answers("prepared", timeout_s=30)
        wire = to_rows(plan_kv_migration(ModelConfig.from_pretrained(tiny_gqa), source, target))
        executor.precopy([KVMoveRows(wire, [0], [0])], [[]], [0])
        executor.procs[1].wait(timeout=30)
        time.sleep(2)  # rank 0's report of its failed pre-copy is on its way, or in
        executor.kill([1])
        second = decode_step(executor, 2, first, len(PROMPTS[0]), 1)  # rank 1 was standby: unaffected
        assert executor.replace(timeout_s=120) == [1]
    finally:
        executor.shutdown()
    assert first + second == reference[0][:2]
