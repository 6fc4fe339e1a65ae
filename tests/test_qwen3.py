"""A family added as one file: Qwen3 serves transformers-exact greedy tokens and log-probabilities
under tensor and pipeline parallelism, and its requests keep their tokens across live switches."""
from __future__ import annotations

import pytest

from remp.config import EngineConfig
from remp.engine.llm_engine import LLMEngine
from remp.engine.sampling import SamplingParams
from remp.topology import Topology
import helpers
from helpers import transformers_greedy

PROMPTS = [[5, 17, 99, 3, 42], list(range(30, 71)), [400, 2, 250, 7, 7, 7, 19]]
MAX_TOKENS = 10
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, logprobs=3)


@pytest.fixture(scope="module")
def reference(tiny_qwen3):
    return transformers_greedy(tiny_qwen3, PROMPTS, MAX_TOKENS)


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    eng = LLMEngine(EngineConfig(dtype="float32", model=tiny_qwen3, worker_pool_size=2, max_model_len=128, block_size=4))
    yield eng
    eng.shutdown()


def generate(engine: LLMEngine, tag: str, switch_to: list[Topology] = ()) -> list:
    """Run PROMPTS to the end; with `switch_to`, switch live to each layout in turn, two steps apart."""
    outs, results = helpers.generate(engine, PROMPTS, GREEDY, tag, switch_to, start=2, every=2)
    assert all(r.precopied_kv_blocks + r.live_kv_blocks > 0 for r in results)
    return outs


@pytest.mark.parametrize("layout", [Topology(1, 1), Topology(2, 1), Topology(1, 2)], ids=str)
def test_qwen3_matches_transformers(engine, reference, layout):
    engine.reconfigure(layout, lambda outs: None)
    for out, (tokens, logits) in zip(generate(engine, f"{layout}-"), reference):
        assert out.token_ids == tokens
        for step, ref in zip(out.logprobs, logits):
            for token, logprob in step.items():
                assert abs(logprob - float(ref[token])) < 1e-4


def test_qwen3_keeps_its_tokens_across_live_switches(engine, reference):
    engine.reconfigure(Topology(1, 1), lambda outs: None)
    outs = generate(engine, "switch-", [Topology(2, 1), Topology(1, 2), Topology(1, 1)])
    assert [o.token_ids for o in outs] == [tokens for tokens, _ in reference]
    assert engine.topology == Topology(1, 1)
