"""The OpenAI-compatible HTTP server.

Division of labour: the server tokenizes (chat template included), checks what belongs to
the API (model name, default lengths), formats and streams; the engine validates the
request against the context, detokenizes and applies stop conditions. Every engine
request is started, and its first output awaited, before the response begins, so a
request the engine refuses is a 400 and never an error inside a 200 stream.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import hmac
import itertools
import json
import logging
import os
import queue
import signal
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response, StreamingResponse
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.background import BackgroundTask
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from remp import __version__
from remp.engine.async_engine import EngineDeadError
from remp.executor.local import PoolLostError, WorkerError
from remp.engine.outputs import RequestOutput
from remp.policy.autoscaler import AutoReconfigurer
from remp.policy.policy import Policy
from remp.reconfig.transaction import ReconfigInProgress
from remp.server.metrics import ServerMetrics
from remp.topology import Topology
from remp.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    ChatStreamChoice,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DeltaMessage,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    ReconfigureRequest,
    TokenLogprob,
    TopLogprob,
    UsageInfo,
)

logger = logging.getLogger(__name__)


class APIError(Exception):
    """An error the client caused or should see, answered in OpenAI's error shape."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        # What the client sent may be quoted here, lone surrogates included: escape what UTF-8 cannot hold.
        self.info = ErrorInfo(message=_printable(message), type=type, param=param and _printable(param), code=code)

    def response(self) -> Response:
        return _json(ErrorResponse(error=self.info), self.status)


# What `remp serve` uses unless told otherwise (--max-request-bytes, --engine-stall-timeout).
DEFAULT_MAX_REQUEST_BYTES = 8 * 2**20
DEFAULT_STALL_TIMEOUT_S = 120.0
# Tokenizing happens on these many threads, each with a tokenizer of its own, never on the event loop.
TOKENIZER_THREADS = 2


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def build_app(engine, api_key: str | None = None, policy: Policy | None = None,
              policy_interval_s: float = 5.0, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
              stall_timeout_s: float = DEFAULT_STALL_TIMEOUT_S) -> FastAPI:
    """The FastAPI app serving `engine` (an AsyncEngine). With `api_key`, every route but /health
    and /metrics requires `Authorization: Bearer <api_key>`. A request body over
    `max_request_bytes` is refused (413) before it is parsed. /health answers 503 once the engine
    stopped or made no progress for `stall_timeout_s` (AsyncEngine.stalled); when the engine
    stops for good the server shuts down (`remp serve` then exits 1). With `policy`, the layout
    follows the load (`remp serve --auto-reconfigure`): the policy decides every `policy_interval_s`."""
    metrics = ServerMetrics(engine, engine.served_model_name)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        tasks = [asyncio.create_task(_stop_when_engine_stops(engine))]
        if policy is not None:
            scaler = AutoReconfigurer(engine, policy, policy_interval_s, metrics.record_decision,
                                      metrics.record_reconfiguration)
            tasks.append(asyncio.create_task(scaler.run()))
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    app = FastAPI(title="remp", version=__version__, lifespan=lifespan)
    server = _OpenAIServer(engine, metrics)
    app.add_middleware(_LimitBody, max_bytes=max_request_bytes)
    if api_key:  # added last, so it runs first: an unauthenticated client learns nothing else
        app.add_middleware(_RequireAPIKey, api_key=api_key)
    _add_error_handlers(app)

    @app.get("/health")
    async def health() -> Response:
        reason = engine.stalled(stall_timeout_s)
        if reason is None:
            return Response(status_code=200)
        return Response(json.dumps({"status": "unhealthy", "reason": reason}), status_code=503,
                        media_type="application/json")

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models() -> Response:
        card = ModelCard(id=engine.served_model_name, root=engine.config.model,
                         max_model_len=engine.max_model_len)
        return _json(ModelList(data=[card]))

    @app.get("/v1/admin/topology")
    async def topology() -> Response:
        topo, stats = engine.topology, engine.stats()
        pool = engine.config.pool_size
        return Response(json.dumps({
            **topo.as_dict(), "worker_pool_size": pool,
            "active_ranks": list(range(topo.world_size)), "standby_ranks": list(range(topo.world_size, pool)),
            "num_kv_blocks": stats.num_kv_blocks, "workers": engine.workers(),
            "worker_replacements": stats.num_worker_replacements,
            "worker_startup_s": list(engine.engine.executor.startup_s)}), media_type="application/json")

    @app.post("/v1/admin/reconfigure")
    async def reconfigure(body: ReconfigureRequest) -> Response:
        try:
            result = await engine.reconfigure(Topology.from_dict(body.model_dump()))
        except ReconfigInProgress as exc:
            raise APIError(409, str(exc), code="reconfiguration_in_progress") from None
        except ValueError as exc:  # TopologyError, or a KV cache too small for the target
            raise APIError(400, str(exc)) from None
        except PoolLostError as exc:  # the pool could not be rebuilt: the engine stopped
            raise EngineDeadError(f"the engine has stopped: {exc}") from None
        except WorkerError as exc:  # the rollback itself lost a worker; the engine replaces it next
            raise APIError(503, f"the switch failed and could not be rolled back cleanly ({exc}); the lost "
                                f"worker is being replaced on the old layout", type="service_unavailable",
                           code="worker_lost") from None
        metrics.record_reconfiguration(result)
        return Response(json.dumps(result.to_dict()), media_type="application/json")

    @app.post("/v1/admin/shutdown")
    async def shutdown() -> Response:
        """Stop the server as Ctrl-C does, once this reply is out: it takes no new connections,
        lets the requests it holds finish, then shuts the workers down and exits 0."""
        return Response(json.dumps({"status": "shutting down"}), media_type="application/json",
                        background=BackgroundTask(os.kill, os.getpid(), signal.SIGINT))

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request) -> Response:
        return await _cancel_on_disconnect(request, server.completion(body))

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> Response:
        return await _cancel_on_disconnect(request, server.chat(body))

    return app


