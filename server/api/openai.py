"""The HTTP routes: OpenAI's /v1 API, vLLM's /tokenize and /detokenize, and health probes.

Each generation route validates the body (pydantic, then SamplingParams), tokenizes off the event
loop, and calls `engine.submit` before any response starts, so an error found up to that point gets a
real status code. Streaming answers through sse-starlette, one event per engine Delta.

Timing headers (TGI's x-queue-time, x-time-to-first-token, x-time-per-token, in ms) are on non-streaming
responses only: a stream's headers leave before its first token. Streams report the same figures as a
`timings` object on the final usage chunk (`stream_options.include_usage`).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from server.api.errors import APIError, from_engine_exception
from server.api.generation import (
    Choice,
    RequestGroup,
    StreamFormat,
    Totals,
    collect_unless_disconnected,
    event_stream,
)
from server.api.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    LegacyLogprobs,
    TokenizeRequest,
    chat_logprobs,
)
from server.engine.outputs import Delta, EngineError, EngineOverloaded, EngineStopped
from server.engine.params import ParamError, SamplingParams

if TYPE_CHECKING:
    from server.api.app import ServerState

log = logging.getLogger("server.api")
router = APIRouter()

PING_SECONDS = 15
"""SSE keep-alive comment interval: under common proxy idle timeouts (60 s), rare enough to cost nothing."""
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _state(request: Request) -> ServerState:
    return request.app.state.server


class _Call:
    """Per-request bookkeeping: id, timing and the one log line written when it ends."""

    def __init__(self, state: ServerState, prefix: str, route: str) -> None:
        self.state = state
        self.id = f"{prefix}-{uuid.uuid4().hex}"
        self.route = route
        self.created = int(time.time())
        self.start = time.monotonic()
        self.prompts: list[Any] = []
        self.outputs: dict[int, list[str]] = {}

    def error_for(self, exc: BaseException) -> APIError:
        if not isinstance(exc, APIError | ParamError | EngineError | EngineOverloaded | EngineStopped):
            log.error("%s failed", self.id, exc_info=exc)
        error = exc if isinstance(exc, APIError) else from_engine_exception(exc)
        if self.state.draining and error.status == 500:
            return APIError(503, f"the server is shutting down: {exc}", code="shutting_down")
        return error

    def record(self, index: int, text: str) -> None:
        if self.state.settings.log_prompts:
            self.outputs.setdefault(index, []).append(text)

    def done(self, totals: Totals, outcome: str) -> None:
        t = totals.timings_ms()
        log.info(
            "%s %s %s: %d prompt + %d completion tokens (%d cached), queue %s ms, ttft %s ms, "
            "%s ms/token, %.1f ms total",
            self.id, self.route, outcome, totals.prompt_tokens, totals.completion_tokens,
            totals.cached_tokens, t["queue_time_ms"], t["time_to_first_token_ms"], t["time_per_token_ms"],
            1000 * (time.monotonic() - self.start),
        )  # fmt: skip
        if self.state.settings.log_prompts:
            outputs = {i: "".join(parts) for i, parts in sorted(self.outputs.items())}
            log.info("%s prompts=%r outputs=%r", self.id, self.prompts, outputs)


async def _start(
    state: ServerState,
    call: _Call,
    body: CompletionRequest | ChatCompletionRequest,
    params: SamplingParams,
    prompts: list[str | list[int]] | None = None,
    messages: list[dict[str, str]] | None = None,
) -> RequestGroup:
    """Tokenize (in worker threads) and submit; every refusal here is a proper HTTP error."""
    if state.draining:
        raise APIError(503, "the server is shutting down", code="shutting_down")
    engine = state.engine
    try:
        if messages is not None:
            call.prompts = messages
            prompt_ids = [await engine.encode_chat(messages)]
        else:
            call.prompts = prompts or []
            encoded = await asyncio.gather(*(engine.encode(p) for p in call.prompts if isinstance(p, str)))
            texts = iter(encoded)
            prompt_ids = [next(texts) if isinstance(p, str) else p for p in call.prompts]
    except ValueError as exc:  # the tokenizer's own errors (a chat template that refuses the messages)
        raise APIError(400, str(exc), param="messages" if messages is not None else "prompt") from None
    try:
        return await RequestGroup.submit(engine, prompt_ids, params, call.id)
    except ParamError as exc:
        raise call.error_for(body.renamed(exc)) from None
    except Exception as exc:
        raise call.error_for(exc) from None


def _event_source(call: _Call, group: RequestGroup, fmt: StreamFormat) -> EventSourceResponse:
    return EventSourceResponse(
        event_stream(group, fmt, call.error_for, call.done),
        headers={**STREAM_HEADERS, "x-request-id": call.id},
        ping=PING_SECONDS,
        sep="\n",
    )


async def _finish(
    request: Request, call: _Call, group: RequestGroup, num_choices: int
) -> tuple[list[Choice], Totals] | Response:
    try:
        result = await collect_unless_disconnected(group, num_choices, request.receive)
    except Exception as exc:
        error = call.error_for(exc)
        call.done(Totals(), f"error {error.status}")
        raise error from None
    if result is None:
        call.done(Totals(), "client disconnected")
        return Response(status_code=499)
    choices, totals = result
    for i, c in enumerate(choices):
        call.record(i, c.text)
    call.done(totals, "ok")
    return choices, totals


def _headers(call: _Call, totals: Totals) -> dict[str, str]:
    return {"x-request-id": call.id, **totals.headers()}


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    state.check_model(body.model)
    params = body.sampling_params()
    prompts = body.prompts()
    call = _Call(state, "cmpl", "completions")
    group = await _start(state, call, body, params, prompts=prompts)
    want_logprobs = params.logprobs is not None
    base = {"id": call.id, "object": "text_completion", "created": call.created, "model": state.model_name}

    if body.stream:
        trackers: dict[int, LegacyLogprobs] = {}

        def choice(offset: int, delta: Delta) -> dict[str, Any] | None:
            if not delta.text and delta.finish_reason is None and not delta.logprobs:
                return None
            index = offset + delta.index
            call.record(index, delta.text)
            logprobs = None
            if want_logprobs:
                logprobs = trackers.setdefault(index, LegacyLogprobs()).render(delta.logprobs or [])
            return {
                "index": index,
                "text": delta.text,
                "logprobs": logprobs,
                "finish_reason": delta.finish_reason,
                "stop_reason": delta.stop_reason,
            }

        return _event_source(call, group, StreamFormat(base, choice, include_usage=body.include_usage))

    result = await _finish(request, call, group, len(prompts) * params.n)
    if isinstance(result, Response):
        return result
    choices, totals = result
    out = [
        {"index": i, "text": c.text,
         "logprobs": LegacyLogprobs().render(c.logprobs) if want_logprobs else None,
         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        for i, c in enumerate(choices)
    ]  # fmt: skip
    payload = {**base, "choices": out, "usage": totals.usage(), "system_fingerprint": None}
    return JSONResponse(payload, headers=_headers(call, totals))


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    state.check_model(body.model)
    params = body.sampling_params()
    messages = body.chat_messages()
    call = _Call(state, "chatcmpl", "chat")
    group = await _start(state, call, body, params, messages=messages)
    want_logprobs = params.logprobs is not None
    base = {
        "id": call.id,
        "object": "chat.completion.chunk",
        "created": call.created,
        "model": state.model_name,
    }

    if body.stream:

        def choice(offset: int, delta: Delta) -> dict[str, Any] | None:
            if not delta.text and delta.finish_reason is None and not delta.logprobs:
                return None
            call.record(delta.index, delta.text)
            return {
                "index": offset + delta.index,
                "delta": {"content": delta.text} if delta.text else {},
                "logprobs": chat_logprobs(delta.logprobs or []) if want_logprobs else None,
                "finish_reason": delta.finish_reason,
                "stop_reason": delta.stop_reason,
            }

        prelude = [
            {
                "index": j,
                "delta": {"role": "assistant", "content": ""},
                "logprobs": None,
                "finish_reason": None,
            }
            for j in range(params.n)
        ]
        fmt = StreamFormat(base, choice, prelude=prelude, include_usage=body.include_usage)
        return _event_source(call, group, fmt)

    result = await _finish(request, call, group, params.n)
    if isinstance(result, Response):
        return result
    choices, totals = result
    out = [
        {"index": i, "message": {"role": "assistant", "content": c.text},
         "logprobs": chat_logprobs(c.logprobs) if want_logprobs else None,
         "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
        for i, c in enumerate(choices)
    ]  # fmt: skip
    payload = {**base, "object": "chat.completion", "choices": out, "usage": totals.usage(),
               "system_fingerprint": None}  # fmt: skip
    return JSONResponse(payload, headers=_headers(call, totals))


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    return {"object": "list", "data": [_state(request).model_card()]}


@router.get("/v1/models/{model:path}")
async def get_model(model: str, request: Request) -> dict[str, Any]:
    state = _state(request)
    state.check_model(model)
    return state.model_card()


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    state = _state(request)
    if body.model is not None:
        state.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise ParamError("prompt", "give exactly one of prompt and messages")
    if body.messages is not None:
        if not body.messages:
            raise ParamError("messages", "messages must not be empty")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text(i)}
                    for i, m in enumerate(body.messages)]  # fmt: skip
        tokens = await state.engine.encode_chat(messages)
    else:
        assert body.prompt is not None
        tokens = await state.engine.encode(body.prompt)
    return {"count": len(tokens), "max_model_len": state.engine.max_model_len, "tokens": tokens}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    state = _state(request)
    if body.model is not None:
        state.check_model(body.model)
    vocab = state.engine.tokenizer.vocab_size
    bad = next((t for t in body.tokens if not 0 <= t < vocab), None)
    if bad is not None:
        raise ParamError("tokens", f"token id {bad} is outside the vocabulary (size {vocab})")
    return {"prompt": await state.engine.decode(body.tokens)}


@router.get("/health")
async def health() -> dict[str, str]:
    """Liveness: the event loop answers. Says nothing about the engine (see /ready)."""
    return {"status": "ok"}


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """Readiness: weights loaded, engine thread stepping, and not shutting down."""
    state = _state(request)
    status = state.readiness()
    return JSONResponse(
        {"status": status, "model": state.model_name}, status_code=200 if status == "ready" else 503
    )


@router.get("/stats")
async def stats(request: Request) -> dict[str, Any]:
    """The engine's live numbers (queue lengths, KV use), for tests, dashboards and load balancers."""
    state = _state(request)
    s = state.engine.stats()
    return {
        "running": s.running,
        "waiting": s.waiting,
        "kv_total_tokens": s.kv_total_tokens,
        "kv_used_tokens": s.kv_used_tokens,
        "kv_usage": s.kv_usage,
        "prefix_cache_hit_tokens": s.prefix_cache_hit_tokens,
        "steps": s.steps,
        "status": state.readiness(),
    }
