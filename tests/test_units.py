"""Fast tests of the pure parts: topology, weight slicing, blocks, scheduler, detokeniser, sampler,
and the worker's thread settings."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from remp.config import EngineConfig, ModelConfig
from remp.engine.detokenizer import Detokenizer
from remp.engine.outputs import RequestMetrics
from remp.engine.sampling import SamplingParams, sample_row
from remp.engine.scheduler import Scheduler, Sequence, SeqStatus
from remp.kv.blocks import BlockManager, OutOfBlocks
from remp.topology import Topology, TopologyError, split_range
from remp.worker.threads import background_pool, use_threads


@pytest.fixture(scope="module")
def cfg(tiny_gqa) -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_gqa)


def test_split_range_is_balanced_and_contiguous():
    parts = [split_range(30, 4, i) for i in range(4)]
    assert [len(p) for p in parts] == [8, 8, 7, 7]
    assert [x for p in parts for x in p] == list(range(30))


def test_topology_ownership(cfg):
    t = Topology(2, 2)
    assert [t.coords(r) for r in range(5)] == [(0, 0, 0), (0, 1, 0), (1, 0, 0), (1, 1, 0), None]
    assert t.tp_group_ranks(1) == [2, 3]
    assert t.layers_of(0, cfg.num_layers) == range(0, 2) and t.stage_of(3, cfg.num_layers) == 1
    assert t.heads_of(1, 8) == range(4, 8) and t.kv_heads_of(1, 2) == range(1, 2)
    t4 = Topology(4, 1)  # tp > kv heads: each kv head replicated on 2 ranks
    assert [t4.kv_heads_of(r, 2) for r in range(4)] == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    for r in range(4):  # every query head's kv head (h // 4 in HF's GQA) lives on the same rank
        assert all(h // 4 in t4.kv_heads_of(r, 2) for h in t4.heads_of(r, 8))


@pytest.mark.parametrize("tp,pp,pool,reason", [
    (3, 1, 4, "does not divide the 8 attention heads"),
    (1, 5, 8, "exceeds the 4 layers"),
    (2, 2, 3, "the pool has 3"),
    (0, 1, 4, "must be >= 1"),
])
def test_topology_validation(cfg, tp, pp, pool, reason):
    with pytest.raises(TopologyError, match=reason):
        Topology(tp, pp).validate(cfg, pool)


TINY_FIELDS = dict(path="", architecture="LlamaForCausalLM", vocab_size=10, hidden_size=12, intermediate_size=8,
                   num_layers=2, num_heads=12, num_kv_heads=4, head_dim=1, rms_norm_eps=1e-6,
                   tie_word_embeddings=False, attention_bias=False, max_position_embeddings=8, torch_dtype="float32",
                   eos_token_ids=())


def test_kv_head_divisibility_rule():
    import dataclasses
    m = ModelConfig(**TINY_FIELDS)
    Topology(2, 1).validate(m, 8)
    Topology(12, 1).validate(m, 12)
    with pytest.raises(TopologyError, match="divide or be a multiple"):
        Topology(6, 1).validate(dataclasses.replace(m, num_kv_heads=4), 8)


@pytest.mark.parametrize("native,device,checkpoint,expected", [
    (True, "cpu", "float32", torch.bfloat16),
    (False, "cpu", "float32", torch.float32),
    (False, "cpu", "bfloat16", torch.float32),
    (False, "cuda", "float16", torch.float16),
    (False, "cuda", "float32", torch.bfloat16),
])
def test_auto_dtype_is_bfloat16_where_the_hardware_has_it(monkeypatch, native, device, checkpoint, expected):
    import dataclasses

    from remp import config

    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: native)
    m = dataclasses.replace(ModelConfig(**TINY_FIELDS), torch_dtype=checkpoint)
    dtype, why = config.resolve_dtype("auto", m, device)
    assert dtype == expected and why.startswith("auto")
    assert config.resolve_dtype("float32", m, device) == (torch.float32, "asked for")
    with pytest.raises(ValueError, match="unknown dtype 'int8'"):
        config.resolve_dtype("int8", m, device)


def test_weights_are_packed_by_default_only_where_it_pays(monkeypatch):
    from remp import config
    from remp.layers import packed

    monkeypatch.setattr(packed, "packing_works", lambda: True)
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: True)
    assert config.resolve_pack_weights(None, torch.bfloat16, "cpu")[0] is True
    assert config.resolve_pack_weights(None, torch.float32, "cpu")[0] is False
    assert config.resolve_pack_weights(False, torch.bfloat16, "cpu") == (False, "asked for")
    monkeypatch.setattr(config, "cpu_has_native_bf16", lambda: False)
    assert config.resolve_pack_weights(None, torch.bfloat16, "cpu")[0] is False  # emulated bf16: not by default
    assert config.resolve_pack_weights(True, torch.bfloat16, "cpu") == (True, "asked for")
    with pytest.raises(ValueError, match="--pack-weights needs --dtype bfloat16"):
        config.resolve_pack_weights(True, torch.float32, "cpu")
    monkeypatch.setattr(packed, "packing_works", lambda: False)
    with pytest.raises(ValueError, match="oneDNN"):
        config.resolve_pack_weights(True, torch.bfloat16, "cpu")


def test_native_bf16_is_read_from_the_cpu_flags():
    from remp.config import cpu_has_native_bf16

    flags = open("/proc/cpuinfo").read().split()
    assert cpu_has_native_bf16() == ("avx512_bf16" in flags or "amx_bf16" in flags or "amx_tile" in flags)


def test_expert_ownership_is_a_function_of_the_layout():
    import dataclasses

    from remp.config import MoEConfig

    moe = MoEConfig(num_experts=8, top_k=2, intermediate_size=96, renormalize=True, scores_in_float=True,
                    sparse_layers=(0, 1))
    m = dataclasses.replace(ModelConfig(**TINY_FIELDS), architecture="MixtralForCausalLM", moe=moe)
    ep, tp = Topology(4, 1, ep=True), Topology(4, 1)
    assert [list(ep.experts_of(ep.coords(r), 8)) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert all(ep.expert_slice(r, 96) == range(96) for r in range(4))
    assert all(tp.experts_of(tp.coords(r), 8) == range(8) for r in range(4))
    assert [tp.expert_slice(r, 96) for r in range(4)] == [range(0, 24), range(24, 48), range(48, 72), range(72, 96)]
    assert str(ep) == "tp4pp1ep" and Topology.parse("tp4pp1ep") == ep and Topology.parse("tp4pp1") == tp
    assert Topology.from_dict(ep.as_dict()) == ep and Topology.from_dict({"tensor_parallel_size": 4,
                                                                        "pipeline_parallel_size": 1}) == tp
    ep.validate(m, 4)
    # round-robin placement: expert e on ep rank e % ep_size; the owner is the inverse of experts_of
    rr = Topology(2, 1, ep=True, dp=2, placement="round_robin")
    assert [list(rr.experts_of(rr.coords(r), 8)) for r in range(4)] == [[0, 4], [1, 5], [2, 6], [3, 7]]
    assert str(rr) == "dp2tp2pp1eprr" and Topology.parse(str(rr)) == rr and Topology.from_dict(rr.as_dict()) == rr
    for layout in (ep, rr, Topology(1, 2, ep=True, dp=2)):
        for r in range(layout.world_size):
            c = layout.coords(r)
            assert all(layout.expert_owner(e, 8) == layout.ep_rank(c) for e in layout.experts_of(c, 8))
    # data parallelism: stage-major, then group, then tensor rank
    dp = Topology(1, 2, dp=2)
    assert [dp.coords(r) for r in range(5)] == [(0, 0, 0), (0, 0, 1), (1, 0, 0), (1, 0, 1), None]
    assert dp.rank(1, 0, 1) == 3 and dp.stage_ranks(1) == [2, 3] and dp.world_size == 4
    assert not dp.exchanges_tokens and rr.exchanges_tokens and not ep.exchanges_tokens
    with pytest.raises(TopologyError, match="over dp\\*tp = 3 ranks needs the 8 experts to divide evenly"):
        Topology(3, 1, ep=True).validate(dataclasses.replace(m, num_heads=12, num_kv_heads=3), 4)
    with pytest.raises(TopologyError, match="dp\\*tp\\*pp = 8 workers needed but the pool has 4"):
        Topology(2, 2, dp=2).validate(m, 4)
    with pytest.raises(TopologyError, match="round_robin places experts under expert parallelism"):
        Topology(2, 1, placement="round_robin").validate(m, 4)
    with pytest.raises(TopologyError, match="must be one of linear, round_robin"):
        Topology(2, 1, ep=True, placement="random").validate(m, 4)
    with pytest.raises(TopologyError, match="written"):
        Topology.parse("tp2pp1rr")
    for layout in (rr, dp, ep):  # an engine config names the same layout back
        assert EngineConfig("m").with_topology(layout).topology == layout
    with pytest.raises(TopologyError, match="needs a mixture-of-experts model"):
        Topology(2, 1, ep=True).validate(ModelConfig(**TINY_FIELDS), 4)


def test_block_manager():
    bm = BlockManager(4, 16)
    a = bm.allocate(3)
    assert a == [0, 1, 2] and bm.num_free == 1 and bm.blocks_needed(33) == 3
    with pytest.raises(OutOfBlocks):
        bm.allocate(2)
    bm.free(a)
    assert bm.num_free == 4 and bm.usage == 0
    assert [bm.handouts(b) for b in range(4)] == [1, 1, 1, 0]
    assert bm.allocate(1) == [0] and bm.handouts(0) == 2  # handed out anew: a pre-copy of it is stale
    carried = BlockManager(12, 4, used=[9, 3, 5, 3])  # after a switch: the live blocks stay taken
    assert carried.num_free == 9 and carried.allocate(9) == [0, 1, 2, 4, 6, 7, 8, 10, 11]
    with pytest.raises(ValueError, match="lie in"):
        BlockManager(4, 16, used=[4])


def _seq(i: int, n: int) -> Sequence:
    return Sequence(i, f"r{i}", list(range(n)), SamplingParams(), 0, RequestMetrics(0.0))


def test_scheduler_mixes_prefill_and_decode_and_preempts_newest():
    sched = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a, b = _seq(0, 7), _seq(1, 8)
    sched.add(a)
    first = sched.schedule(1)
    assert [(x.seq, x.start, len(x.token_ids)) for x in first] == [(a, 0, 7)]
    for x in first:
        sched.step_done(x)
    a.output_token_ids.append(1)
    sched.add(b)
    mixed = sched.schedule(1)  # a decodes (8th token, fits its 2 blocks) while b prefills
    assert [(x.seq, x.start, len(x.token_ids)) for x in mixed] == [(a, 7, 1), (b, 0, 8)]
    for x in mixed:
        sched.step_done(x)
    a.output_token_ids.append(1)
    b.output_token_ids.append(1)
    nxt = sched.schedule(1)  # a needs a 3rd block, none free: b (newest) is preempted
    assert [x.seq for x in nxt] == [a] and b.status is SeqStatus.WAITING and b.num_computed == 0
    assert sched.waiting[0] is b and b.num_preemptions == 1


def test_scheduler_splits_ready_sequences_across_pipeline_slots():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    seqs = [_seq(i, 3) for i in range(4)]
    for s in seqs:
        sched.add(s)
    for x in sched.schedule(2):
        sched.step_done(x)
        x.seq.output_token_ids.append(1)
    assert len(sched.schedule(2)) == 2 and len(sched.schedule(1)) == 2


def test_scheduler_admits_no_prompt_while_a_switch_holds_admission():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a, b = _seq(0, 3), _seq(1, 3)
    sched.add(a)
    for x in sched.schedule(1):
        sched.step_done(x)
    a.output_token_ids.append(1)
    sched.add(b)
    sched.admitting = False
    held = sched.schedule(1)  # a keeps decoding, b waits
    assert [x.seq for x in held] == [a] and list(sched.waiting) == [b]
    for x in held:
        sched.step_done(x)
    a.output_token_ids.append(1)
    sched.admitting = True
    assert [x.seq for x in sched.schedule(1)] == [a, b]


def test_detokenizer_holds_back_and_cuts_stop_strings(tiny_gqa):
    tok = AutoTokenizer.from_pretrained(tiny_gqa)
    detok = Detokenizer(tok)
    ids = tok.encode(" the cat sat on the mat")
    state = detok.start([1, 2])
    pieces, text, hit = [], "", False
    for i in range(1, len(ids) + 1):
        text, new, hit = detok.update(state, ids[:i], ["on the"], finished=False)
        pieces.append(new)
        if hit:
            break
    assert hit and text == " the cat sat " and "".join(pieces) == text


def test_sampler():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9])
    assert sample_row(logits, 0.0, 1.0, 0, 1, 0) == 1
    assert sample_row(logits, 1.0, 1.0, 1, 1, 0) == 1  # top_k=1 is greedy
    assert sample_row(logits, 1.0, 1e-6, 0, 5, 3) == 1  # tiny top_p keeps only the best
    draws = [sample_row(logits, 1.0, 1.0, 2, 7, pos) for pos in range(200)]
    assert set(draws) == {1, 3}  # top_k=2 keeps the two best
    assert draws == [sample_row(logits, 1.0, 1.0, 2, 7, pos) for pos in range(200)]  # seeded


def test_a_tiny_positive_temperature_samples_greedily():
    """logits / 1e-38 overflows to inf and softmax of that is NaN: such a temperature is greedy."""
    logits = torch.tensor([0.0, 3.0, 1.0, 2.9, -1.0])
    for temperature in (1e-38, 1e-30, 1e-6):
        assert [sample_row(logits, temperature, 1.0, 0, 3, pos) for pos in range(20)] == [1] * 20


@pytest.mark.parametrize("kwargs,msg", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-1), "temperature"), (dict(top_p=0), "top_p"),
    (dict(top_k=-2), "top_k"), (dict(logprobs=21), "logprobs"), (dict(temperature=float("nan")), "temperature"),
    (dict(temperature=float("inf")), "temperature")])
def test_sampling_params_validation(kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        SamplingParams(**kwargs).validate()


def test_unsupported_architecture_is_named(tiny_gqa, tmp_path):
    import json
    import shutil

    from remp.config import ModelError

    model = tmp_path / "gpt2ish"
    shutil.copytree(tiny_gqa, model)
    cfg_file = model / "config.json"
    cfg_json = json.loads(cfg_file.read_text())
    cfg_json["architectures"] = ["FalconForCausalLM"]
    cfg_file.write_text(json.dumps(cfg_json))
    with pytest.raises(ModelError, match="unsupported architecture 'FalconForCausalLM'.*LlamaForCausalLM"):
        ModelConfig.from_pretrained(model)
    with pytest.raises(ModelError, match="no config.json"):
        ModelConfig.from_pretrained(tmp_path)


def test_scheduler_runs_a_cut_step_again():
    """A step cut short for a switch computed nothing the engine counts: a cut prompt is run
    again whole, a cut decode again with its last token, in the blocks they already hold."""
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=8, max_num_batched_tokens=64)
    a = _seq(0, 6)
    sched.add(a)
    prefill = sched.schedule(1)
    blocks = list(a.block_ids)
    assert not any(sched.step_done(x, cut=True) for x in prefill)
    again = sched.schedule(1)
    assert [(x.seq, x.start, len(x.token_ids)) for x in again] == [(a, 0, 6)] and a.block_ids == blocks
    assert all(sched.step_done(x) for x in again)
    a.output_token_ids.append(1)
    decode = sched.schedule(1)
    assert not any(sched.step_done(x, cut=True) for x in decode) and a.num_computed == 6
    assert [(x.seq, x.start, x.token_ids) for x in sched.schedule(1)] == [(a, 6, [1])]


def test_the_builder_thread_keeps_one_openmp_thread_when_a_commit_sets_more():
    """A commit on the main thread sets its step count (here 2) after the builder started: the
    builder's copies must stay on one thread, or its team spins against the steps' team."""
    before = torch.get_num_threads()
    pool = background_pool()
    try:
        pool.submit(lambda: None).result()  # the builder thread starts (at the first Prepare)
        use_threads(2)  # the commit of that layout, on the main thread
        counts = pool.submit(lambda: (torch.ones(64, 64).index_select(0, torch.arange(8)), torch.get_num_threads())[1])
        assert counts.result() == 1
        assert torch.get_num_threads() == 2
    finally:
        pool.shutdown()
        use_threads(before)


def test_every_group_of_a_pool_is_formed_with_the_world():
    """Groups are made when the world forms, never in a switch: every set of ranks some layout of
    the pool uses as a tensor-parallel group or as an expert-parallel stage is in the list, once."""
    from remp.parallel.groups import rank_sets

    sets = rank_sets(4)
    assert len(sets) == len(set(sets))
    for dp in range(1, 5):
        for tp in range(1, 4 // dp + 1):
            for pp in range(1, 4 // (dp * tp) + 1):
                topo = Topology(tp, pp, dp=dp)
                for stage in range(pp):
                    assert all(tuple(topo.tp_group_ranks(stage, d)) in sets for d in range(dp) if tp > 1)
                    assert dp * tp == 1 or tuple(topo.stage_ranks(stage)) in sets
    assert set(sets) == {(0, 1), (2, 3), (0, 1, 2), (0, 1, 2, 3)}


def _switch_host(sched: Scheduler, block_size: int):
    """An LLMEngine around `sched` alone (no workers, no model): enough for the methods a layout
    switch asks of the engine about requests and KV blocks."""
    from types import SimpleNamespace

    from remp.engine.llm_engine import LLMEngine

    engine = LLMEngine.__new__(LLMEngine)
    engine.config = SimpleNamespace(block_size=block_size, max_num_seqs=sched.max_num_seqs)
    engine.max_num_batched_tokens = sched.max_num_batched_tokens
    engine.schedulers = [sched]
    return engine


def _run_prompts(sched: Scheduler, *seqs: Sequence) -> None:
    for s in seqs:
        sched.add(s)
    for x in sched.schedule(1):
        sched.step_done(x)


def test_the_engine_names_the_kv_blocks_a_switch_copies_and_moves():
    """Each running request's blocks, how many are full (pre-copied) and their hand-out counts: a
    full block freed and handed out again since shows a new count (stale at the pause)."""
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64)
    engine = _switch_host(sched, 4)
    a, b, c = _seq(0, 9), _seq(1, 4), _seq(2, 5)
    _run_prompts(sched, a, b, c)  # a: blocks 0 1 | 2, b: 3 |, c: 4 | 5 (full | filling)
    assert engine.num_running() == 3 and sum(len(r.blocks) for r in engine.running_kv()) == 6 and engine.num_kv_blocks == 16
    kv = {r.request_id: (r.group, r.blocks, r.full, r.handouts) for r in engine.running_kv()}
    assert kv == {"r0": (0, (0, 1, 2), 2, (1, 1, 1)), "r1": (0, (3,), 1, (1,)), "r2": (0, (4, 5), 1, (1, 1))}
    sched.finish(b, "stop")  # block 3 goes to d: its pre-copy no longer holds d's KV
    a.output_token_ids.append(1)
    c.output_token_ids.append(1)
    _run_prompts(sched, _seq(3, 3))
    assert {r.request_id: r.handouts for r in engine.running_kv()}["r3"] == (2,)


def test_the_engine_adopts_a_placement_across_data_parallel_groups():
    """Two groups of 16 blocks become one of 8: every running request lands in group 0 with its
    placed ids, the rest is free with fresh hand-out counts, and a waiting request of the group
    that is gone moves too."""
    from remp.kv.placement import BlockSpace, place_requests

    g0 = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64)
    g1 = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64)
    engine = _switch_host(g0, 4)
    engine.schedulers = [g0, g1]
    a, b, c, d = _seq(0, 9), _seq(1, 4), _seq(2, 5), _seq(3, 3)
    _run_prompts(g0, a)  # a: 0 1 2
    for seq in (b, c, d):
        seq.group = 1
    _run_prompts(g1, b, c)  # b: 16+0, c: 16+1 16+2
    g1.add(d)
    running = engine.running_kv()
    assert [r.blocks for r in running] == [(0, 1, 2), (16,), (17, 18)]
    placement = place_requests(running, BlockSpace(16), BlockSpace(8), 2, 1)
    assert placement.groups == {0: 0, 1: 0, 2: 0} and not placement.overflow
    engine.adopt_placement(8, 1, placement)
    assert len(engine.schedulers) == 1 and engine.num_kv_blocks == 8
    assert (a.block_ids, b.block_ids, c.block_ids) == ([0, 1, 2], [3], [4, 5])
    assert [s.request_id for s in engine.scheduler.running] == ["r0", "r1", "r2"]
    assert [s.request_id for s in engine.scheduler.waiting] == ["r3"] and d.group == 0
    assert engine.scheduler.blocks.num_free == 2 and engine.scheduler.blocks.handouts(3) == 0


def test_the_engine_preempts_the_requests_a_switch_has_no_room_for():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64)
    engine = _switch_host(sched, 4)
    a, b, c = _seq(0, 9), _seq(1, 4), _seq(2, 5)
    _run_prompts(sched, a, b, c)
    assert engine.preempt_requests([2, 1]) == ["r2", "r1"]  # newest first, so the oldest waits first
    assert engine.num_running() == 1 and sum(len(r.blocks) for r in engine.running_kv()) == 3
    assert b.status is SeqStatus.WAITING and c.status is SeqStatus.WAITING
    assert [s.request_id for s in sched.waiting] == ["r1", "r2"]


def test_the_engine_pauses_and_resumes_admission():
    sched = Scheduler(BlockManager(16, 4), max_num_seqs=8, max_num_batched_tokens=64)
    engine = _switch_host(sched, 4)
    engine.pause_admission()
    sched.add(_seq(0, 3))
    assert sched.schedule(1) == [] and engine.num_running() == 0
    engine.resume_admission()
    assert len(sched.schedule(1)) == 1 and engine.num_running() == 1


def test_the_switch_reaches_the_engine_only_through_its_host_protocol():
    """Every member of SwitchHost exists on LLMEngine, and the transaction names neither the
    engine's module nor its scheduler."""
    import inspect

    import remp.reconfig.transaction as transaction
    from remp.engine.llm_engine import LLMEngine
    from remp.reconfig.host import SwitchHost

    members = [n for n, v in vars(SwitchHost).items() if callable(v) or isinstance(v, property)]
    members = [n for n in members if not n.startswith("_")]
    assert {"adopt_placement", "drain", "recover", "running_kv", "topology"} <= set(members)
    for name in members:
        assert isinstance(getattr(LLMEngine, name), type(vars(SwitchHost)[name])), name
    init = inspect.getsource(LLMEngine.__init__)
    assert all(f"self.{name} = " in init for name in SwitchHost.__annotations__)
    source = inspect.getsource(transaction)
    assert "llm_engine" not in source and "scheduler." not in source and "LLMEngine" not in source


