"""Incremental detokenisation with stop strings.

Each step re-decodes a request's output with a few prompt tokens in front (so tokenizers
that mark word starts, like SentencePiece's '▁', render the first output space) and
subtracts the decoded prefix. Text is held back while it ends in an incomplete UTF-8
character or in something that could still grow into a stop string, so a stream never
sends text that a later stop string would have cut.
"""
from __future__ import annotations

from dataclasses import dataclass

_PREFIX_TOKENS = 4


@dataclass
class DetokState:
    prefix_ids: list[int]
    prefix_text: str
    sent: int = 0  # characters already handed out


class Detokenizer:
    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def start(self, prompt_token_ids: list[int]) -> DetokState:
        prefix = prompt_token_ids[-_PREFIX_TOKENS:]
        return DetokState(prefix, self._decode(prefix))

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def update(self, state: DetokState, output_ids: list[int], stop: list[str],
               finished: bool) -> tuple[str, str, bool]:
        """(full visible text, new text since last call, stop string hit)."""
        full = self._decode(state.prefix_ids + output_ids)
        text = full[len(state.prefix_text):] if full.startswith(state.prefix_text) else self._decode(output_ids)
        hit = False
        for s in stop:
            idx = text.find(s, max(0, state.sent - len(s)))
            if idx != -1:
                text, hit = text[:idx], True
        visible = len(text)
        if not (hit or finished):
            if text.endswith("\ufffd"):
                visible = len(text.rstrip("\ufffd"))
            visible -= max((k for s in stop for k in range(1, len(s)) if text[:visible].endswith(s[:k])), default=0)
        visible = max(visible, state.sent)
        new = text[state.sent:visible]
        state.sent = visible
        return text[:visible], new, hit
