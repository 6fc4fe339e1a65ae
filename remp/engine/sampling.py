"""Sampling parameters of one request and the sampler that applies them.

Sampling runs on the last pipeline stage.  A seeded request draws its noise from a
generator seeded with (seed, output position) rather than from a generator carried
between steps, so the tokens a request gets never depend on which worker sampled them
or on the layout the server had when it did: a request keeps its tokens across a
topology switch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

_MASK64 = (1 << 63) - 1
# A temperature below this samples greedily (as vLLM does): dividing the logits by it would
# overflow float32 to inf, and softmax of that is NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5


def is_greedy(temperature: float, top_k: int) -> bool:
    """Whether a row with these parameters takes its most likely token (no draw)."""
    return temperature < GREEDY_BELOW_TEMPERATURE or top_k == 1


@dataclass
class SamplingParams:
    """What the OpenAI API calls the sampling parameters (n=1)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: no top-k cut
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # top-N log-probabilities per generated token

    def validate(self) -> None:
        """Raise ValueError with the reason when a parameter is out of range."""
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a non-negative number, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (disabled) or at least 0, got {self.top_k}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs must be between 0 and 20, got {self.logprobs}")


def sample_row(logits: torch.Tensor, temperature: float, top_p: float, top_k: int,
               seed: int, position: int) -> int:
    """Draw one token id from one row of float32 logits.

    Gumbel-style sampling via exponential noise (argmax of p / E, E ~ Exp(1)) gives an
    exact draw from p with a single generator call per row.
    """
    if is_greedy(temperature, top_k):
        return int(torch.argmax(logits))
    scaled = logits / temperature
    if 0 < top_k < scaled.numel():
        kth = torch.topk(scaled, top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = torch.softmax(scaled, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        cumulative = torch.cumsum(sorted_probs, dim=-1)
        drop = cumulative - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs = sorted_probs.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    gen = torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + position) & _MASK64)
    noise = torch.empty(probs.shape, dtype=torch.float32).exponential_(generator=gen)
    return int(torch.argmax(probs.cpu() / noise))
