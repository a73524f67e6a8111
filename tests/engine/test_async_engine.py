"""The async facade: streams, cancellation, overload, shutdown, step listeners, a failing step."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from server.engine import async_engine
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.engine.outputs import Delta, EngineError, EngineOverloaded, EngineStopped, Finished, StepStats
from server.engine.params import SamplingParams

LONG = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)


async def wait_for(predicate, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = asyncio.get_running_loop().time() + timeout
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_stream_cancel_overload_and_shutdown(tiny_checkpoint: Path) -> None:
    async def scenario() -> None:
        engine = AsyncEngine(EngineConfig(model=tiny_checkpoint, max_num_seqs=2, max_waiting=1))
        steps: list[StepStats] = []
        engine.add_step_listener(steps.append)
        engine.start()
        try:
            prompt = await engine.encode("def f():\n")
            events = [
                e async for e in engine.submit(prompt, SamplingParams(max_tokens=5, temperature=0), "a")
            ]
            assert isinstance(events[-1], Finished) and all(isinstance(e, Delta) for e in events[:-1])
            assert steps and any(s.decode_rows == 1 for s in steps) and steps[0].prefill_tokens == len(prompt)

            streams = [engine.submit(prompt, LONG, f"long{i}") for i in range(3)]
            with pytest.raises(EngineOverloaded):
                engine.submit(prompt, LONG, "one too many")

            async def consume(stream) -> None:  # type: ignore[no-untyped-def]
                async for _ in stream:
                    pass

            tasks = [asyncio.create_task(consume(s)) for s in streams]
            await wait_for(lambda: engine.stats().running == 2)
            for task in tasks:  # a client going away cancels its task: the request must be aborted
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await wait_for(lambda: engine.stats().kv_used_tokens == 0 and engine.stats().running == 0)
            assert await engine.drain(timeout=2)

            survivor = engine.submit(prompt, LONG, "cut by shutdown")
            engine.stop_admitting()
            with pytest.raises(EngineStopped):
                engine.submit(prompt, LONG, "too late")
            engine.abort_all("shutting down")
            with pytest.raises(EngineError, match="shutting down"):
                async for _ in survivor:
                    pass
        finally:
            engine.shutdown()
        assert not engine.is_ready

    asyncio.run(scenario())


def test_a_crashing_step_fails_its_requests_but_not_the_engine(tiny_checkpoint: Path) -> None:
    async def scenario() -> None:
        engine = AsyncEngine(EngineConfig(model=tiny_checkpoint))
        engine.start()
        try:
            runner = engine.core.runner
            execute = runner.execute

            def broken(step, proposals=None):  # type: ignore[no-untyped-def]
                runner.execute = execute  # fail once, then behave
                raise RuntimeError("injected")

            runner.execute = broken  # type: ignore[method-assign]
            with pytest.raises(EngineError, match="internal engine error"):
                async for _ in engine.submit([5, 6, 7], SamplingParams(max_tokens=3), "victim"):
                    pass
            events = [e async for e in engine.submit([5, 6, 7], SamplingParams(max_tokens=3), "next")]
            assert isinstance(events[-1], Finished) and events[-1].completion_tokens == 3
            assert engine.is_ready and engine.stats().kv_used_tokens == 0
        finally:
            engine.shutdown()

    asyncio.run(scenario())


def test_a_client_that_stops_reading_is_cut_and_frees_its_cache(tiny_checkpoint: Path) -> None:
    async def scenario() -> None:
        engine = AsyncEngine(EngineConfig(model=tiny_checkpoint, max_buffered_events=8))
        engine.start()
        try:
            stalled = engine.submit([5, 6, 7], LONG, "stalled")
            # Cut once 8 events wait unread: aborted, not kept running for its 400 tokens.
            await wait_for(lambda: engine.stats().steps >= 9 and engine.stats().running == 0)
            assert engine.stats().kv_used_tokens == 0 and engine.stats().steps < 20
            received = []
            with pytest.raises(EngineError, match="too far behind"):
                async for event in stalled:
                    received.append(event)
            assert len(received) == 8  # what fit in the buffer, then the error
            events = [e async for e in engine.submit([5, 6, 7], SamplingParams(max_tokens=3), "next")]
            assert isinstance(events[-1], Finished)
        finally:
            engine.shutdown()

    asyncio.run(scenario())


def test_a_failing_step_listener_or_inbox_never_kills_the_engine_thread(tiny_checkpoint: Path) -> None:
    async def scenario() -> None:
        engine = AsyncEngine(EngineConfig(model=tiny_checkpoint))
        engine.add_step_listener(lambda stats: 1 / 0)
        engine.start()
        try:
            events = [e async for e in engine.submit([5, 6, 7], SamplingParams(max_tokens=3), "a")]
            assert isinstance(events[-1], Finished)
            scheduler = engine.core.scheduler
            add = scheduler.add

            def broken_add(seq, front=False):  # type: ignore[no-untyped-def]
                scheduler.add = add  # fail once, while the inbox is being drained
                raise RuntimeError("injected")

            scheduler.add = broken_add  # type: ignore[method-assign]
            with pytest.raises(EngineError):
                async for _ in engine.submit([5, 6, 7], SamplingParams(max_tokens=3), "victim"):
                    pass
            events = [e async for e in engine.submit([5, 6, 7], SamplingParams(max_tokens=3), "b")]
            assert isinstance(events[-1], Finished) and engine.is_alive
        finally:
            engine.shutdown()

    asyncio.run(scenario())


def test_one_thread_builds_and_steps_the_core(tiny_checkpoint: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Loading, compiling and every step run on the engine thread, never the caller's: each thread
    that runs torch's parallel regions gets its own OpenMP pool, which slows them all. A core that
    fails to build raises in the caller, and an engine never started shuts down at once."""
    built_on: list[int] = []
    real_init = async_engine.LLMEngine.__init__

    def recording_init(self, config: EngineConfig) -> None:  # type: ignore[no-untyped-def]
        built_on.append(threading.get_ident())
        real_init(self, config)

    monkeypatch.setattr(async_engine.LLMEngine, "__init__", recording_init)

    async def scenario() -> None:
        engine = AsyncEngine(EngineConfig(model=tiny_checkpoint))
        assert not engine.is_ready  # built, not started
        stepped_on: set[int] = set()

        def on_step(_: StepStats) -> None:
            stepped_on.add(threading.get_ident())

        engine.add_step_listener(on_step)
        engine.start()
        try:
            prompt = await engine.encode("x = 1\n")
            async for _ in engine.submit(prompt, SamplingParams(max_tokens=3, temperature=0), "a"):
                pass
        finally:
            engine.shutdown()
        assert stepped_on == set(built_on) and threading.get_ident() not in stepped_on

    asyncio.run(scenario())
    with pytest.raises(ValueError, match="must be one of"):
        AsyncEngine(EngineConfig(model=tiny_checkpoint, speculative_method="nonsense"))
    idle = AsyncEngine(EngineConfig(model=tiny_checkpoint))
    idle.shutdown()
    assert not idle._thread.is_alive()
