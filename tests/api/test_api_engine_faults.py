"""Engine failures reach the client right: the real app over a real engine, with faults injected into the
real model (NaN logits from a chosen position on), a real queue filled to its limit, and a real
checkpoint whose chat template refuses the messages.

- an engine error mid-stream becomes `data: {"error": ...}` then `[DONE]`;
- without streaming it is a 500 in OpenAI's error shape;
- a full queue is a 503 with Retry-After before any stream starts;
- a chat template that refuses the messages is a 400 naming `messages`;
- a completions call whose second prompt is refused aborts the first;
- the engine's totals become `usage`.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.inprocess_server import InProcessServer, poisoned_logits, serve_in_process, wait_until
from tests.support import sse_events

VICTIM = list(range(40, 80))  # 40 prompt tokens: the only request that reaches position 43
POISON_FROM = 43  # the victim's 4 first tokens are fine (positions 39..42), the 5th is NaN
GREEDY = {"temperature": 0, "ignore_eos": True}


def error_shape(error: dict[str, Any]) -> None:
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error


@pytest.fixture(scope="module")
def live(tiny_checkpoint: Path) -> Iterator[InProcessServer]:
    # Eager: faults are injected through forward hooks, which compiled decode graphs do not run. What is
    # under test (a non-finite row fails alone; its blocks leave the prefix cache) sits above the runner.
    with serve_in_process(tiny_checkpoint, enforce_eager=True) as server:
        yield server


@pytest.fixture
def http(live: InProcessServer) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=live.url, timeout=30) as client:
        yield client
    wait_until(lambda: live.engine.stats().kv_used_tokens == 0 and live.engine.stats().running == 0)


def test_engine_error_mid_stream_is_an_error_event_then_done(
    live: InProcessServer, http: httpx.Client
) -> None:
    body = {"model": live.model, "prompt": VICTIM, "max_tokens": 20, "stream": True, **GREEDY}
    with (
        poisoned_logits(live.transformer, POISON_FROM),
        http.stream("POST", "/v1/completions", json=body) as r,
    ):
        assert r.status_code == 200
        events = list(sse_events(r))
    tokens = [e for e in events[:-2] if "choices" in e]
    assert tokens and all(e["choices"][0]["finish_reason"] is None for e in tokens)
    error = events[-2]["error"]
    error_shape(error)
    assert error["type"] == "server_error" and error["code"] == "engine_error"
    assert "non-finite" in error["message"]
    assert events[-1] == "[DONE]"
    # The same request without the fault gives those first tokens, then goes on.
    clean = http.post("/v1/completions", json={**body, "stream": False}).json()["choices"][0]["text"]
    assert clean.startswith("".join(e["choices"][0]["text"] for e in tokens))


def test_engine_failure_without_streaming_is_a_500_in_openai_shape(
    live: InProcessServer, http: httpx.Client
) -> None:
    for path, body in (
        ("/v1/completions", {"prompt": VICTIM}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a b c d e f g " * 8}]}),
    ):
        with poisoned_logits(live.transformer, 0):  # every row: the first sample already fails
            r = http.post(path, json={"model": live.model, "max_tokens": 8, **body, **GREEDY})
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        error_shape(error)
        assert error["type"] == "server_error" and error["code"] == "engine_error"
    assert http.post(
        "/v1/completions", json={"model": live.model, "prompt": "ok", "max_tokens": 2}
    ).is_success


def test_full_queue_is_503_with_retry_after_before_the_stream_starts(tiny_checkpoint: Path) -> None:
    with serve_in_process(tiny_checkpoint, max_num_seqs=1, max_waiting=1) as server:
        long = {"model": server.model, "prompt": "hold", "max_tokens": 480, "stream": True, **GREEDY}
        with httpx.Client(base_url=server.url, timeout=30) as client:
            holders = [client.stream("POST", "/v1/completions", json=long) for _ in range(2)]
            opened = [h.__enter__() for h in holders]
            try:
                assert [r.status_code for r in opened] == [200, 200]
                wait_until(lambda: server.engine.stats().running + server.engine.stats().waiting == 2)
                for path, body in (
                    ("/v1/completions", {"prompt": "late"}),
                    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "late"}]}),
                ):
                    for stream in (False, True):
                        r = client.post(path, json={"model": server.model, "stream": stream, **body})
                        assert r.status_code == 503 and r.headers["retry-after"] == "1"
                        assert r.headers["content-type"].startswith("application/json")
                        error = r.json()["error"]
                        error_shape(error)
                        assert error["type"] == "service_unavailable_error" and error["code"] == "overloaded"
            finally:
                for h in holders:
                    h.__exit__(None, None, None)
            wait_until(lambda: server.engine.stats().kv_used_tokens == 0)
            assert client.post("/v1/completions", json={**long, "stream": False, "max_tokens": 2}).is_success


def test_refusing_chat_template_is_a_400(tiny_checkpoint: Path, tmp_path: Path) -> None:
    strict = tmp_path / "strict-template"
    shutil.copytree(tiny_checkpoint, strict)
    config_path = strict / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = (
        "{% if messages[0]['role'] != 'system' %}"
        "{{ raise_exception('the first message must be a system message') }}{% endif %}"
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
        "{% endfor %}{{ '<|im_start|>assistant\n' }}"
    )
    config_path.write_text(json.dumps(config))
    with serve_in_process(strict) as server, httpx.Client(base_url=server.url, timeout=30) as client:
        user_only = {"model": server.model, "messages": [{"role": "user", "content": "x"}], "max_tokens": 2}
        for stream in (False, True):
            r = client.post("/v1/chat/completions", json={**user_only, "stream": stream})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            error_shape(error)
            assert error["param"] == "messages" and "system message" in error["message"]
        r = client.post("/tokenize", json={"messages": user_only["messages"]})
        assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
        with_system = [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]
        r = client.post("/v1/chat/completions", json={**user_only, "messages": with_system})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        # A template that knows nothing of tool calls still renders a history holding them.
        call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
        history = [*with_system, {"role": "assistant", "content": None, "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": "c1", "content": "42"}]  # fmt: skip
        r = client.post("/v1/chat/completions", json={**user_only, "messages": history})
        assert r.status_code == 200, r.text


def test_second_prompt_refused_aborts_the_first(tiny_checkpoint: Path) -> None:
    with serve_in_process(tiny_checkpoint, max_num_seqs=1, max_waiting=1) as server:
        engine = server.engine
        with httpx.Client(base_url=server.url, timeout=30) as client:
            # Refused by validation: the second prompt's token id is outside the vocabulary.
            r = client.post("/v1/completions", json={"model": server.model, "prompt": ["ok", [10**6]]})
            assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
            wait_until(lambda: engine._active == 0 and engine.stats().kv_used_tokens == 0)

            # Refused for capacity: one request holds a slot, the pair's first prompt takes the other.
            hold = {"model": server.model, "prompt": "hold", "max_tokens": 480, "stream": True, **GREEDY}
            with client.stream("POST", "/v1/completions", json=hold) as held:
                assert held.status_code == 200
                r = client.post("/v1/completions", json={"model": server.model, "prompt": ["a", "b"]})
                assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded"
                # The first prompt was aborted: its slot is free again, so a single request fits.
                wait_until(lambda: engine._active == 1)
                single = {"model": server.model, "prompt": "a", "max_tokens": 1}
                done: list[httpx.Response] = []
                thread = threading.Thread(
                    target=lambda: done.append(client.post("/v1/completions", json=single))
                )
                thread.start()
                wait_until(lambda: engine._active == 2)  # admitted (queued behind the held stream)
            thread.join(30)
            assert done and done[0].status_code == 200
            wait_until(lambda: engine._active == 0 and engine.stats().kv_used_tokens == 0)


def test_finished_totals_become_usage(live: InProcessServer, http: httpx.Client) -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "count the tokens"}]
    prompt_tokens = http.post("/tokenize", json={"messages": messages}).json()["count"]
    body = {"model": live.model, "messages": messages, "max_tokens": 5, **GREEDY}
    first = http.post("/v1/chat/completions", json=body).json()
    (choice,) = first["choices"]
    assert choice["finish_reason"] == "length" and choice["stop_reason"] is None
    assert first["usage"]["prompt_tokens"] == prompt_tokens and first["usage"]["completion_tokens"] == 5
    assert first["usage"]["total_tokens"] == prompt_tokens + 5

    # A stop token forced on the third step (banned for two by min_tokens, favoured by logit_bias).
    r = http.post("/v1/completions", json={
        "model": live.model, "prompt": "usage", "max_tokens": 8, "min_tokens": 2, "stop_token_ids": [300],
        "logit_bias": {"300": 100}, **GREEDY,
    }).json()  # fmt: skip
    (choice,) = r["choices"]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == 300
    usage = r["usage"]
    assert usage["completion_tokens"] == 3 and usage["total_tokens"] == usage["prompt_tokens"] + 3

    # Streaming with include_usage reports the same totals on its last chunk.
    streamed = {**body, "stream": True, "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=streamed) as s:
        events = list(sse_events(s))
    assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 5
    assert events[-2]["usage"]["prompt_tokens"] == prompt_tokens
