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
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from sse_starlette import EventSourceResponse

from server.api import telemetry
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
    """Per-request bookkeeping: the response id, and what the metrics and the access line hear at the end."""

    def __init__(self, state: ServerState, request: Request, prefix: str) -> None:
        self.state = state
        self.access = telemetry.record_of(request)
        self.id = self.access.response_id(prefix)
        self.created = int(time.time())
        self.prompts: list[Any] = []
        self.outputs: dict[int, list[str]] = {}
        self.finish_reasons: list[str] = []
        self.group: RequestGroup | None = None
        self.num_choices = 0
        self.error: APIError | None = None
        self.ended = False

    def error_for(self, exc: BaseException) -> APIError:
        if not isinstance(exc, APIError | ParamError | EngineError | EngineOverloaded | EngineStopped):
            log.error("%s failed", self.id, exc_info=exc)
        error = exc if isinstance(exc, APIError) else from_engine_exception(exc)
        if self.state.draining and error.status == 500:
            error = APIError(503, f"the server is shutting down: {exc}", code="shutting_down")
        self.error = error
        return error

    def started(self, group: RequestGroup, num_choices: int) -> None:
        """The engine has the work: from here the request ends exactly once (`done` or `abandon`)."""
        self.group, self.num_choices = group, num_choices
        self.state.metrics.request_started()
        self.access.cleanup = self.abandon

    def record(self, index: int, text: str, finish_reason: str | None = None) -> None:
        if finish_reason is not None:
            self.finish_reasons.append(finish_reason)
        if self.state.settings.log_prompts:
            self.outputs.setdefault(index, []).append(text)

    def done(self, totals: Totals, outcome: str) -> None:
        """Count the end and fill the access line. `outcome`: "ok", "error NNN" or why it stopped."""
        if self.ended:
            return
        self.ended = True
        metrics = self.state.metrics
        result = "finished" if outcome == "ok" else "failed" if outcome.startswith("error") else "aborted"
        if self.group is not None:
            metrics.request_ended(result)
            for reason in self.finish_reasons:
                metrics.count_finish_reason(reason)
            unfinished = self.num_choices - len(self.finish_reasons)
            metrics.count_finish_reason("error" if result == "failed" else "abort", max(unfinished, 0))
        metrics.count_tokens(totals.prompt_tokens, totals.completion_tokens, totals.cached_tokens)
        for timings in totals.timings:
            metrics.observe_timings(timings)
        t = totals.timings_ms()
        self.access.fields.update(
            outcome=result,
            error=(self.error.code or str(self.error.status)) if self.error else None,
            prompt_tokens=totals.prompt_tokens,
            completion_tokens=totals.completion_tokens,
            cached_tokens=totals.cached_tokens,
            queue_ms=t["queue_time_ms"],
            ttft_ms=t["time_to_first_token_ms"],
            tpot_ms=t["time_per_token_ms"],
        )
        if self.state.settings.log_prompts:
            outputs = ["".join(parts) for _, parts in sorted(self.outputs.items())]
            self.access.fields.update(prompts=self.prompts, outputs=outputs)

    async def abandon(self) -> None:
        """Run after the response, however it ended: a request that never reached `done` (its stream
        never started, or its task was cancelled) counts as aborted, and its engine work is closed."""
        self.done(Totals(), "abandoned")
        if self.group is not None:
            await self.group.close()


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
        group = await RequestGroup.submit(engine, prompt_ids, params, call.id)
    except ParamError as exc:
        raise call.error_for(body.renamed(exc)) from None
    except Exception as exc:
        raise call.error_for(exc) from None
    call.started(group, len(prompt_ids) * params.n)
    return group


def _event_source(call: _Call, group: RequestGroup, fmt: StreamFormat) -> EventSourceResponse:
    return EventSourceResponse(
        event_stream(group, fmt, call.error_for, call.done),
        headers=STREAM_HEADERS,
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
        call.record(i, c.text, c.finish_reason)
    call.done(totals, "ok")
    return choices, totals


@router.post("/v1/completions")
async def completions(body: CompletionRequest, request: Request) -> Response:
    state = _state(request)
    state.check_model(body.model)
    params = body.sampling_params()
    prompts = body.prompts()
    call = _Call(state, request, "cmpl")
    group = await _start(state, call, body, params, prompts=prompts)
    want_logprobs = params.logprobs is not None
    base = {"id": call.id, "object": "text_completion", "created": call.created, "model": state.model_name}

    if body.stream:
        trackers: dict[int, LegacyLogprobs] = {}

        def choice(offset: int, delta: Delta) -> dict[str, Any] | None:
            if not delta.text and delta.finish_reason is None and not delta.logprobs:
                return None
            index = offset + delta.index
            call.record(index, delta.text, delta.finish_reason)
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
    return JSONResponse(payload, headers=totals.headers())


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
    state = _state(request)
    state.check_model(body.model)
    params = body.sampling_params()
    messages = body.chat_messages()
    call = _Call(state, request, "chatcmpl")
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
            call.record(delta.index, delta.text, delta.finish_reason)
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
    return JSONResponse(payload, headers=totals.headers())


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
        try:
            tokens = await state.engine.encode_chat(messages)
        except ValueError as exc:  # a chat template that refuses the messages: a 400, as for chat
            raise ParamError("messages", str(exc)) from None
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
async def health(request: Request) -> JSONResponse:
    """Liveness: the event loop answers and the engine thread is alive (readiness is /ready)."""
    if not _state(request).engine.is_alive:
        return JSONResponse({"status": "engine stopped"}, status_code=503)
    return JSONResponse({"status": "ok"})


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
