"""The bad-input matrix, beyond tests/api/test_api_bad_input.py's table: every endpoint, every category.

Each request gets its 4xx in OpenAI's error shape naming the bad parameter (None where no parameter
can be named: a body that is not JSON, a wrong method), generation requests in both streaming and
non-streaming form; afterwards the server still answers exactly as before.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bench.harness import RunningServer
from tests.reliability.rel_support import port_of, read_head
from tests.support import wait_idle

C, CHAT, TOK, DETOK = "/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize"
M = "{model}"  # replaced by the served model name
VOCAB = 512  # the tiny checkpoint's vocabulary
HUGE_TEXT = "lorem ipsum dolor sit amet " * 10_000  # 270 KB: ~50,000 tokens for a 512-token context
OK_MESSAGES = [{"role": "user", "content": "Hi"}]
GENERATION = (C, CHAT)
JSON_TYPE = {"content-type": "application/json"}


def cmpl(**fields: Any) -> dict[str, Any]:
    return {"model": M, "prompt": "Hello", "max_tokens": 4, **fields}


def chat(**fields: Any) -> dict[str, Any]:
    return {"model": M, "messages": OK_MESSAGES, "max_tokens": 4, **fields}


def content(value: Any) -> dict[str, Any]:
    return chat(messages=[{"role": "user", "content": value}])


def message(**fields: Any) -> dict[str, Any]:
    return chat(messages=[fields])


# (path, body, status, param). Dict bodies to generation routes are also sent with "stream": true.
JSON_CASES: list[tuple[str, Any, int, str | None]] = [
    # wrong types
    (C, cmpl(top_p="0.5"), 400, "top_p"),
    (C, cmpl(seed=1.5), 400, "seed"),
    (C, cmpl(stream="yes"), 400, "stream"),
    (C, cmpl(user=5), 400, "user"),
    (C, cmpl(top_k=1.5), 400, "top_k"),
    (C, cmpl(logprobs=True), 400, "logprobs"),
    (C, cmpl(ignore_eos="true"), 400, "ignore_eos"),
    (C, cmpl(stop_token_ids="1"), 400, "stop_token_ids"),
    (C, cmpl(min_tokens="1"), 400, "min_tokens"),
    (C, cmpl(model=123), 400, "model"),
    (CHAT, chat(max_tokens="5"), 400, "max_tokens"),
    (CHAT, chat(n=1.0), 400, "n"),
    (CHAT, chat(presence_penalty=[]), 400, "presence_penalty"),
    (CHAT, chat(skip_special_tokens=1), 400, "skip_special_tokens"),
    (CHAT, chat(metadata={"a": 1}), 400, "metadata"),
    (TOK, {"prompt": 5}, 400, "prompt"),
    (TOK, {"prompt": "x", "add_special_tokens": "yes"}, 400, "add_special_tokens"),
    (DETOK, {"tokens": [[1]]}, 400, "tokens"),
    (DETOK, {"tokens": [1.5]}, 400, "tokens"),
    # missing and unknown fields
    (CHAT, {"messages": OK_MESSAGES}, 400, "model"),
    (DETOK, {}, 400, "tokens"),
    (CHAT, message(role="user", content="x", foo=1), 400, "messages"),
    (TOK, {"prompt": "x", "bogus": 1}, 400, "bogus"),
    (DETOK, {"tokens": [1], "extra": True}, 400, "extra"),
    (CHAT, chat(function_call="auto"), 400, "function_call"),
    (CHAT, chat(functions=[{"name": "f"}]), 400, "functions"),
    (CHAT, chat(audio={"voice": "x"}), 400, "audio"),
    (CHAT, chat(modalities=["audio"]), 400, "modalities"),
    (CHAT, chat(tool_choice="required"), 400, "tool_choice"),
    # empty and huge prompts
    (C, cmpl(prompt=HUGE_TEXT), 400, "prompt"),
    (C, cmpl(prompt=[7] * 100_000), 400, "prompt"),
    (CHAT, content(HUGE_TEXT), 400, "prompt"),
    (C, cmpl(prompt=["ok", []]), 400, "prompt"),
    (TOK, {"messages": []}, 400, "messages"),
    (TOK, {"prompt": "x", "messages": OK_MESSAGES}, 400, "prompt"),
    # token ids outside the vocabulary
    (C, cmpl(prompt=[VOCAB]), 400, "prompt"),
    (C, cmpl(prompt=[2**64]), 400, "prompt"),
    (C, cmpl(prompt=[[1, 2], [3, -7]]), 400, "prompt"),
    (C, cmpl(stop_token_ids=[2**40]), 400, "stop_token_ids"),
    (CHAT, chat(stop_token_ids=[VOCAB]), 400, "stop_token_ids"),
    (DETOK, {"tokens": [VOCAB]}, 400, "tokens"),
    (DETOK, {"tokens": [2**70]}, 400, "tokens"),
    (DETOK, {"tokens": [1, -1]}, 400, "tokens"),
    # max_tokens: negative, zero, fractional, enormous
    (C, cmpl(max_tokens=0.5), 400, "max_tokens"),
    (C, cmpl(max_tokens=2**31), 400, "max_tokens"),
    (C, cmpl(max_tokens=10**30), 400, "max_tokens"),
    (C, cmpl(max_tokens=-(10**30)), 400, "max_tokens"),
    (CHAT, chat(max_tokens=-1), 400, "max_tokens"),
    (CHAT, chat(max_tokens=0), 400, "max_tokens"),
    (CHAT, chat(max_tokens=10**6), 400, "max_tokens"),
    (CHAT, chat(max_completion_tokens=1.5), 400, "max_completion_tokens"),
    (CHAT, chat(max_completion_tokens=0), 400, "max_completion_tokens"),
    (C, cmpl(min_tokens=-1), 400, "min_tokens"),
    # n and top_logprobs out of range
    (C, cmpl(n=-1), 400, "n"),
    (C, cmpl(n=17), 400, "n"),
    (CHAT, chat(n=0), 400, "n"),
    (CHAT, chat(n=2**63), 400, "n"),
    (CHAT, chat(logprobs=True, top_logprobs=-1), 400, "top_logprobs"),
    (CHAT, chat(logprobs=True, top_logprobs=1.5), 400, "top_logprobs"),
    (C, cmpl(logprobs=-1), 400, "logprobs"),
    (C, cmpl(best_of=0), 400, "best_of"),
    # temperature, top_p, min_p and penalties out of range
    (C, cmpl(top_p=1.0001), 400, "top_p"),
    (C, cmpl(top_p=-0.1), 400, "top_p"),
    (C, cmpl(min_p=-0.1), 400, "min_p"),
    (CHAT, chat(min_p=1.01), 400, "min_p"),
    (CHAT, chat(temperature=2.0001), 400, "temperature"),
    (CHAT, chat(temperature=-0.01), 400, "temperature"),
    (C, cmpl(presence_penalty=-2.5), 400, "presence_penalty"),
    (CHAT, chat(frequency_penalty=2.01), 400, "frequency_penalty"),
    (C, cmpl(repetition_penalty=2.5), 400, "repetition_penalty"),
    (CHAT, chat(repetition_penalty=-1), 400, "repetition_penalty"),
    (C, cmpl(top_k=-2), 400, "top_k"),
    (C, cmpl(seed=-(2**63) - 1), 400, "seed"),
    # thousands of stop strings, huge ones, wrong shapes
    (C, cmpl(stop=["s"] * 5000), 400, "stop"),
    (C, cmpl(stop="s" * 100_000), 400, "stop"),
    (CHAT, chat(stop=["x" * 257]), 400, "stop"),
    (C, cmpl(stop=["ok", 5]), 400, "stop"),
    (CHAT, chat(stop=[["nested"]]), 400, "stop"),
    (C, cmpl(stop=["ok", ""]), 400, "stop"),
    # lone surrogates (valid JSON escapes that are not Unicode text)
    (C, cmpl(prompt="a\ud800b"), 400, "prompt"),
    (C, cmpl(prompt=["ok", "x\udfff"]), 400, "prompt"),
    (CHAT, content("\udc00"), 400, "messages"),
    (CHAT, content([{"type": "text", "text": "\ud83d"}]), 400, "messages"),
    (CHAT, message(role="\ud800", content="x"), 400, "messages"),
    (C, cmpl(stop="\ud800"), 400, "stop"),
    (CHAT, chat(stop=["ok", "\udbff"]), 400, "stop"),
    (C, cmpl(model="\ud800"), 404, "model"),
    (TOK, {"prompt": "\ud800"}, 400, "prompt"),
    (TOK, {"messages": [{"role": "user", "content": "\ud800"}]}, 400, "messages"),
    (C, cmpl(logit_bias={"\ud800": 1}), 400, "logit_bias"),
    # logit_bias with bad keys or values
    (C, cmpl(logit_bias={"abc": 1}), 400, "logit_bias"),
    (C, cmpl(logit_bias={"1.5": 1}), 400, "logit_bias"),
    (C, cmpl(logit_bias={"": 1}), 400, "logit_bias"),
    (C, cmpl(logit_bias={"0x10": 1}), 400, "logit_bias"),
    (C, cmpl(logit_bias={"1": "x"}), 400, "logit_bias"),
    (C, cmpl(logit_bias={"1": None}), 400, "logit_bias"),
    (C, cmpl(logit_bias={"1": 101}), 400, "logit_bias"),
    (C, cmpl(logit_bias={str(i): 1 for i in range(1025)}), 400, "logit_bias"),
    (CHAT, chat(logit_bias={"99999999999999999999999": 1}), 400, "logit_bias"),
    (CHAT, chat(logit_bias={str(VOCAB): 1}), 400, "logit_bias"),
    (CHAT, chat(logit_bias="x"), 400, "logit_bias"),
    # unknown model
    (C, cmpl(model=""), 404, "model"),
    (CHAT, chat(model=" " + M), 404, "model"),
    (DETOK, {"tokens": [1], "model": "gpt-4"}, 404, "model"),
    # chat messages with bad roles or content shapes
    (CHAT, message(role="function", content="x"), 400, "messages"),
    (CHAT, message(role="USER", content="x"), 400, "messages"),
    (CHAT, message(role="", content="x"), 400, "messages"),
    (CHAT, message(role=5, content="x"), 400, "messages"),
    (CHAT, message(content="x"), 400, "messages"),
    (CHAT, message(role="user", content="x", name=5), 400, "messages"),
    (CHAT, content(5), 400, "messages"),
    (CHAT, content({"type": "text", "text": "x"}), 400, "messages"),
    (CHAT, content(["hi"]), 400, "messages"),
    (CHAT, content([{"type": "text"}]), 400, "messages"),
    (CHAT, content([{"type": "text", "text": "a", "x": 1}]), 400, "messages"),
    (CHAT, content([{"type": "text", "text": 5}]), 400, "messages"),
    (CHAT, content([{"text": "no type"}]), 400, "messages"),
    (CHAT, content([{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}]), 400, "messages"),
    (CHAT, chat(messages=["hi"]), 400, "messages"),
    (CHAT, chat(messages={"role": "user", "content": "x"}), 400, "messages"),
    (CHAT, chat(messages=None), 400, "messages"),
    (CHAT, chat(messages=[{"role": "assistant", "content": None}]), 400, "messages"),
]

J = "application/json"


def obj(rest: bytes) -> bytes:
    """A raw completions body: the model, then `rest` (JSON text that may be invalid on purpose)."""
    return b'{"model": "{model}", ' + rest + b"}"


def chat_obj(rest: bytes) -> bytes:
    return obj(b'"messages": [{"role": "user", "content": "x"}], ' + rest)


# (path, raw body, content type, status, param, streamable). Streamable bodies are JSON objects that
# open with '{"model"'; their streaming form has '"stream": true, ' inserted after the brace.
RAW_CASES: list[tuple[str, bytes, str | None, int, str | None, bool]] = [
    # malformed and truncated JSON
    (C, b'{"model": "{model}", "prompt": "x", }', J, 400, None, False),
    (C, b"{'model': 'x', 'prompt': 'y'}", J, 400, None, False),
    (C, b'{"model": "{model}", "prompt": "x"', J, 400, None, False),
    (C, b'{"model": "{model}", "prompt": "x', J, 400, None, False),
    (CHAT, b'{"model": "{model}", "messages": [{"role": "user", "content": "hi"}', J, 400, None, False),
    (C, b'{"model": "{model}" "prompt": "x"}', J, 400, None, False),
    (C, b'{"model": "{model}", "prompt": "x"}{"x": 1}', J, 400, None, False),
    (TOK, b'{"prompt": ', J, 400, None, False),
    (DETOK, b'{"tokens": [1, 2,', J, 400, None, False),
    (C, b"[" * 100_000 + b"]" * 100_000, J, 400, None, False),
    (C, obj(b'"prompt": "x", "max_tokens": ' + b"9" * 5000), J, 400, None, False),
    # JSON that is not an object
    (C, b'"hello"', J, 400, None, False),
    (C, b"123", J, 400, None, False),
    (C, b"null", J, 400, None, False),
    (CHAT, b"true", J, 400, None, False),
    (CHAT, b'[{"role": "user", "content": "x"}]', J, 400, None, False),
    (TOK, b'"x"', J, 400, None, False),
    (DETOK, b"[1, 2]", J, 400, None, False),
    # wrong content type
    (C, obj(b'"prompt": "x"'), "text/plain", 400, None, False),
    (CHAT, b"model={model}&prompt=x", "application/x-www-form-urlencoded", 400, None, False),
    (
        C,
        b"--b\r\nContent-Disposition: form-data; name=model\r\n\r\nx\r\n--b--\r\n",
        "multipart/form-data; boundary=b",
        400,
        None,
        False,
    ),  # fmt: skip
    (TOK, b'{"prompt": "x"}', None, 400, None, False),
    # invalid UTF-8 bytes inside the JSON text
    (C, obj(b'"prompt": "a\xff\xfeb"'), J, 400, None, False),
    (CHAT, obj(b'"messages": [{"role": "user", "content": "\xc3\x28"}]'), J, 400, None, False),
    (TOK, b'{"prompt": "\xed\xa0\x80"}', J, 400, "prompt", False),  # a surrogate, UTF-8 encoded
    # NaN and Infinity
    (C, obj(b'"prompt": "x", "top_p": NaN'), J, 400, "top_p", True),
    (C, obj(b'"prompt": "x", "min_p": Infinity'), J, 400, "min_p", True),
    (CHAT, chat_obj(b'"temperature": -Infinity'), J, 400, "temperature", True),
    (C, obj(b'"prompt": "x", "presence_penalty": NaN'), J, 400, "presence_penalty", True),
    (C, obj(b'"prompt": "x", "repetition_penalty": Infinity'), J, 400, "repetition_penalty", True),
    (C, obj(b'"prompt": "x", "temperature": 1e400'), J, 400, "temperature", True),
    (CHAT, chat_obj(b'"logit_bias": {"1": NaN}'), J, 400, "logit_bias", True),
    (C, obj(b'"prompt": "x", "seed": NaN'), J, 400, "seed", True),
    (C, obj(b'"prompt": "x", "max_tokens": Infinity'), J, 400, "max_tokens", True),
    (C, obj(b'"prompt": "x", "n": -Infinity'), J, 400, "n", True),
]

# (method, path, status): wrong methods on every route, and unknown routes.
METHOD_CASES: list[tuple[str, str, int]] = [
    ("GET", CHAT, 405),
    ("PUT", C, 405),
    ("DELETE", "/v1/models", 405),
    ("POST", "/health", 405),
    ("PATCH", TOK, 405),
    ("GET", DETOK, 405),
    ("POST", "/v1/models/x", 405),
    ("POST", "/stats", 405),
    ("PUT", "/ready", 405),
    ("GET", "/v1/models/no-such-model", 404),
    ("GET", "/v1/engines", 404),
    ("POST", "/v1/embeddings", 404),
]


def fill(value: Any, model: str) -> Any:
    if isinstance(value, bytes):
        return value.replace(b"{model}", model.encode())
    if isinstance(value, dict):
        return {k: fill(v, model) for k, v in value.items()}
    if isinstance(value, list):
        return [fill(v, model) for v in value]
    return value.replace(M, model) if isinstance(value, str) else value


def check_error(r: httpx.Response, status: int, param: str | None) -> None:
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert error["param"] == param, error
    kind = {404: "not_found_error", 401: "authentication_error"}.get(status, "invalid_request_error")
    assert error["type"] == kind, error


def encode(body: Any) -> bytes:
    """JSON as a client sends it; lone surrogates travel as escapes ("\\ud800"), which JSON allows."""
    return json.dumps(body).encode()


@pytest.fixture(scope="module")
def client(default_server: RunningServer) -> Iterator[httpx.Client]:
    with default_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def reference(default_server: RunningServer, client: httpx.Client) -> dict[str, Any]:
    """A greedy answer taken before any bad input: the server must give it again afterwards."""
    body = {"model": default_server.model, "prompt": "Reference", "max_tokens": 8, "temperature": 0,
            "ignore_eos": True}  # fmt: skip
    r = client.post(C, json=body)
    assert r.status_code == 200
    return {"body": body, "text": r.json()["choices"][0]["text"]}


@pytest.mark.parametrize(("path", "body", "status", "param"), JSON_CASES)
def test_bad_json_field(
    default_server: RunningServer,
    client: httpx.Client,
    reference: dict[str, Any],
    path: str,
    body: Any,
    status: int,
    param: str | None,
) -> None:
    body = fill(body, default_server.model)
    headers = JSON_TYPE
    check_error(client.post(path, content=encode(body), headers=headers), status, param)
    if path in GENERATION and "stream" not in body:
        # Refused before the stream starts: a real status, not an error event inside a 200.
        streamed = encode({**body, "stream": True})
        check_error(client.post(path, content=streamed, headers=headers), status, param)


@pytest.mark.parametrize(("path", "raw", "content_type", "status", "param", "streamable"), RAW_CASES)
def test_bad_raw_body(
    default_server: RunningServer,
    client: httpx.Client,
    reference: dict[str, Any],
    path: str,
    raw: bytes,
    content_type: str | None,
    status: int,
    param: str | None,
    streamable: bool,
) -> None:
    raw = fill(raw, default_server.model)
    headers = {"content-type": content_type} if content_type else {}
    check_error(client.post(path, content=raw, headers=headers), status, param)
    if streamable:
        assert raw.startswith(b'{"model"')
        streamed = b'{"stream": true, ' + raw[1:]
        check_error(client.post(path, content=streamed, headers=headers), status, param)


@pytest.mark.parametrize(("method", "path", "status"), METHOD_CASES)
def test_wrong_method_or_route(
    default_server: RunningServer, client: httpx.Client, method: str, path: str, status: int
) -> None:
    r = client.request(method, path, json={"model": default_server.model} if method != "GET" else None)
    param = "model" if path.startswith("/v1/models/") and method == "GET" else None
    check_error(r, status, param)


@pytest.mark.parametrize("path", [CHAT, TOK, DETOK])
def test_oversized_body_on_every_post_route(client: httpx.Client, path: str) -> None:
    huge = b'{"model": "x", "prompt": "' + b"a" * (9 << 20) + b'"}'
    check_error(client.post(path, content=huge, headers={"content-type": "application/json"}), 413, None)


def test_malformed_framing_is_a_4xx(default_server: RunningServer) -> None:
    """What httpx will not send: a non-numeric Content-Length, a lying one, a broken chunk."""
    port = port_of(default_server.url)

    async def send(raw: bytes) -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(raw)
            await writer.drain()
            status, _ = await asyncio.wait_for(read_head(reader), 10)
            return status
        finally:
            writer.close()

    head = f"POST {C} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    cases = [
        head + "Content-Length: abc\r\n\r\n{}",
        head + "Content-Length: -5\r\n\r\n{}",
        head + "Transfer-Encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
        head + "Content-Length: 2\r\nContent-Length: 3\r\n\r\n{}",
    ]
    for raw in cases:
        status = asyncio.run(send(raw.encode()))
        assert 400 <= status < 500, (raw, status)


def test_server_still_answers_correctly_afterwards(
    default_server: RunningServer, client: httpx.Client, reference: dict[str, Any]
) -> None:
    for path, body, *_ in JSON_CASES[:40]:
        r = client.post(path, content=encode(fill(body, default_server.model)), headers=JSON_TYPE)
        assert r.status_code < 500
    r = client.post(C, json=reference["body"])
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == reference["text"]
    stats = wait_idle(client)
    assert (stats["running"], stats["waiting"], stats["kv_used_tokens"]) == (0, 0, 0)
    assert client.get("/health").status_code == 200
    assert "Traceback" not in default_server.log()