REPLIES = [
    pytest.param(lambda m: m.Started(rank=0, pid=4242), id="Started"),
    pytest.param(lambda m: m.Prepared(rank=1, switch=3, standby=False, layout="dp2tp1pp1ep", weight_bytes=1024,
                                      build=m.BuildTimes(groups=0.001, shard=0.5, model=0.25, kv=0.125)),
                 id="Prepared"),
    pytest.param(lambda m: m.Prepared(rank=2, switch=3, standby=True), id="Prepared-standby"),
    pytest.param(lambda m: m.Precopied(rank=1, switch=3), id="Precopied"),
    pytest.param(lambda m: m.Committed(rank=1, switch=3, migrate_s=0.004, allocated_bytes=0), id="Committed"),
    pytest.param(lambda m: m.Aborted(rank=3), id="Aborted"),
    pytest.param(lambda m: m.Reformed(rank=0, formation=2), id="Reformed"),
    pytest.param(lambda m: m.Left(rank=0, formation=2), id="Left"),
    pytest.param(lambda m: m.Digest(rank=1, digests={"0/1/2": "ab12"}), id="Digest"),
    pytest.param(lambda m: m.WorkerFailed(rank=1, message="CommitCommand: RuntimeError: lost peer",
                                          traceback="Traceback ...", formation=2, switch=3), id="WorkerFailed"),
    pytest.param(lambda m: m.WorkerFailed(rank=1, message="RuntimeError: no model", traceback="Traceback ..."),
                 id="WorkerFailed-start-up"),
    pytest.param(lambda m: m.Heartbeat(rank=2, t=12.5, pid=4242), id="Heartbeat"),
]


