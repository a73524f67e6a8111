"""The app in-process over a scripted engine: failures the real engine only shows under rare conditions
(an error mid-stream, a full queue, a template that refuses the messages) still reach the client right."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from server.api.app import create_app
from server.engine.outputs import Delta, EngineError, EngineOverloaded, EngineStats, Finished, Timings
from server.engine.params import SamplingParams
from server.settings import parse_settings


class FakeStream:
    def __init__(self, events: list[Any]) -> None:
        self.events = list(events)
        self.closed = False

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        await asyncio.sleep(0)
        if not self.events:
            raise StopAsyncIteration
        item = self.events.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    async def aclose(self) -> None:
        self.closed = True


class FakeEngine:
    model_name = "fake"
    max_model_len = 64
    is_ready = True

    def __init__(self) -> None:
        self.script: list[Any] | Exception = []
        self.streams: list[FakeStream] = []
        self.tokenizer = type("Tok", (), {"vocab_size": 100})()

    def start(self) -> None: ...
    def stop_admitting(self) -> None: ...
    def abort_all(self, reason: str) -> None: ...
    def shutdown(self) -> None: ...
    def add_step_listener(self, listener: Any) -> None: ...

    async def drain(self, timeout: float) -> bool:
        return True

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 64, 0, 0, 0)

    async def encode(self, text: str) -> list[int]:
        return [1] * len(text)

    async def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        if messages[0]["role"] != "system":
            raise ValueError("chat template failed: the first message must be a system message")
        return [1, 2, 3]

    async def decode(self, ids: list[int]) -> str:
        return "x" * len(ids)

    def submit(self, prompt_ids: list[int], params: SamplingParams, request_id: str) -> FakeStream:
        if isinstance(self.script, Exception):
            raise self.script
        stream = FakeStream(self.script)
        self.streams.append(stream)
        return stream


def finished() -> Finished:
    return Finished(prompt_tokens=3, completion_tokens=2, cached_tokens=0, timings=Timings(arrival=0.0))


@pytest.fixture
def fake() -> Iterator[tuple[TestClient, FakeEngine]]:
    engine = FakeEngine()
    app = create_app(parse_settings(["--model", str(Path("fake"))], env={}), engine)
    with TestClient(app) as client:
        yield client, engine


def events(text: str) -> list[Any]:
    return [
        line[6:] if line[6:] == "[DONE]" else json.loads(line[6:])
        for line in text.splitlines()
        if line.startswith("data: ")
    ]


def test_error_mid_stream_is_an_error_event_then_done(fake: tuple[TestClient, FakeEngine]) -> None:
    client, engine = fake
    engine.script = [Delta(0, "he", [1]), EngineError("the model produced non-finite logits")]
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "hi", "stream": True})
    assert r.status_code == 200
    got = events(r.text)
    assert got[0]["choices"][0]["text"] == "he"
    assert got[1]["error"]["type"] == "server_error" and "non-finite" in got[1]["error"]["message"]
    assert got[2] == "[DONE]" and engine.streams[0].closed


def test_error_without_streaming_is_a_500_in_openai_shape(fake: tuple[TestClient, FakeEngine]) -> None:
    client, engine = fake
    engine.script = [Delta(0, "he", [1]), EngineError("boom")]
    r = client.post("/v1/completions", json={"model": "fake", "prompt": "hi"})
    assert r.status_code == 500 and r.json()["error"]["code"] == "engine_error"
    assert engine.streams[0].closed


def test_full_queue_is_503_with_retry_after_before_the_stream_starts(
    fake: tuple[TestClient, FakeEngine],
) -> None:
    client, engine = fake
    engine.script = EngineOverloaded("queue full")
    for stream in (False, True):
        r = client.post("/v1/completions", json={"model": "fake", "prompt": "hi", "stream": stream})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "overloaded"


def test_refusing_chat_template_is_a_400(fake: tuple[TestClient, FakeEngine]) -> None:
    client, _ = fake
    r = client.post(
        "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "x"}]}
    )
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    assert "system message" in r.json()["error"]["message"]


def test_second_prompt_refused_aborts_the_first(fake: tuple[TestClient, FakeEngine]) -> None:
    client, engine = fake
    engine.script = [Delta(0, "a", [1], finish_reason="length"), finished()]
    original = engine.submit
    calls = []

    def flaky(prompt_ids: list[int], params: SamplingParams, request_id: str) -> FakeStream:
        calls.append(request_id)
        if len(calls) == 2:
            raise EngineOverloaded("full")
        return original(prompt_ids, params, request_id)

    engine.submit = flaky  # type: ignore[method-assign]
    r = client.post("/v1/completions", json={"model": "fake", "prompt": ["a", "b"]})
    assert r.status_code == 503 and engine.streams[0].closed
    assert calls[0].endswith("-0") and calls[1].endswith("-1")


def test_finished_totals_become_usage(fake: tuple[TestClient, FakeEngine]) -> None:
    client, engine = fake
    engine.script = [Delta(0, "o", [1]), Delta(0, "k", [2], finish_reason="stop", stop_reason=7), finished()]
    body = client.post(
        "/v1/chat/completions", json={"model": "fake", "messages": [{"role": "system", "content": "s"}]}
    ).json()
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "ok"}
    assert body["choices"][0]["finish_reason"] == "stop" and body["choices"][0]["stop_reason"] == 7
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5,
                             "prompt_tokens_details": {"cached_tokens": 0}}  # fmt: skip
