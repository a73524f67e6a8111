"""One HTTP generation request, from submission to its single end.

`GenerationRequest.start` tokenizes (in worker threads) and submits every prompt before any response
starts, so a refusal up to there gets a real status code. The route then returns `response(...)`: an
ASGI response that streams (SSE, one event per engine Delta) or collects, and whose one `finally`
closes the engine work and records the metrics and the access line, exactly once, however the request
ends (success, engine error, client gone, cancellation).

A completions call with several prompts becomes one engine request per prompt; choice `j` of prompt
`i` is reported as index `i * n + j`.

Timing headers (TGI's x-queue-time, x-time-to-first-token, x-time-per-token, in ms) are on non-streaming
responses only: a stream's headers leave before its first token. Streams report the same figures as a
`timings` object on the final usage chunk (`stream_options.include_usage`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import anyio
from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sse_starlette import EventSourceResponse
from starlette.types import Receive, Scope, Send

from server.api import telemetry
from server.api.errors import APIError, from_engine_exception
from server.api.schemas import Tokenization, usage
from server.api.state import EngineClient, EngineStream, ServerState
from server.api.structured import Structured
from server.engine.outputs import (
    Delta,
    EngineError,
    EngineOverloaded,
    EngineStopped,
    Finished,
    Timings,
    TokenLogprob,
)
from server.engine.params import ParamError, SamplingParams

log = logging.getLogger("server.api")

PING_SECONDS = 15
"""SSE keep-alive comment interval: under common proxy idle timeouts (60 s), rare enough to cost nothing."""
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
TIMING_HEADERS = {
    "queue_time_ms": "x-queue-time",
    "time_to_first_token_ms": "x-time-to-first-token",
    "time_per_token_ms": "x-time-per-token",
}
"""TGI's timing headers, by the figure each carries."""
DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    """One SSE event, pre-encoded (sse-starlette passes bytes through untouched)."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


@dataclass
class Choice:
    """Everything one choice produced, for a non-streaming response."""

    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list[TokenLogprob] | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)

    def add(self, delta: Delta) -> None:
        self.texts.append(delta.text)
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finish_reason is not None:
            self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason


@dataclass
class Totals:
    """Usage and timings summed over a request's prompts."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    draft_tokens: int = 0
    accepted_tokens: int = 0
    timings: list[Timings] = field(default_factory=list)

    def add(self, finished: Finished) -> None:
        self.prompt_tokens += finished.prompt_tokens
        self.completion_tokens += finished.completion_tokens
        self.cached_tokens += finished.cached_tokens
        self.draft_tokens += finished.draft_tokens
        self.accepted_tokens += finished.accepted_tokens
        self.timings.append(finished.timings)

    def usage(self) -> dict[str, Any]:
        return usage(self.prompt_tokens, self.completion_tokens, self.cached_tokens)

    def timings_ms(self) -> dict[str, float | None]:
        """TGI's timing figures in milliseconds; over several prompts, the slowest (mean for per-token)."""
        queue = [t.queue_time for t in self.timings]
        ttft = [t.time_to_first_token for t in self.timings if t.time_to_first_token is not None]
        tpot = [t.time_per_output_token for t in self.timings if t.time_per_output_token is not None]

        def ms(values: list[float], mean: bool = False) -> float | None:
            if not values:
                return None
            return round(1000 * (sum(values) / len(values) if mean else max(values)), 3)

        return {
            "queue_time_ms": ms(queue),
            "time_to_first_token_ms": ms(ttft),
            "time_per_token_ms": ms(tpot, mean=True),
        }

    def headers(self) -> dict[str, str]:
        return {TIMING_HEADERS[k]: f"{v:g}" for k, v in self.timings_ms().items() if v is not None}


class Formatter(Protocol):
    """What differs between the completions and chat responses: each choice's shape, streamed or not."""

    object: str
    """The response body's `object`."""
    chunk_object: str
    """Each stream chunk's `object`."""

    def prelude(self) -> list[dict[str, Any]]:
        """Stream choices sent before any token (chat: each choice's role)."""
        ...

    def chunk_choice(self, index: int, delta: Delta) -> dict[str, Any] | None:
        """A Delta → the chunk's choice (None: nothing to send yet)."""
        ...

    def body_choice(self, index: int, choice: Choice) -> dict[str, Any]:
        """A finished choice → its entry in a non-streaming response."""
        ...