@pytest.mark.parametrize("make", REPLIES)
def test_every_worker_reply_type_survives_the_wire(make):
    """Each reply travels as JSON tagged with its type and comes back equal, nested build times
    included; its kind names it in the executor's API."""
    import json

    from remp.executor import messages

    reply = make(messages)
    data = messages.encode(reply)
    assert json.loads(data)["t"] == type(reply).__name__
    back = messages.decode(data)
    assert type(back) is type(reply) and back == reply
    assert back.kind and "kind" not in json.loads(data)["b"]


def test_the_reply_kinds_are_distinct():
    from remp.executor import messages

    kinds = [cls.kind for cls in (messages.Started, messages.Prepared, messages.Precopied, messages.Committed,
                                  messages.Aborted, messages.Reformed, messages.Left, messages.Digest,
                                  messages.WorkerFailed, messages.Heartbeat)]
    assert len(set(kinds)) == len(kinds)


@pytest.mark.parametrize("data,error", [
    (b'{"t":"WorkerReply","b":{"rank":0,"kind":"started","message":"","info":{}}}',
     "unknown message type 'WorkerReply'"),
    (b'{"t":"Popen","b":{}}', "unknown message type 'Popen'"),
    (b'{"t":["Started"],"b":{}}', "unknown message type"),
    (b'{"t":"Started","b":{"rank":0}}', "malformed Started"),
    (b'{"t":"Aborted","b":{"rank":0,"extra":1}}', "malformed Aborted"),
    (b'[1, 2]', "not a message"),
    (b'not json', "not a message"),
])
def test_decode_rejects_what_is_not_a_message_of_the_protocol(data, error):
    from remp.executor.messages import MessageError, decode

    with pytest.raises(MessageError, match=error):
        decode(data)


