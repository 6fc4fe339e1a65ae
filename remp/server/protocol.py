"""Request and response bodies of the OpenAI-compatible API.

Field names, defaults and response shapes follow OpenAI's API and vLLM's server, so the
official clients and vLLM's benchmark tools work unchanged. Requests are read strictly:
nothing a client sends is silently ignored or reinterpreted. An unknown field, a boolean or
a string where a number belongs, NaN or infinity, text that is not valid Unicode (a lone
surrogate) — each is a 400 naming the field. Parameters of OpenAI's API that remp does not
implement (penalties, `logit_bias`, `echo`, `suffix`, `best_of`, `tools`, `response_format`)
are accepted only at their neutral value, and refused by name otherwise. remp returns one
choice per request, so `n` must be 1 and a prompt list holds one prompt.
"""
from __future__ import annotations

import time
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer, model_validator

from remp.engine.sampling import SamplingParams


def _now() -> int:
    return int(time.time())


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


# Read strictly: no coercion (true is not 1, "0.5" is not 0.5), no NaN or infinity, no field
# the model does not declare.
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


def check_text(text: str, what: str) -> str:
    """`text` if it can be encoded as UTF-8; a lone surrogate (JSON allows "\\ud800") cannot."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid Unicode: {exc.reason} at position {exc.start}") from None
    return text


class StreamOptions(BaseModel):
    model_config = _STRICT

    include_usage: bool = False


def _neutral_only(model: type, value: Any, name: str) -> Any:
    """`value` of the unsupported parameter `name` if it asks for nothing (model.UNSUPPORTED)."""
    if value is None or any(value == n and (type(value) is type(n) or isinstance(n, int) and type(value) is float)
                            for n in model.UNSUPPORTED[name]):
        return value
    raise ValueError(f"{name} is not supported by remp (got {value!r}); leave it out")


class _SamplingRequest(BaseModel):
    """Fields both generation endpoints share."""

    model_config = _STRICT

    # Parameters of OpenAI's API that remp does not implement, with the values that ask for
    # nothing (and so are accepted): any other value is refused by name, never ignored.
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {
        "presence_penalty": (0,), "frequency_penalty": (0,), "logit_bias": ({},), "repetition_penalty": (1,),
        "min_p": (0,), "min_tokens": (0,),
    }

    model: str
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extension (vLLM): 0 or -1 disables
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None  # extension (vLLM)
    ignore_eos: bool = False  # extension (vLLM)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # Not implemented (see UNSUPPORTED): declared so that a request using them gets a 400
    # saying so, and one sending the neutral value (as some clients always do) is served.
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    repetition_penalty: float | None = None  # extension (vLLM)
    min_p: float | None = None  # extension (vLLM)
    min_tokens: int | None = None  # extension (vLLM)

    @field_validator("model", "user")
    @classmethod
    def _unicode(cls, value: str | None, info) -> str | None:
        return value if value is None else check_text(value, info.field_name)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n must be 1 (remp returns one choice per request), got {n}")
        return n

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, stop: str | list[str] | None) -> str | list[str] | None:
        for text in [stop] if isinstance(stop, str) else stop or []:
            if not text:
                raise ValueError("a stop string must not be empty (it would end every request at once)")
            check_text(text, "a stop string")
        return stop

    @field_validator("presence_penalty", "frequency_penalty", "logit_bias", "repetition_penalty", "min_p",
                     "min_tokens")
    @classmethod
    def _refuse_unsupported(cls, value, info):
        return _neutral_only(cls, value, info.field_name)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=self.top_k or 0,
            seed=self.seed,
            stop=stop,
            stop_token_ids=list(self.stop_token_ids or []),
            ignore_eos=self.ignore_eos,
            logprobs=logprobs,
        )


class CompletionRequest(_SamplingRequest):
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {**_SamplingRequest.UNSUPPORTED, "echo": (False,), "suffix": ("",), "best_of": (1,)}

    # After validation `prompt` is a str or a list of token ids: a one-element batch is unwrapped.
    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = 16  # OpenAI's and vLLM's default for completions; null: the rest of the context
    logprobs: int | None = None
    echo: bool | None = None  # not implemented
    suffix: str | None = None  # not implemented
    best_of: int | None = None  # not implemented

    @field_validator("echo", "suffix", "best_of")
    @classmethod
    def _refuse_unsupported_here(cls, value, info):
        return _neutral_only(cls, value, info.field_name)

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) != 1:
                raise ValueError(f"remp takes one prompt per request, got {len(prompt)}")
            prompt = prompt[0]
        if isinstance(prompt, list) and not prompt:
            raise ValueError("the prompt is empty")
        if isinstance(prompt, str):
            check_text(prompt, "the prompt")
        return prompt

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = default_max_tokens if self.max_tokens is None else self.max_tokens
        return self._params(max_tokens, self.logprobs)


class TextContentPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str

    @field_validator("text")
    @classmethod
    def _unicode(cls, text: str) -> str:
        return check_text(text, "the text")


class ChatMessage(BaseModel):
    model_config = _STRICT

    # Fields of an assistant or tool message a client may send back as it got it: tool calls are
    # not implemented, so they are accepted only empty.
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {"tool_calls": ([],), "tool_call_id": (), "function_call": (),
                                               "refusal": (), "annotations": ([],), "audio": ()}

    role: str
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None
    function_call: dict[str, Any] | None = None
    refusal: str | None = None
    annotations: list[dict[str, Any]] | None = None
    audio: dict[str, Any] | None = None

    @field_validator(*UNSUPPORTED)
    @classmethod
    def _refuse_unsupported(cls, value, info):
        return _neutral_only(cls, value, info.field_name)

    @field_validator("role", "content", "name")
    @classmethod
    def _unicode(cls, value, info):
        return check_text(value, f"the message's {info.field_name}") if isinstance(value, str) else value

    def template_dict(self) -> dict:
        """The message as chat templates expect it: text parts joined into one string."""
        content = self.content
        if isinstance(content, list):
            content = "\n".join(part.text for part in content)
        message = {"role": self.role, "content": content or ""}
        if self.name is not None:
            message["name"] = self.name
        return message


class ChatCompletionRequest(_SamplingRequest):
    UNSUPPORTED: ClassVar[dict[str, tuple]] = {**_SamplingRequest.UNSUPPORTED, "tools": ([],), "tool_choice": ("none",),
                    "response_format": ({"type": "text"},)}

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None  # not implemented
    tool_choice: str | dict[str, Any] | None = None  # not implemented
    response_format: dict[str, Any] | None = None  # not implemented

    @field_validator("tools", "tool_choice", "response_format")
    @classmethod
    def _refuse_unsupported_here(cls, value, info):
        return _neutral_only(cls, value, info.field_name)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> "ChatCompletionRequest":
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs to be true")
        return self

    def sampling_params(self, default_max_tokens: int) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return self._params(default_max_tokens if max_tokens is None else max_tokens,
                            (self.top_logprobs or 0) if self.logprobs else None)


# responses: /v1/completions
class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """A whole completion, or (streaming) one chunk of it: OpenAI uses one shape for both."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


# responses: /v1/chat/completions
class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob]


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo


class DeltaMessage(BaseModel):
    role: str | None = None
    content: str | None = None

    @model_serializer(mode="wrap")
    def _drop_unset(self, handler):
        # OpenAI's deltas carry only what changed: the role once, then content.
        return {key: value for key, value in handler(self).items() if value is not None}


class ChatStreamChoice(BaseModel):
    index: int = 0
    delta: DeltaMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    choices: list[ChatStreamChoice]
    usage: UsageInfo | None = None


# responses: /v1/models
class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "remp"
    root: str
    parent: str | None = None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ReconfigureRequest(BaseModel):
    """POST /v1/admin/reconfigure: the target layout."""

    model_config = _STRICT

    tensor_parallel_size: int = Field(ge=1)
    pipeline_parallel_size: int = Field(ge=1)
    data_parallel_size: int = Field(default=1, ge=1)
    enable_expert_parallel: bool = False
    expert_placement_strategy: Literal["linear", "round_robin"] = "linear"
