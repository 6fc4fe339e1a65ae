"""Fast tests of the pure parts: topology, weight slicing, blocks, scheduler, detokeniser, sampler,
and the worker's thread settings."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer

from remp.config import ModelConfig
from remp.engine.detokenizer import Detokenizer
from remp.engine.outputs import RequestMetrics
from remp.engine.sampling import SamplingParams, sample_row
from remp.engine.scheduler import Scheduler, Sequence, SeqStatus
from remp.kv.blocks import BlockManager, OutOfBlocks
from remp.topology import Topology, TopologyError, split_range
from remp.weights.store import WeightStore
from remp.worker.worker import background_pool, use_threads

LAYOUTS = [(1, 1), (2, 1), (1, 2), (2, 2), (4, 1), (1, 4)]


@pytest.fixture(scope="module")
def cfg(tiny_gqa) -> ModelConfig:
    return ModelConfig.from_pretrained(tiny_gqa)


def test_split_range_is_balanced_and_contiguous():
    parts = [split_range(30, 4, i) for i in range(4)]
    assert [len(p) for p in parts] == [8, 8, 7, 7]
    assert [x for p in parts for x in p] == list(range(30))


def test_topology_ownership(cfg):
    t = Topology(2, 2)
    assert [t.coords(r) for r in range(5)] == [(0, 0), (0, 1), (1, 0), (1, 1), None]
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


def test_kv_head_divisibility_rule():
    import dataclasses
    base = dict(path="", architecture="LlamaForCausalLM", vocab_size=10, hidden_size=12, intermediate_size=8,
                num_layers=2, num_heads=12, num_kv_heads=4, head_dim=1, rms_norm_eps=1e-6,
                tie_word_embeddings=False, attention_bias=False, max_position_embeddings=8, torch_dtype="float32",
                eos_token_ids=())
    m = ModelConfig(**base)
    Topology(2, 1).validate(m, 8)
    Topology(12, 1).validate(m, 12)
    with pytest.raises(TopologyError, match="divide or be a multiple"):
        Topology(6, 1).validate(dataclasses.replace(m, num_kv_heads=4), 8)


@pytest.mark.parametrize("tp,pp", LAYOUTS)
def test_shards_reassemble_the_checkpoint(tiny_gqa, cfg, tp, pp):
    store, topo = WeightStore(tiny_gqa), Topology(tp, pp)
    shards = [store.shard(cfg, topo, r, torch.float32) for r in range(topo.world_size)]
    hd = cfg.head_dim
    for layer in range(cfg.num_layers):
        stage = topo.stage_of(layer, cfg.num_layers)
        ranks = topo.tp_group_ranks(stage)
        q = torch.cat([shards[r][f"{layer}.q"] for r in ranks])
        assert torch.equal(q, store.full(f"model.layers.{layer}.self_attn.q_proj.weight"))
        down = torch.cat([shards[r][f"{layer}.down"] for r in ranks], dim=1)
        assert torch.equal(down, store.full(f"model.layers.{layer}.mlp.down_proj.weight"))
        for i, r in enumerate(ranks):  # k/v: the rank's KV heads, replicated when tp > kv heads
            kv = topo.kv_heads_of(i, cfg.num_kv_heads)
            k = store.full(f"model.layers.{layer}.self_attn.k_proj.weight")[kv.start * hd:kv.stop * hd]
            assert torch.equal(shards[r][f"{layer}.k"], k)
        assert all(f"{layer}.q" not in shards[r] for r in range(topo.world_size) if r not in ranks)
    # Every shard tensor is a view of the mapped file (no copy), except LM-head/embedding rows
    # padded past the vocabulary.
    padded = {"embed", "lm_head"} if cfg.vocab_size % tp else set()
    assert all(store.maps(w) for s in shards for k, w in s.items() if k not in padded)
    head = torch.cat([shards[topo.rank(pp - 1, t)]["lm_head"] for t in range(tp)])[:cfg.vocab_size]
    assert torch.equal(head, store.full("lm_head.weight"))


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


def test_every_tensor_parallel_group_of_a_pool_is_formed_with_the_world():
    """Groups are made when the world forms, never in a switch: every set of ranks some layout of
    the pool uses as a tensor-parallel group is in the list, once."""
    from remp.parallel.groups import tp_rank_sets

    sets = tp_rank_sets(4)
    assert len(sets) == len(set(sets))
    for tp in range(1, 5):
        for pp in range(1, 4 // tp + 1):
            topo = Topology(tp, pp)
            assert all(tuple(topo.tp_group_ranks(stage)) in sets for stage in range(pp))
    assert {s for s in sets if len(s) > 1} == {(0, 1), (2, 3), (0, 1, 2), (0, 1, 2, 3)}
