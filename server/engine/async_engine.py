"""The async facade the HTTP layer talks to: the engine core on its own thread.

New requests and aborts go through an inbox drained at the top of each step; events reach each
request's asyncio.Queue with one `call_soon_threadsafe` per step. The event loop never waits for the
model.

The engine thread also builds the core (loading, compiling and warming up the model), so that one
thread only ever runs torch's parallel regions. Each thread that does gets its own OpenMP pool, and
once the pools hold more threads than there are CPUs, libgomp stops spinning between regions:
stepping from a second thread measured 15-30% slower per token on the 2-core box.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from server.engine.config import EngineConfig
from server.engine.core import LLMEngine, Output
from server.engine.outputs import (
    Delta,
    EngineError,
    EngineOverloaded,
    EngineStats,
    EngineStopped,
    Finished,
    StepStats,
    Timings,
)
from server.engine.params import ParamError, SamplingParams
from server.engine.sequence import Request
from server.engine.structured import CompiledGrammar, Constraint

log = logging.getLogger("server.engine")


class RequestStream:
    """Async iterator over one request's events; closing it early aborts the request."""

    def __init__(self, engine: AsyncEngine, request: Request, events: asyncio.Queue[Any]) -> None:
        self._engine = engine
        self._request = request
        self._events = events
        self._done = False

    def __aiter__(self) -> AsyncIterator[Delta | Finished]:
        return self

    async def __anext__(self) -> Delta | Finished:
        if self._done:
            raise StopAsyncIteration
        try:
            item = await self._events.get()
        except asyncio.CancelledError:
            self.abort()
            raise
        if isinstance(item, Finished):
            self._done = True
        elif isinstance(item, Exception):
            self._done = True
            raise item
        return item

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._engine._post(("abort", self._request))

    async def aclose(self) -> None:
        self.abort()


