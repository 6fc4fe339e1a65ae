"""What the engine hands back to its callers for each request, step by step."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class RequestMetrics:
    """Wall-clock times (time.monotonic()) of one request's life."""

    arrival_time: float
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None


@dataclass
class RequestOutput:
    """State of one request after an engine step.

    `text` is the whole detokenised output so far with any stop string cut off and with
    characters held back that might still become a stop string or a multi-byte character;
    `new_text` and `new_token_ids` are what this step added (what a stream sends).
    """

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_text: str
    new_token_ids: list[int]
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" while finished
    logprobs: list[dict[int, float]] | None = None  # per token: top-N plus the chosen id
    metrics: RequestMetrics | None = None
    num_preemptions: int = 0
