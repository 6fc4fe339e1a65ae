"""Offline generation: `LLM(config).generate(prompts, params)`, all prompts batched together."""
from __future__ import annotations

from remp.config import EngineConfig
from remp.engine.llm_engine import LLMEngine
from remp.engine.outputs import RequestOutput
from remp.engine.sampling import SamplingParams


class LLM:
    def __init__(self, config: EngineConfig):
        self.engine = LLMEngine(config)
        self.tokenizer = self.engine.tokenizer

    def generate(self, prompts: list[str | list[int]], params: SamplingParams) -> list[RequestOutput]:
        ids = [p if isinstance(p, list) else self.tokenizer.encode(p) for p in prompts]
        for i, prompt in enumerate(ids):
            self.engine.add_request(f"offline-{i}", prompt, params)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[f"offline-{i}"] for i in range(len(ids))]

    def shutdown(self) -> None:
        self.engine.shutdown()
