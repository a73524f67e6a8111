"""One HTTP request's engine work: submit its prompts, read their streams as one, always close them.

A completions call with several prompts becomes one engine request per prompt; choice `j` of prompt
`i` is reported as index `i * n + j`. Whatever ends the HTTP side (success, error, client gone,
cancellation), `RequestGroup.close` aborts what is still running so its KV cache is freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import anyio

from server.api.errors import APIError
from server.api.schemas import usage
from server.engine.outputs import Delta, EngineError, Finished, Timings, TokenLogprob
from server.engine.params import SamplingParams

log = logging.getLogger("server.api")

DONE = b"data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> bytes:
    """One SSE event, pre-encoded (sse-starlette passes bytes through untouched)."""
    return b"data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


class RequestGroup:
    """The engine streams behind one HTTP request (one per prompt), read as a single event sequence."""

    def __init__(self, streams: list[Any], n: int) -> None:
        self.streams = streams
        self.n = n
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = False

    @classmethod
    async def submit(
        cls, engine: Any, prompts: list[list[int]], params: SamplingParams, request_id: str
    ) -> RequestGroup:
        """Submit every prompt, or none: if one is refused, those already queued are aborted."""
        group = cls([], params.n)
        try:
            for i, ids in enumerate(prompts):
                rid = request_id if len(prompts) == 1 else f"{request_id}-{i}"
                group.streams.append(engine.submit(ids, params, rid))
        except BaseException:
            await group.close()
            raise
        return group

    async def events(self) -> AsyncIterator[tuple[int, Delta | Finished]]:
        """(prompt index, event) pairs in the order the engine produces them."""
        if len(self.streams) == 1:  # the common case: no helper tasks, no extra queue hop
            async for event in self.streams[0]:
                yield 0, event
            return
        queue: asyncio.Queue[tuple[int, Delta | Finished | Exception | None]] = asyncio.Queue()

        async def pump(i: int, stream: Any) -> None:
            try:
                async for event in stream:
                    queue.put_nowait((i, event))
                queue.put_nowait((i, None))
            except Exception as exc:
                queue.put_nowait((i, exc))

        self._tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(self.streams)]
        remaining = len(self.streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item

    async def close(self) -> None:
        """Abort whatever still runs. Shielded: it must finish even when the caller is being cancelled."""
        if self._closed:
            return
        self._closed = True
        with anyio.CancelScope(shield=True):
            for task in self._tasks:
                task.cancel()
            if self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
            for stream in self.streams:
                try:
                    await stream.aclose()
                except Exception:  # closing must not mask the reason we are closing
                    log.exception("closing an engine stream failed")


@dataclass
class Choice:
    """Everything one choice produced, for a non-streaming response."""

    texts: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    @property
    def text(self) -> str:
        return "".join(self.texts)


@dataclass
class Totals:
    """Usage and timings summed over a request's prompts."""

    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0
    timings: list[Timings] = field(default_factory=list)

    def add(self, finished: Finished) -> None:
        if finished.error:
            raise EngineError(finished.error)
        self.prompt_tokens += finished.prompt_tokens
        self.completion_tokens += finished.completion_tokens
        self.cached_tokens += finished.cached_tokens
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
        names = {
            "queue_time_ms": "x-queue-time",
            "time_to_first_token_ms": "x-time-to-first-token",
            "time_per_token_ms": "x-time-per-token",
        }
        return {names[k]: f"{v:g}" for k, v in self.timings_ms().items() if v is not None}


async def collect(group: RequestGroup, num_choices: int) -> tuple[list[Choice], Totals]:
    """Run a request to the end (non-streaming). Raises EngineError if the engine failed it."""
    choices = [Choice() for _ in range(num_choices)]
    totals = Totals()
    try:
        async with contextlib.aclosing(group.events()) as events:
            async for i, event in events:
                if isinstance(event, Finished):
                    totals.add(event)
                    continue
                choice = choices[i * group.n + event.index]
                choice.texts.append(event.text)
                if event.logprobs:
                    choice.logprobs.extend(event.logprobs)
                if event.finish_reason is not None:
                    choice.finish_reason, choice.stop_reason = event.finish_reason, event.stop_reason
    finally:
        await group.close()
    return choices, totals


async def until_disconnected(receive: Callable[[], Any]) -> None:
    """Return when the client has gone (the body has been read already, so nothing else calls receive)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def collect_unless_disconnected(
    group: RequestGroup, num_choices: int, receive: Callable[[], Any]
) -> tuple[list[Choice], Totals] | None:
    """`collect`, but abort the engine work (and return None) if the client hangs up first."""
    work = asyncio.ensure_future(collect(group, num_choices))
    watcher = asyncio.ensure_future(until_disconnected(receive))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not work.done():
            work.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.gather(work, return_exceptions=True)
                await group.close()
    return work.result() if not work.cancelled() else None


@dataclass
class StreamFormat:
    """What differs between the completions and chat streams."""

    base: dict[str, Any]
    """id, object, created, model: copied into every chunk."""
    choice: Callable[[int, Delta], dict[str, Any] | None]
    """A Delta → the chunk's choice (None: nothing to send yet)."""
    prelude: list[dict[str, Any]] = field(default_factory=list)
    """Choices sent before any token (chat: each choice's role)."""
    include_usage: bool = False


async def event_stream(
    group: RequestGroup,
    fmt: StreamFormat,
    on_error: Callable[[BaseException], APIError],
    on_done: Callable[[Totals, str], None],
) -> AsyncIterator[bytes]:
    """SSE bytes for a request: one event per Delta as it arrives, usage, then [DONE].

    A failure mid-stream becomes an `{"error": ...}` event and [DONE]. However the stream ends, the
    engine requests are closed (a dropped client cancels this generator and lands in `finally`).
    """
    totals = Totals()
    extra = {"usage": None} if fmt.include_usage else {}
    outcome = "cancelled"
    try:
        for choice in fmt.prelude:
            yield sse({**fmt.base, "choices": [choice], **extra})
        async with contextlib.aclosing(group.events()) as events:
            async for i, event in events:
                if isinstance(event, Finished):
                    totals.add(event)
                    continue
                choice = fmt.choice(i * group.n, event)
                if choice is not None:
                    yield sse({**fmt.base, "choices": [choice], **extra})
        if fmt.include_usage:
            yield sse({**fmt.base, "choices": [], "usage": totals.usage(), "timings": totals.timings_ms()})
        outcome = "ok"
        yield DONE
    except Exception as exc:
        error = on_error(exc)
        outcome = f"error {error.status}"
        yield sse(error.body())
        yield DONE
    finally:
        await group.close()
        on_done(totals, outcome)


def now() -> int:
    return int(time.time())