def test_a_prepare_command_carries_every_field_of_the_layout():
    """The workers build the layout the engine names, expert mode, placement and dp included; a
    worker's answer naming another layout fails the switch (check_built)."""
    from remp.executor.local import WorkerError, check_built
    from remp.executor.messages import PrepareCommand, Prepared, decode, encode

    for topo in (Topology(2, 1, ep=True), Topology(1, 2, ep=True, dp=2, placement="round_robin"), Topology(2, 2)):
        cmd = decode(encode(PrepareCommand(layout=topo.as_dict(), num_blocks=8, block_size=16, switch_id=1)))
        assert Topology.from_dict(cmd.layout) == topo
    target = Topology(2, 1, ep=True)
    check_built(target, {0: Prepared(0, 1, False, "tp2pp1ep"), 2: Prepared(2, 1, True)})
    with pytest.raises(WorkerError, match="asked for tp2pp1ep, but rank 1 built tp2pp1"):
        check_built(target, {0: Prepared(0, 1, False, "tp2pp1ep"), 1: Prepared(1, 1, False, "tp2pp1")})


def test_a_precopy_command_names_the_blocks_its_pause_will_move():
    from remp.executor.messages import CommitCommand, KVMoveRows, PrecopyCommand, decode, encode

    move = KVMoveRows(transfers=[[0, 0, 1, 0, 0, 1]], src_blocks=[0, 1], dst_blocks=[3, 4])
    cmd = PrecopyCommand(moves=[move], switch_id=4, filling=[[2], []], pause_blocks=[3])
    assert decode(encode(cmd)) == cmd and decode(encode(cmd)).moves[0].dst_blocks == [3, 4]
    commit = CommitCommand(threads=1, switch_id=4, moves=[move])
    assert decode(encode(commit)) == commit