class _Served(Response):
    """The ASGI response of a GenerationRequest: the request's own run, from first byte to its end."""

    background = None

    def __init__(self, run: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self._run = run

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._run(scope, receive, send)


async def encode(
    engine: EngineClient,
    how: Tokenization,
    prompt: str | list[dict[str, Any]],
    tools: list[dict[str, Any]] | None = None,
) -> list[int]:
    """A text prompt's or a chat's (messages, and the tools its template renders) token ids under `how`:
    generation and /tokenize alike.

    The tokenizer's own refusals (a chat template that refuses the messages) are 400s.
    """
    try:
        if isinstance(prompt, str):
            return await engine.encode(prompt, how.parse_special, how.add_special_tokens)
        return await engine.encode_chat(
            prompt, how.add_generation_prompt, how.parse_special, how.add_special_tokens, tools
        )
    except ValueError as exc:
        raise APIError(400, str(exc), param="prompt" if isinstance(prompt, str) else "messages") from None


async def _until_disconnected(receive: Receive) -> None:
    """Return when the client has gone (the body has been read already, so nothing else calls receive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


class GenerationRequest:
    """One completions or chat request: tokenize, submit, stream or collect, then end once."""

    def __init__(self, state: ServerState, http: Request, prefix: str, params: SamplingParams) -> None:
        self.state = state
        self.params = params
        self.access = telemetry.record_of(http)
        self.id = self.access.response_id(prefix)
        self.created = int(time.time())
        self.prompts: list[Any] = []
        """What the client sent, for the access line under --log-prompts."""
        self.streams: list[EngineStream] = []
        self._pumps: list[asyncio.Task[None]] = []
        self.totals = Totals()
        self.finish_reasons: list[str] = []
        self.outputs: dict[int, list[str]] = {}
        self.error: APIError | None = None
        self.outcome = "cancelled"
        """"ok", "error NNN", or why it stopped; what the metrics and the access line hear."""

    @classmethod
    async def start(
        cls,
        state: ServerState,
        http: Request,
        prefix: str,
        params: SamplingParams,
        tokenization: Tokenization,
        *,
        prompts: list[str | list[int]] | None = None,
        messages: list[dict[str, Any]] | None = None,
        renamed: Callable[[ParamError], ParamError] = lambda exc: exc,
        tools: list[dict[str, Any]] | None = None,
        structured: Structured | None = None,
    ) -> GenerationRequest:
        """Compile any grammar, tokenize and submit every prompt (or none); each refusal here is a
        proper HTTP error.

        `renamed` gives a ParamError out of the engine the name the client's request used; `tools` go
        to the chat template; `structured` constrains every choice (compiled off the event loop, or
        taken from the engine's cache).
        """
        if state.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")
        self = cls(state, http, prefix, params)
        engine = state.engine
        grammar = None if structured is None else await engine.compile_grammar(structured.constraint)
        if messages is not None:
            self.prompts = messages
            prompt_ids = [await encode(engine, tokenization, messages, tools)]
        else:
            self.prompts = prompts or []
            texts = [p for p in self.prompts if isinstance(p, str)]
            encoded = iter(await asyncio.gather(*(encode(engine, tokenization, t) for t in texts)))
            prompt_ids = [next(encoded) if isinstance(p, str) else p for p in self.prompts]
        try:
            for i, ids in enumerate(prompt_ids):
                rid = self.id if len(prompt_ids) == 1 else f"{self.id}-{i}"
                self.streams.append(engine.submit(ids, params, rid, grammar=grammar))
        except Exception as exc:
            await self._close()  # all or none: those already queued are aborted
            raise self._error_for(renamed(exc) if isinstance(exc, ParamError) else exc) from None
        state.metrics.request_started()
        if structured is not None:
            state.metrics.count_structured(structured.kind)
        return self

    @property
    def num_choices(self) -> int:
        return len(self.streams) * self.params.n

    def response(self, fmt: Formatter, stream: bool, include_usage: bool = False) -> Response:
        """The response that runs this request to its end; the route returns it as it is."""

        async def run(scope: Scope, receive: Receive, send: Send) -> None:
            try:
                if stream:
                    events = EventSourceResponse(
                        self._sse(fmt, include_usage), headers=STREAM_HEADERS, ping=PING_SECONDS, sep="\n"
                    )
                    await events(scope, receive, send)
                else:
                    whole = await self._respond_whole(fmt, receive)
                    await whole(scope, receive, send)
            finally:
                self._account()  # first, no await before it: a client that has its answer sees it counted
                await self._close()

        return _Served(run)

    # -- the engine's events -----------------------------------------------------------------------

    async def _events(self) -> AsyncIterator[tuple[int, Delta | Finished]]:
        """(prompt index, event) pairs in the order the engine produces them."""
        if len(self.streams) == 1:  # the common case: no helper tasks, no extra queue hop
            async for event in self.streams[0]:
                yield 0, event
            return
        queue: asyncio.Queue[tuple[int, Delta | Finished | Exception | None]] = asyncio.Queue()

        async def pump(i: int, stream: EngineStream) -> None:
            try:
                async for event in stream:
                    queue.put_nowait((i, event))
                queue.put_nowait((i, None))
            except Exception as exc:
                queue.put_nowait((i, exc))

        self._pumps = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        remaining = len(self.streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item

    async def _close(self) -> None:
        """Abort whatever still runs. Shielded: it must finish even when the caller is being cancelled."""
        with anyio.CancelScope(shield=True):
            for task in self._pumps:
                task.cancel()
            if self._pumps:
                await asyncio.gather(*self._pumps, return_exceptions=True)
            for stream in self.streams:
                try:
                    await stream.aclose()
                except Exception:  # closing must not mask the reason we are closing
                    log.exception("closing an engine stream failed")

    def _record(self, index: int, text: str, finish_reason: str | None) -> None:
        if finish_reason is not None:
            self.finish_reasons.append(finish_reason)
        if self.state.settings.log_prompts:
            self.outputs.setdefault(index, []).append(text)

    def _error_for(self, exc: BaseException) -> APIError:
        if not isinstance(exc, APIError | ParamError | EngineError | EngineOverloaded | EngineStopped):
            log.error("%s failed", self.id, exc_info=exc)
        error = exc if isinstance(exc, APIError) else from_engine_exception(exc)
        if self.state.draining and error.status == 500:
            error = APIError(503, f"the server is shutting down: {exc}", code="shutting_down")
        self.error = error
        return error

    # -- streamed --------------------------------------------------------------------------------

    def _chunk(self, fmt: Formatter) -> dict[str, Any]:
        model = self.state.model_name
        return {"id": self.id, "object": fmt.chunk_object, "created": self.created, "model": model}

    async def _sse(self, fmt: Formatter, include_usage: bool) -> AsyncIterator[bytes]:
        """SSE bytes: one event per Delta as it arrives, usage, then [DONE].

        A failure mid-stream becomes an `{"error": ...}` event and [DONE]. A dropped client cancels
        this generator; the response's `finally` closes the engine work.
        """
        base = self._chunk(fmt)
        extra = {"usage": None} if include_usage else {}
        try:
            for choice in fmt.prelude():
                yield sse({**base, "choices": [choice], **extra})
            async with contextlib.aclosing(self._events()) as events:
                async for i, event in events:
                    if isinstance(event, Finished):
                        self.totals.add(event)
                        continue
                    index = i * self.params.n + event.index
                    self._record(index, event.text, event.finish_reason)
                    choice = fmt.chunk_choice(index, event)
                    if choice is not None:
                        yield sse({**base, "choices": [choice], **extra})
            if include_usage:
                totals = self.totals
                yield sse({**base, "choices": [], "usage": totals.usage(), "timings": totals.timings_ms()})
            self.outcome = "ok"
            yield DONE
        except Exception as exc:
            error = self._error_for(exc)
            self.outcome = f"error {error.status}"
            yield sse(error.body())
            yield DONE

    # -- collected ---------------------------------------------------------------------------------

    async def _collect(self) -> tuple[list[Choice], Totals]:
        choices = [Choice() for _ in range(self.num_choices)]
        totals = Totals()
        async with contextlib.aclosing(self._events()) as events:
            async for i, event in events:
                if isinstance(event, Finished):
                    totals.add(event)
                else:
                    choices[i * self.params.n + event.index].add(event)
        return choices, totals

    async def _collect_unless_disconnected(self, receive: Receive) -> tuple[list[Choice], Totals] | None:
        """The whole result, or None if the client hung up first (the engine work is then cancelled)."""
        work = asyncio.ensure_future(self._collect())
        watcher = asyncio.ensure_future(_until_disconnected(receive))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watcher.cancel()
            if not work.done():
                work.cancel()
                with anyio.CancelScope(shield=True):
                    await asyncio.gather(work, return_exceptions=True)
        return work.result() if not work.cancelled() else None

    async def _respond_whole(self, fmt: Formatter, receive: Receive) -> Response:
        try:
            result = await self._collect_unless_disconnected(receive)
        except Exception as exc:
            error = self._error_for(exc)
            self.outcome = f"error {error.status}"
            return error.response()
        if result is None:
            self.outcome = "client disconnected"
            return Response(status_code=499)
        choices, self.totals = result
        for i, c in enumerate(choices):
            self._record(i, c.text, c.finish_reason)
        self.outcome = "ok"
        payload = {
            **self._chunk(fmt),
            "object": fmt.object,
            "choices": [fmt.body_choice(i, c) for i, c in enumerate(choices)],
            "usage": self.totals.usage(),
            "system_fingerprint": None,
        }
        return JSONResponse(payload, headers=self.totals.headers())

    # -- the end -----------------------------------------------------------------------------------

    def _account(self) -> None:
        """Count the end in the metrics and fill the access line (called once, from the response)."""
        metrics, totals = self.state.metrics, self.totals
        outcome = self.outcome
        result = "finished" if outcome == "ok" else "failed" if outcome.startswith("error") else "aborted"
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
            spec_acceptance=totals.accepted_tokens / totals.draft_tokens if totals.draft_tokens else None,
        )
        if self.state.settings.log_prompts:
            outputs = ["".join(parts) for _, parts in sorted(self.outputs.items())]
            self.access.fields.update(prompts=self.prompts, outputs=outputs)