class _OpenAIServer:
    """Turns API requests into engine requests and engine outputs into API responses."""

    def __init__(self, engine, metrics: ServerMetrics):
        self.engine = engine
        self.metrics = metrics
        # Copies: the engine thread detokenizes with its tokenizer while these encode, and a
        # Rust-backed tokenizer shared across threads can fail with "Already borrowed". One for
        # the event loop (decoding single tokens for logprobs), one per tokenizing thread.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self._tokenizers: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(TOKENIZER_THREADS):
            self._tokenizers.put(copy.deepcopy(engine.tokenizer))
        self._tokenizing = ThreadPoolExecutor(TOKENIZER_THREADS, thread_name_prefix="remp-tokenize")
        # No token covers more characters than the longest vocabulary entry, so a text longer than
        # this has more tokens than the context holds (x4: normalisation may merge characters).
        longest = max((len(t) for t in engine.tokenizer.get_vocab()), default=1)
        self.max_prompt_chars = 4 * longest * engine.max_model_len
        self.model_name: str = engine.served_model_name

    async def _tokenize(self, work: Callable[[Any], list[int]], chars: int, param: str) -> list[int]:
        """Run `work(tokenizer)` on a tokenizing thread: a long prompt stalls no other request.
        A text that cannot fit the context whatever its tokens is refused without tokenizing."""
        if chars > self.max_prompt_chars:
            raise APIError(400, f"This model's maximum context length is {self.engine.max_model_len} tokens. "
                                f"However, your request has {chars} characters of input, more than any "
                                f"{self.engine.max_model_len} tokens can hold. Please reduce the length of the input.",
                           param=param)

        def run() -> list[int]:
            tokenizer = self._tokenizers.get()
            try:
                return work(tokenizer)
            finally:
                self._tokenizers.put(tokenizer)

        return await asyncio.get_running_loop().run_in_executor(self._tokenizing, run)

    async def completion(self, req: CompletionRequest) -> Response:
        self._check_model(req.model)
        if isinstance(req.prompt, str):
            text = req.prompt
            prompt_ids = await self._tokenize(lambda tok: tok.encode(text), len(text), "prompt")
        else:
            prompt_ids = req.prompt
        params = req.sampling_params(self._tokens_left(prompt_ids, "prompt"))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        first, outputs = await self._start(prompt_ids, params, request_id)

        def response(choices: list[CompletionChoice], usage: UsageInfo | None = None) -> CompletionResponse:
            return CompletionResponse(id=request_id, model=self.model_name, choices=choices, usage=usage)

        if not req.stream:
            last = first
            async for last in outputs:
                pass
            logprobs = None if last.logprobs is None else self._completion_logprobs(last.token_ids, last.logprobs)
            choice = CompletionChoice(text=last.text, logprobs=logprobs, finish_reason=last.finish_reason)
            return _json(response([choice], _usage(last)))

        text_offset = 0

        def chunk(out: RequestOutput) -> CompletionResponse | None:
            nonlocal text_offset
            logprobs = None
            if out.logprobs is not None and out.new_token_ids:
                logprobs = self._completion_logprobs(out.new_token_ids, out.logprobs[-len(out.new_token_ids):],
                                                     text_offset)
                text_offset = logprobs.text_offset[-1] + len(logprobs.tokens[-1])
            if not (out.new_text or out.finished or logprobs):
                return None
            return response([CompletionChoice(text=out.new_text, logprobs=logprobs,
                                              finish_reason=out.finish_reason)])

        usage = (lambda last: response([], _usage(last))) if req.include_usage else None
        return _EventStream(_events(first, outputs, [], chunk, usage))

    async def chat(self, req: ChatCompletionRequest) -> Response:
        self._check_model(req.model)
        prompt_ids = await self._apply_chat_template(req)
        params = req.sampling_params(self._tokens_left(prompt_ids, "messages"))
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        first, outputs = await self._start(prompt_ids, params, request_id)
        top_n = req.top_logprobs or 0

        if not req.stream:
            last = first
            async for last in outputs:
                pass
            logprobs = None if last.logprobs is None else self._chat_logprobs(last.token_ids, last.logprobs, top_n)
            choice = ChatChoice(message=AssistantMessage(content=last.text), logprobs=logprobs,
                                finish_reason=last.finish_reason)
            return _json(ChatCompletionResponse(id=request_id, model=self.model_name, choices=[choice],
                                                usage=_usage(last)))

        def response(choices: list[ChatStreamChoice], usage: UsageInfo | None = None) -> ChatCompletionChunk:
            return ChatCompletionChunk(id=request_id, model=self.model_name, choices=choices, usage=usage)

        def chunk(out: RequestOutput) -> ChatCompletionChunk | None:
            logprobs = None
            if out.logprobs is not None and out.new_token_ids:
                logprobs = self._chat_logprobs(out.new_token_ids, out.logprobs[-len(out.new_token_ids):], top_n)
            if not (out.new_text or out.finished or logprobs):
                return None
            delta = DeltaMessage(content=out.new_text or None)
            return response([ChatStreamChoice(delta=delta, logprobs=logprobs, finish_reason=out.finish_reason)])

        role = response([ChatStreamChoice(delta=DeltaMessage(role="assistant", content=""))])
        usage = (lambda last: response([], _usage(last))) if req.include_usage else None
        return _EventStream(_events(first, outputs, [role], chunk, usage))

    # request preparation
    def _check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"The model `{name}` does not exist.", param="model", code="model_not_found")

    async def _apply_chat_template(self, req: ChatCompletionRequest) -> list[int]:
        messages = [m.template_dict() for m in req.messages]
        try:
            return list(await self._tokenize(
                lambda tok: tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                    return_dict=False),
                sum(len(m["content"]) for m in messages), "messages"))
        except (TemplateError, ValueError) as exc:
            raise APIError(400, f"cannot apply the chat template: {exc}", param="messages") from None

    def _tokens_left(self, prompt_ids: list[int], param: str) -> int:
        """Tokens left in the context after the prompt: the default for max_tokens."""
        left = self.engine.max_model_len - len(prompt_ids)
        if left < 1:
            raise APIError(400, f"This model's maximum context length is {self.engine.max_model_len} tokens. "
                                f"However, your request has {len(prompt_ids)} input tokens, which leaves no room "
                                f"for the completion. Please reduce the length of the input.", param=param)
        return left

    async def _start(self, prompt_ids: list[int], params,
                     request_id: str) -> tuple[RequestOutput, AsyncIterator[RequestOutput]]:
        """Submit a request and wait for its first output; a refusal becomes a 400."""
        outputs = self._generate(prompt_ids, params, request_id)
        try:
            first = await anext(outputs)
        except ValueError as exc:
            raise APIError(400, str(exc)) from None
        return first, outputs

    async def _generate(self, prompt_ids: list[int], params, request_id: str) -> AsyncIterator[RequestOutput]:
        """The engine's outputs for one request, counted in the metrics when it ends. Being
        cancelled (client gone while waiting) or closed early (client gone while sending)
        aborts the engine request and counts it as aborted."""
        stream = self.engine.generate(prompt_ids, params, request_id)
        last = None
        try:
            async for last in stream:
                if last.finished:
                    self.metrics.record(len(prompt_ids), last, last.finish_reason or "stop")
                yield last
        except (asyncio.CancelledError, GeneratorExit):
            if last is None or not last.finished:
                self.metrics.record(len(prompt_ids), last, "abort")
            raise
        finally:
            await stream.aclose()

    # response formatting
    def _token(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    def _completion_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]],
                             start: int = 0) -> CompletionLogprobs:
        tokens = [self._token(t) for t in token_ids]
        offsets = list(itertools.accumulate((len(t) for t in tokens), initial=start))[:-1]
        return CompletionLogprobs(
            tokens=tokens,
            token_logprobs=[lp[t] for t, lp in zip(token_ids, logprobs)],
            top_logprobs=[{self._token(i): v for i, v in _by_logprob(lp)} for lp in logprobs],
            text_offset=offsets,
        )

    def _chat_logprobs(self, token_ids: list[int], logprobs: list[dict[int, float]], top_n: int) -> ChatLogprobs:
        def entry(token_id: int, logprob: float) -> dict:
            token = self._token(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return ChatLogprobs(content=[
            TokenLogprob(**entry(t, lp[t]),
                         top_logprobs=[TopLogprob(**entry(i, v)) for i, v in _by_logprob(lp)[:top_n]])
            for t, lp in zip(token_ids, logprobs)
        ])


def _by_logprob(logprobs: dict[int, float]) -> list[tuple[int, float]]:
    return sorted(logprobs.items(), key=lambda item: item[1], reverse=True)


def _usage(out: RequestOutput) -> UsageInfo:
    prompt, completion = len(out.prompt_token_ids), len(out.token_ids)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _json(body: BaseModel, status: int = 200) -> Response:
    # pydantic rather than json.dumps: a -inf log-probability becomes null instead of an error.
    return Response(body.model_dump_json(), status_code=status, media_type="application/json")


def _event(body: BaseModel) -> str:
    return f"data: {body.model_dump_json()}\n\n"


async def _events(first: RequestOutput, outputs: AsyncIterator[RequestOutput], head: list[BaseModel],
                  chunk: Callable[[RequestOutput], BaseModel | None],
                  usage: Callable[[RequestOutput], BaseModel] | None) -> AsyncIterator[str]:
    """The SSE body: `head`, a chunk per output that has something to say, the usage chunk
    when asked for, then `[DONE]`. Once streaming has begun an error can only be reported
    inside the stream, as vLLM does."""
    last = first
    try:
        for body in head:
            yield _event(body)
        if (body := chunk(first)) is not None:
            yield _event(body)
        async for last in outputs:
            if (body := chunk(last)) is not None:
                yield _event(body)
        if usage is not None:
            yield _event(usage(last))
    except Exception as exc:
        logger.exception("stream failed")
        yield _event(ErrorResponse(error=ErrorInfo(message=str(exc), type="server_error")))
    finally:
        await outputs.aclose()
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """A server-sent-event response that closes its generator as soon as sending stops
    (client gone), so the engine request is aborted at once rather than whenever the
    generator is garbage-collected. The close is shielded from the cancellation that
    stopped the sending, so the abort runs to completion."""

    media_type = "text/event-stream"

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def _cancel_on_disconnect(request: Request, work: Awaitable[Response]) -> Response:
    """Run a handler, cancelling it (and so aborting its engine request) if the client goes
    away first; Starlette does not watch for that outside streaming responses."""
    handler = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({handler, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not handler.done():
        handler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await handler
        return Response(status_code=499)  # nginx's "client closed request", for the access log
    return handler.result()


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _stop_when_engine_stops(engine, poll_s: float = 0.5) -> None:
    """Shut the server down (as Ctrl-C does) once the engine loop has stopped for good — a pool
    that could not be rebuilt — rather than answer 503 forever: `remp serve` then exits 1, and a
    supervisor (systemd, Kubernetes) restarts it."""
    while engine.alive:
        await asyncio.sleep(poll_s)
    logger.critical("the engine has stopped (%s); shutting the server down", engine.error)
    os.kill(os.getpid(), signal.SIGINT)


class _LimitBody:
    """ASGI middleware: a request body over `max_bytes` is answered 413 before anything parses it
    — at once when Content-Length says so, else as soon as that many bytes have arrived."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(scope, receive, send)
            return
        if declared is not None:
            await self.app(scope, receive, send)
            return
        # No length given (chunked): read the body here, up to the limit, and replay it.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._refuse(scope, receive, send)
                return
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, scope, receive, send) -> None:
        error = APIError(413, f"the request body is larger than {self.max_bytes} bytes "
                              f"(--max-request-bytes)", code="request_too_large")
        await error.response()(scope, receive, send)


class _RequireAPIKey:
    """ASGI middleware: every route needs `Authorization: Bearer <key>` except /health and
    /metrics, which stay open for probes and scrapers, as in vLLM (/docs and /openapi.json
    need it too: send the header). Checked before the body is read, so an unauthenticated
    client learns nothing about request validation."""

    OPEN = ("/health", "/metrics")

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"] not in self.OPEN:
            given = Headers(scope=scope).get("authorization", "").encode("latin-1")
            if not hmac.compare_digest(given, self.expected):
                error = APIError(401, "Incorrect or missing API key: send `Authorization: Bearer <key>`.",
                                 code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    """Every error in OpenAI's shape; request validation is a 400 (FastAPI says 422)."""

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> Response:
        messages, params = [], []
        for err in exc.errors():
            loc = ".".join(str(part) for part in err["loc"] if part != "body")
            if err["type"] == "json_invalid":
                msg, loc = f"invalid JSON body: {err.get('ctx', {}).get('error', err['msg'])}", ""
            else:
                msg = err["msg"].removeprefix("Value error, ")
            messages.append(f"{loc}: {msg}" if loc else msg)
            if loc:
                params.append(loc)
        return APIError(400, "; ".join(dict.fromkeys(messages)), param=params[0] if params else None).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        return APIError(exc.status_code, str(exc.detail)).response()

    @app.exception_handler(EngineDeadError)
    async def engine_dead(request: Request, exc: EngineDeadError) -> Response:
        return APIError(503, str(exc), type="service_unavailable", code="engine_stopped").response()

    @app.exception_handler(Exception)
    async def server_error(request: Request, exc: Exception) -> Response:
        return APIError(500, f"internal server error: {exc}", type="server_error").response()