def test_a_commit_is_undone_by_an_abort_and_kept_by_a_confirm():
    """What a commit replaced (layout, loaded flag, thread count) is kept until the Confirm; an
    Abort before then goes back to it. The replies carry the command's switch."""
    from remp.executor.messages import Aborted, CommitCommand, Committed
    from remp.worker.worker import LayoutState, Worker

    worker = Worker.__new__(Worker)  # no model, no world: a commit with no KV to move needs neither
    worker.rank, worker.loaded, worker.previous, worker.pause_buffer, worker._pending_sends = 1, True, None, None, []
    old, new = LayoutState(Topology(1, 1), None, None), LayoutState(Topology(2, 1), None, None)
    before = torch.get_num_threads()
    try:
        use_threads(1)
        worker.layout, worker.target = old, new
        answer = worker.commit(CommitCommand(threads=2, switch_id=7))
        assert isinstance(answer, Committed) and (answer.rank, answer.switch, answer.allocated_bytes) == (1, 7, 0)
        assert worker.layout is new and worker.topo == Topology(2, 1) and worker.target is None
        assert torch.get_num_threads() == 2
        assert worker.abort() == Aborted(rank=1)
        assert worker.layout is old and worker.loaded and worker.previous is None
        assert torch.get_num_threads() == 1
        worker.target = new
        worker.commit(CommitCommand(threads=2, switch_id=8))
        worker.confirm()
        worker.abort()
        assert worker.layout is new and torch.get_num_threads() == 2
        worker.target, worker.loaded = None, False
        worker.commit(CommitCommand(threads=1, switch_id=9))  # no target: standby
        assert worker.layout is None and worker.model is None and worker.kv is None and worker.loaded
    finally:
        use_threads(before)


def test_host_info_names_the_cpu_and_its_relevant_flags():
    from pathlib import Path

    from remp.bench.host import FLAGS, host_info

    info = host_info()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    flags = set(next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split(":", 1)[1].split())
    assert info.cpu in cpuinfo and info.flags == tuple(f for f in FLAGS if f in flags)
    assert str(info).startswith(f"{info.cpu}, {info.cores} cores")
