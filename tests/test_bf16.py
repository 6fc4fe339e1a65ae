"""bfloat16 serving against transformers run in bfloat16, on every layout of a pool of 4.

bf16 arithmetic depends on the order of its sums (a tensor-parallel split reorders them), and
the tiny models' bf16 logits have exact top-2 ties, so token-for-token equality with one reference
run is not what bf16 can promise. What is checked, teacher-forced on remp's own output: at every
step, the token remp chose is transformers' greedy choice given the same prefix wherever
transformers' top-2 margin exceeds TOKEN_MARGIN, and the chosen token's log-probability is within
LOGPROB_TOL of transformers'. At tp1pp1 the prefill logits are transformers' to the bit.
"""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from remp.config import EngineConfig
from remp.engine.llm_engine import LLMEngine
from remp.engine.sampling import SamplingParams
from remp.topology import Topology

LAYOUTS = [Topology(1, 1), Topology(2, 1), Topology(1, 2), Topology(2, 2), Topology(4, 1), Topology(1, 4)]
PROMPTS = [[5, 17, 99, 3, 42], list(range(30, 71)), [400, 2, 250, 7, 7, 7, 19]]
MAX_TOKENS = 10
LOGPROB_TOL = 0.15  # bf16 keeps 8 bits of mantissa: logits of magnitude ~10 move by ~0.05 per rounding
TOKEN_MARGIN = 0.2  # two logits this far apart in transformers keep their order in remp


@pytest.fixture(scope="module")
def hf(tiny_gqa):
    return AutoModelForCausalLM.from_pretrained(tiny_gqa, dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def engine(tiny_gqa):
    eng = LLMEngine(EngineConfig(model=tiny_gqa, worker_pool_size=4, max_model_len=128, block_size=4,
                                 dtype="bfloat16", pack_weights=False))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def packed_engine(tiny_gqa):
    from remp.config import cpu_has_native_bf16
    from remp.layers.packed import packing_works

    if not (packing_works() and cpu_has_native_bf16()):
        pytest.skip("packing is the default only on CPUs with native bfloat16 (where F.linear is oneDNN's too)")
    eng = LLMEngine(EngineConfig(model=tiny_gqa, worker_pool_size=4, max_model_len=128, block_size=4,
                                 dtype="bfloat16", pack_weights=True))
    yield eng
    eng.shutdown()


def generate(engine: LLMEngine, tag: str) -> list:
    """PROMPTS, greedy with log-probabilities, to the end: their finished outputs in order."""
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=1)
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"{tag}-{i}", p, params)
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    return [done[f"{tag}-{i}"] for i in range(len(PROMPTS))]


@pytest.mark.parametrize("layout", [Topology(1, 1), Topology(2, 1), Topology(1, 2), Topology(2, 2)], ids=str)
def test_weights_packed_for_onednn_give_the_same_tokens_and_logprobs(engine, packed_engine, layout):
    """Packed (q/k/v and gate/up fused) linears compute what the unpacked views compute, to the bit."""
    engine.reconfigure(layout, lambda outs: None)
    packed_engine.reconfigure(layout, lambda outs: None)
    packed = [(o.token_ids, o.logprobs) for o in generate(packed_engine, f"packed-{layout}")]
    assert packed == [(o.token_ids, o.logprobs) for o in generate(engine, f"views-{layout}")]


@pytest.mark.parametrize("layout", LAYOUTS, ids=str)
def test_bf16_follows_transformers_bf16(engine, hf, layout):
    engine.reconfigure(layout, lambda outs: None)
    checked = 0
    for i, (p, out) in enumerate(zip(PROMPTS, generate(engine, str(layout)))):
        with torch.no_grad():
            logits = hf(torch.tensor([p + out.token_ids])).logits[0, len(p) - 1:-1].float()
        ref = torch.log_softmax(logits, -1)
        for step, (token, lps) in enumerate(zip(out.token_ids, out.logprobs)):
            top2 = logits[step].topk(2).values
            if top2[0] - top2[1] > TOKEN_MARGIN:
                assert token == int(logits[step].argmax()), (layout, i, step)
                checked += 1
            assert abs(lps[token] - float(ref[step, token])) < LOGPROB_TOL, (layout, i, step)
    assert checked >= len(PROMPTS) * MAX_TOKENS // 3  # the others are near-ties in bf16


def test_bf16_prefill_is_transformers_to_the_bit(tiny_gqa, hf):
    from remp.config import ModelConfig
    from remp.kv.cache import KVCache
    from remp.layers.batch import Batch
    from remp.models.registry import model_class
    from remp.parallel.context import ParallelContext
    from remp.weights.loader import load_weights
    from remp.weights.store import WeightStore

    cfg, topo = ModelConfig.from_pretrained(tiny_gqa), Topology(1, 1)
    model = model_class(cfg.architecture)(cfg, ParallelContext(topo, 0), cfg.hf_config())
    load_weights(model, WeightStore(tiny_gqa), torch.bfloat16, torch.device("cpu"))
    kv = KVCache(cfg, topo, 0, 16, 4, torch.bfloat16, torch.device("cpu"))
    prompt = PROMPTS[1]
    n = len(prompt)
    table = list(range(-(-n // 4)))
    batch = Batch(torch.tensor(prompt), torch.arange(n), torch.tensor([table[p // 4] * 4 + p % 4 for p in range(n)]),
                  4, [n], [0], [table], torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(model(batch, None, kv)[0], hf(torch.tensor([prompt])).logits[0, -1])