class AsyncEngine:
    """The engine as the HTTP layer sees it: submit, stream, abort, stats. See module docstring."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self._built = threading.Event()
        self._go = threading.Event()
        self._build_error: BaseException | None = None
        self.core: LLMEngine  # built by the engine thread
        self._thread = threading.Thread(target=self._thread_main, name="engine", daemon=True)
        self._thread.start()
        self._built.wait()
        if self._build_error is not None:
            raise self._build_error
        self.tokenizer = self.core.tokenizer
        self.model_config = self.core.model_config
        self.max_model_len = self.core.max_model_len
        self.vocab_size = self.tokenizer.vocab_size
        self.sampling_defaults = self.core.sampling_defaults
        self.declares_chat = self.tokenizer.declares_chat
        self.kv_capacity_tokens = self.core.kv_capacity_tokens
        self.num_parameters = self.core.num_parameters
        self.dtype = str(self.core.dtype).removeprefix("torch.")
        self.weights = self.core.weights
        self.device = str(self.core.device)
        self.decode_path = self.core.runner.path
        self.speculation = self.core.speculator.description if self.core.speculator else "no speculation"
        self._inbox: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._active = 0
        self._admitting = True
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stats = self.core.stats()
        self._step_listeners: list[Callable[[StepStats], None]] = []

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None:
        """Call `listener` on the engine thread after every step (metrics); it must be quick."""
        self._step_listeners.append(listener)

    def add_compile_listener(self, listener: Callable[[float], None]) -> None:
        """Call `listener` with the seconds of each grammar compile (from a compile thread)."""
        self.core.grammars.listeners.append(listener)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        """Begin stepping, delivering events to the running event loop."""
        self._loop = asyncio.get_running_loop()
        self._go.set()

    @property
    def is_ready(self) -> bool:
        return self._loop is not None and self._thread.is_alive() and not self._stopping

    @property
    def is_alive(self) -> bool:
        """False once the engine thread has ended: requests could only hang (liveness fails)."""
        return self._loop is None or self._thread.is_alive() or self._stopping

    def stop_admitting(self) -> None:
        self._admitting = False

    async def drain(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while self._active and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return self._active == 0

    def abort_all(self, reason: str) -> None:
        self._post(("abort_all", reason))

    def shutdown(self) -> None:
        self._stopping = True
        self._wake.set()
        self._go.set()  # a thread never started ends at once
        self.core.grammars.shutdown()
        self._thread.join(timeout=10)

    # -- requests ------------------------------------------------------------------------------

    async def encode(
        self, text: str, parse_special: bool = False, add_special_tokens: bool = False
    ) -> list[int]:
        """`Tokenizer.encode` in a worker thread (by default special-token text is text)."""
        return await asyncio.to_thread(self.tokenizer.encode, text, parse_special, add_special_tokens)

    async def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        parse_special: bool = False,
        add_special_tokens: bool = False,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]:
        """`Tokenizer.encode_chat` in a worker thread (only the template makes special tokens)."""
        return await asyncio.to_thread(
            self.tokenizer.encode_chat,
            messages,
            add_generation_prompt,
            parse_special,
            add_special_tokens,
            tools,
        )

    async def decode(self, ids: list[int]) -> str:
        return await asyncio.to_thread(self.tokenizer.decode, ids)

    async def compile_grammar(self, constraint: Constraint) -> CompiledGrammar:
        """Compile `constraint` in the compile pool (or take it from the cache), within the time limit.

        Raises ParamError for a constraint that cannot be compiled or takes too long; a slow compile
        holds only the requests that wait for it.
        """
        future = asyncio.wrap_future(self.core.grammars.submit(constraint))
        # asyncio.wait, not wait_for: a timeout must not cancel the compile others may share.
        await asyncio.wait({future}, timeout=self.config.grammar_compile_timeout)
        if not future.done():
            raise ParamError(
                constraint.param,
                f"{constraint.param}: compiling this constraint took longer than "
                f"{self.config.grammar_compile_timeout:g} s; simplify it",
            )
        return future.result()

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        grammar: CompiledGrammar | None = None,
    ) -> RequestStream:
        """Validate and enqueue; raises ParamError, EngineOverloaded or EngineStopped at once.

        `grammar` (from `compile_grammar`) constrains every choice's output.
        """
        if not self._admitting or self._loop is None:
            raise EngineStopped("the server is shutting down")
        max_tokens = self.core.validate(prompt_ids, params)
        with self._lock:
            if self._active >= self.config.max_num_seqs + self.config.max_waiting:
                raise EngineOverloaded("the server is overloaded; retry shortly")
            self._active += 1
        events: asyncio.Queue[Any] = asyncio.Queue()
        request = Request(
            request_id=request_id,
            prompt_ids=list(prompt_ids),
            params=params,
            max_tokens=max_tokens,
            sink=events,
            timings=Timings(arrival=time.monotonic()),
            grammar=grammar,
        )
        self._post(("add", request))
        return RequestStream(self, request, events)

    def stats(self) -> EngineStats:
        return self._stats

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished or aborted, those the engine thread has not picked up
        included: what `--max-num-seqs` plus `--max-waiting` bounds (`stats()` lags it by a step)."""
        return self._active

    # -- the engine thread ---------------------------------------------------------------------

    def _post(self, message: tuple[str, Any]) -> None:
        self._inbox.put(message)
        self._wake.set()

    def _finished(self) -> None:
        with self._lock:
            self._active -= 1

    def _drain_inbox(self) -> list[Output]:
        outputs: list[Output] = []
        while True:
            try:
                kind, payload = self._inbox.get_nowait()
            except queue.Empty:
                return outputs
            if kind == "add":
                self.core.add(payload)
            elif kind == "abort" and not payload.done:
                self.core.abort(payload)
                self._finished()
            elif kind == "abort_all":
                outputs.extend(self.core.fail_all(payload))

    def _deliver(self, outputs: list[Output]) -> None:
        for _, item in outputs:
            if isinstance(item, Finished | EngineError):
                self._finished()
        assert self._loop is not None
        limit = self.config.max_buffered_events

        def put_all() -> None:
            for request, item in outputs:
                if request.cut:
                    continue
                if request.sink.qsize() >= limit and isinstance(item, Delta):
                    # The client stopped reading: cut the request rather than buffer without bound.
                    request.cut = True
                    request.sink.put_nowait(EngineError("the client fell too far behind its stream"))
                    self._post(("abort", request))
                    continue
                request.sink.put_nowait(item)

        self._loop.call_soon_threadsafe(put_all)

    def _notify(self, stats: StepStats) -> None:
        for listener in self._step_listeners:
            try:
                listener(stats)
            except Exception:  # a metrics glitch must not fail requests
                log.exception("step listener failed")

    def _thread_main(self) -> None:
        """Build the core, wait for `start`, then step until shutdown: all on this one thread."""
        try:
            self.core = LLMEngine(self.config)
        except BaseException as exc:  # re-raised by __init__ on the caller's thread
            self._build_error = exc
            return
        finally:
            self._built.set()
        self._go.wait()
        self._run()

    def _run(self) -> None:
        while not self._stopping:
            outputs: list[Output] = []
            try:
                outputs = self._drain_inbox()
                if not outputs and not self.core.has_work:
                    self._stats = self.core.stats()
                    self._wake.wait()
                    self._wake.clear()
                    continue
                self.core.last_step = None
                outputs.extend(self.core.step())
                if self.core.last_step is not None:
                    self._notify(self.core.last_step)
            except Exception:  # a bug must not kill the engine thread: fail what was in flight, go on
                log.exception("engine step failed; failing the requests in flight")
                outputs.extend(self.core.fail_all("internal engine error"))
            self._stats = self.core.stats()
            if outputs:
                self._deliver(outputs)
