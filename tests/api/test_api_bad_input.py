"""A table of bad requests: each gets the right 4xx in OpenAI's error shape, never a 5xx or a hang,
and the server answers normally afterwards."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from bench.harness import RunningServer
from tests.support import wait_idle

LONG_TEXT = "lorem ipsum dolor sit amet " * 200  # far more than the tiny model's 512-token context
M = "{model}"  # replaced by the served model name


def _completion(**fields: Any) -> dict[str, Any]:
    return {"model": M, "prompt": "Hello", "max_tokens": 4, **fields}


def _chat(**fields: Any) -> dict[str, Any]:
    return {"model": M, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}


C, CHAT = "/v1/completions", "/v1/chat/completions"

# (path, body, status, param); bodies that are dicts are also sent with "stream": true.
CASES: list[tuple[str, Any, int, str | None]] = [
    # missing fields and wrong types
    (C, {"prompt": "x"}, 400, "model"),
    (C, {"model": M}, 400, "prompt"),
    (CHAT, {"model": M}, 400, "messages"),
    (C, _completion(temperature="hot"), 400, "temperature"),
    (C, _completion(n="2"), 400, "n"),
    (C, _completion(max_tokens=1.5), 400, "max_tokens"),
    (C, _completion(prompt=5), 400, "prompt"),
    (C, _completion(prompt=[1, "a"]), 400, "prompt"),
    (C, _completion(stop=5), 400, "stop"),
    (C, _completion(logit_bias=[1, 2]), 400, "logit_bias"),
    (CHAT, _chat(messages="hi"), 400, "messages"),
    (CHAT, _chat(messages=[{"role": "user"}]), 400, "messages"),
    (CHAT, _chat(messages=[{"role": "tool", "content": "x"}]), 400, "messages"),
    (CHAT, _chat(messages=[{"role": "user", "content": None}]), 400, "messages"),
    (
        CHAT,
        _chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]),
        400,
        "messages",
    ),
    (CHAT, _chat(logprobs="yes"), 400, "logprobs"),
    # out of range
    (C, _completion(temperature=-1), 400, "temperature"),
    (C, _completion(temperature=2.5), 400, "temperature"),
    (C, _completion(top_p=0), 400, "top_p"),
    (C, _completion(top_k=-5), 400, "top_k"),
    (C, _completion(min_p=1.5), 400, "min_p"),
    (C, _completion(repetition_penalty=0), 400, "repetition_penalty"),
    (C, _completion(presence_penalty=3), 400, "presence_penalty"),
    (C, _completion(frequency_penalty=-3), 400, "frequency_penalty"),
    (C, _completion(max_tokens=0), 400, "max_tokens"),
    (C, _completion(max_tokens=-1), 400, "max_tokens"),
    (C, _completion(min_tokens=10, max_tokens=2), 400, "min_tokens"),
    (C, _completion(seed=2**70), 400, "seed"),
    (C, _completion(n=0), 400, "n"),
    (C, _completion(n=10_000), 400, "n"),
    (C, _completion(logprobs=21), 400, "logprobs"),
    (CHAT, _chat(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    (CHAT, _chat(top_logprobs=2), 400, "top_logprobs"),
    (C, _completion(logit_bias={"5": 500}), 400, "logit_bias"),
    (C, _completion(stop=["s"] * 17), 400, "stop"),
    (C, _completion(stop=["s" * 300]), 400, "stop"),
    (C, _completion(stop=[""]), 400, "stop"),
    # empty inputs, context limits
    (C, _completion(prompt=""), 400, "prompt"),
    (C, _completion(prompt=[]), 400, "prompt"),
    (C, _completion(prompt=[[]]), 400, "prompt"),
    (C, _completion(prompt=["ok", ""]), 400, "prompt"),
    (C, _completion(prompt=["x"] * 65), 400, "prompt"),
    (CHAT, _chat(messages=[]), 400, "messages"),
    (C, _completion(prompt=LONG_TEXT), 400, "prompt"),
    (C, _completion(prompt=[5] * 600), 400, "prompt"),
    (CHAT, _chat(messages=[{"role": "user", "content": LONG_TEXT}]), 400, "prompt"),
    (C, _completion(max_tokens=600), 400, "max_tokens"),
    (CHAT, _chat(max_completion_tokens=600), 400, "max_completion_tokens"),
    # token ids outside the vocabulary
    (C, _completion(prompt=[1, 2, 10**6]), 400, "prompt"),
    (C, _completion(prompt=[-1]), 400, "prompt"),
    (C, _completion(prompt=["ok", [10**6]]), 400, "prompt"),
    (C, _completion(logit_bias={"1000000": 1}), 400, "logit_bias"),
    (C, _completion(logit_bias={"-3": 1}), 400, "logit_bias"),
    (C, _completion(stop_token_ids=[10**6]), 400, "stop_token_ids"),
    (C, _completion(stop_token_ids=[-1]), 400, "stop_token_ids"),
    # unknown or unsupported parameters, unknown model
    (C, _completion(foo=1), 400, "foo"),
    (CHAT, _chat(temperatur=1), 400, "temperatur"),
    (C, _completion(echo="yes"), 400, "echo"),
    (C, _completion(prompt_logprobs=21), 400, "prompt_logprobs"),
    (C, _completion(max_tokens=0, logprobs=1), 400, "max_tokens"),
    (C, _completion(echo=True, logprobs=21), 400, "logprobs"),
    (C, _completion(suffix="end"), 400, "suffix"),
    (C, _completion(best_of=3), 400, "best_of"),
    (CHAT, _chat(tools=[{"type": "function", "function": {"description": "no name"}}]), 400, "tools"),
    (CHAT, _chat(response_format={"type": "xml"}), 400, "response_format"),
    (CHAT, _chat(guided_regex="a(("), 400, "guided_regex"),
    (CHAT, _chat(stream_options={"include_usage": True}), 400, "stream_options"),
    (C, _completion(model="gpt-4"), 404, "model"),
    (CHAT, _chat(model="gpt-4"), 404, "model"),
    ("/tokenize", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/tokenize", {}, 400, "prompt"),
    ("/detokenize", {"tokens": [10**6]}, 400, "tokens"),
    ("/detokenize", {"tokens": "abc"}, 400, "tokens"),
    # bodies that are not JSON objects, and non-finite numbers
    (C, b'{"model": "x", "prompt": ', 400, None),
    (C, b"[1, 2, 3]", 400, None),
    (C, b"", 400, None),
    (C, b"\xff\xfe not utf-8", 400, None),
    (C, b'{"model": "{model}", "prompt": "x", "temperature": NaN}', 400, "temperature"),
    (C, b'{"model": "{model}", "prompt": "x", "frequency_penalty": Infinity}', 400, "frequency_penalty"),
    (C, b'{"model": "{model}", "prompt": "x", "logit_bias": {"1": -Infinity}}', 400, "logit_bias"),
    (C, b'{"model": "{model}", "prompt": "x", "max_tokens": NaN}', 400, "max_tokens"),
]


def _fill(body: Any, model: str) -> Any:
    if isinstance(body, bytes):
        return body.replace(b"{model}", model.encode())
    if isinstance(body, dict):
        return {k: _fill(v, model) for k, v in body.items()}
    return model if body == M else body


def _check_error(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    assert error["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


@pytest.mark.parametrize(("path", "body", "status", "param"), CASES)
def test_bad_request_gets_openai_error(
    http: httpx.Client, server: RunningServer, path: str, body: Any, status: int, param: str | None
) -> None:
    body = _fill(body, server.model)
    if isinstance(body, bytes):
        r = http.post(path, content=body, headers={"content-type": "application/json"})
        _check_error(r, status, param)
        return
    _check_error(http.post(path, json=body), status, param)
    if path in (C, CHAT) and "stream_options" not in body:
        # Refused before the stream starts: a real status, not an error event inside a 200.
        _check_error(http.post(path, json={**body, "stream": True}), status, param)


def test_oversized_body_is_413_before_parsing(http: httpx.Client, server: RunningServer) -> None:
    huge = b'{"model": "x", "prompt": "' + b"a" * (9 << 20) + b'"}'
    _check_error(http.post(C, content=huge, headers={"content-type": "application/json"}), 413, None)

    def chunked() -> Any:  # no Content-Length: the limit is enforced while reading
        for _ in range(10):
            yield b"a" * (1 << 20)

    _check_error(http.post(C, content=chunked(), headers={"content-type": "application/json"}), 413, None)


def test_wrong_method_and_unknown_route(http: httpx.Client) -> None:
    r = http.get(C)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"
    r = http.post("/v2/nothing", json={})
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_server_is_healthy_after_bad_input(http: httpx.Client, server: RunningServer) -> None:
    for path, body, _, _ in CASES:
        body = _fill(body, server.model)
        if isinstance(body, dict):
            assert http.post(path, json=body).status_code < 500
    r = http.post(C, json={"model": server.model, "prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    stats = wait_idle(http)
    assert (stats["running"], stats["waiting"], stats["kv_used_tokens"]) == (0, 0, 0)
    assert "Traceback" not in server.log()
