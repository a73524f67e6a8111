"""The OpenAI-compatible endpoints against the real server: shapes, streaming, usage, logprobs, SDKs."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import openai
import pytest

from bench.harness import RunningServer
from tests.support import sse_events, wait_idle

GREEDY = {"temperature": 0, "ignore_eos": True}


def complete(http: httpx.Client, model: str, **fields: Any) -> dict[str, Any]:
    r = http.post("/v1/completions", json={"model": model, **fields})
    assert r.status_code == 200, r.text
    return r.json()


def stream(http: httpx.Client, path: str, body: dict[str, Any]) -> tuple[httpx.Headers, list[Any]]:
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        assert r.headers["content-type"].startswith("text/event-stream")
        return r.headers, list(sse_events(r))


def test_completion_shape_usage_and_timing_headers(http: httpx.Client, server: RunningServer) -> None:
    r = http.post(
        "/v1/completions", json={"model": server.model, "prompt": "Hello", "max_tokens": 5, **GREEDY}
    )
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion" and body["model"] == server.model
    assert body["id"].startswith("cmpl-") and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["finish_reason"] == "length" and isinstance(choice["text"], str)
    assert choice["logprobs"] is None
    usage = body["usage"]
    assert usage["completion_tokens"] == 5 and usage["prompt_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + 5
    assert usage["prompt_tokens_details"]["cached_tokens"] >= 0
    for name in ("x-queue-time", "x-time-to-first-token", "x-time-per-token"):
        assert float(r.headers[name]) >= 0
    assert r.headers["x-request-id"] == body["id"]


def test_streamed_completion_matches_non_streamed(http: httpx.Client, server: RunningServer) -> None:
    request = {"model": server.model, "prompt": "The quick brown fox", "max_tokens": 12, **GREEDY}
    expected = complete(http, **request)["choices"][0]["text"]
    headers, events = stream(http, "/v1/completions", {**request, "stream_options": {"include_usage": True}})
    assert headers["cache-control"] == "no-cache" and headers["x-accel-buffering"] == "no"
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    *token_chunks, usage_chunk = chunks
    assert "".join(c["choices"][0]["text"] for c in token_chunks) == expected
    assert token_chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["object"] == "text_completion" and c["usage"] is None for c in token_chunks)
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 12
    assert usage_chunk["timings"]["time_to_first_token_ms"] >= 0
    # Without include_usage: no usage chunk and no usage key.
    _, plain = stream(http, "/v1/completions", request)
    assert all(c == "[DONE]" or (c["choices"] and "usage" not in c) for c in plain)


def test_several_prompts_and_n_index_choices_by_prompt(http: httpx.Client, server: RunningServer) -> None:
    ids = http.post("/tokenize", json={"prompt": "json decoder"}).json()["tokens"]
    request = {"model": server.model, "prompt": ["Hello", ids], "n": 2, "max_tokens": 4, **GREEDY}
    body = complete(http, **request)
    texts = [c["text"] for c in body["choices"]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    for i, prompt in enumerate(("Hello", "json decoder")):
        alone = complete(http, server.model, prompt=prompt, max_tokens=4, **GREEDY)["choices"][0]["text"]
        assert texts[2 * i] == texts[2 * i + 1] == alone
    assert body["usage"]["completion_tokens"] == 16
    _, events = stream(http, "/v1/completions", request)
    streamed: dict[int, str] = {}
    for chunk in events[:-1]:
        for c in chunk["choices"]:
            streamed[c["index"]] = streamed.get(c["index"], "") + c["text"]
    assert [streamed[i] for i in range(4)] == texts


def test_seed_makes_sampling_reproducible(http: httpx.Client, server: RunningServer) -> None:
    request = {"model": server.model, "prompt": "Once", "max_tokens": 16, "temperature": 1.0, "seed": 1234,
               "ignore_eos": True}  # fmt: skip
    first = complete(http, **request)["choices"][0]["text"]
    assert complete(http, **request)["choices"][0]["text"] == first


def test_stop_string_truncates_and_reports_stop(http: httpx.Client, server: RunningServer) -> None:
    request = {"model": server.model, "prompt": "def main", "max_tokens": 24, **GREEDY}
    text = complete(http, **request)["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), text
    choice = complete(http, **request, stop=[stop])["choices"][0]
    assert choice["finish_reason"] == "stop" and choice["stop_reason"] == stop
    assert stop not in choice["text"] and text.startswith(choice["text"])


def test_completion_logprobs_legacy_shape(http: httpx.Client, server: RunningServer) -> None:
    body = complete(http, server.model, prompt="Hello", max_tokens=6, logprobs=2, **GREEDY)
    lp = body["choices"][0]["logprobs"]
    assert set(lp) == {"tokens", "token_logprobs", "top_logprobs", "text_offset"}
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 6
    assert all(x <= 0 for x in lp["token_logprobs"])
    assert all(1 <= len(top) <= 2 for top in lp["top_logprobs"])
    assert lp["text_offset"] == sorted(lp["text_offset"]) and lp["text_offset"][0] == 0
    # Greedy: the sampled token is the most likely one.
    for top, sampled in zip(lp["top_logprobs"], lp["token_logprobs"], strict=True):
        assert max(top.values()) == pytest.approx(sampled, abs=1e-4)


def test_chat_completion_and_stream(http: httpx.Client, server: RunningServer) -> None:
    request = {
        "model": server.model,
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Hi"}, {"type": "text", "text": "there"}]},
            {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Again"},
        ],
        "max_completion_tokens": 6,
        "logprobs": True,
        "top_logprobs": 2,
        **GREEDY,
    }
    body = http.post("/v1/chat/completions", json=request).json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant" and choice["finish_reason"] == "length"
    content = choice["logprobs"]["content"]
    assert len(content) == 6 and all(set(t) == {"token", "logprob", "bytes", "top_logprobs"} for t in content)
    assert all(len(t["top_logprobs"]) == 2 and isinstance(t["bytes"], list) for t in content)
    assert body["usage"]["completion_tokens"] == 6
    _, events = stream(http, "/v1/chat/completions", request)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert chunks[0]["object"] == "chat.completion.chunk"
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(len(c["choices"][0]["logprobs"]["content"]) for c in chunks[1:]) == 6


def test_repeated_prompt_reports_cached_tokens(http: httpx.Client, server: RunningServer) -> None:
    prompt = "A long shared prefix. " * 20
    complete(http, server.model, prompt=prompt, max_tokens=1)
    again = complete(http, server.model, prompt=prompt, max_tokens=1)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_models_tokenize_detokenize_and_probes(http: httpx.Client, server: RunningServer) -> None:
    models = http.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [server.model]
    assert http.get(f"/v1/models/{server.model}").json()["id"] == server.model
    assert http.get("/v1/models/other").status_code == 404
    tok = http.post("/tokenize", json={"model": server.model, "prompt": "héllo wörld 😀"}).json()
    assert tok["count"] == len(tok["tokens"]) > 0 and tok["max_model_len"] == 512
    assert http.post("/detokenize", json={"tokens": tok["tokens"]}).json() == {"prompt": "héllo wörld 😀"}
    chat_tok = http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()
    assert chat_tok["count"] > tok["count"] // 2
    assert http.get("/health").json() == {"status": "ok"}
    assert http.get("/ready").status_code == 200
    stats = wait_idle(http)
    assert stats["kv_total_tokens"] > 0 and stats["status"] == "ready"


def test_openai_sdk_sync(server: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    completion = client.completions.create(model=server.model, prompt="Hello", max_tokens=4)
    assert completion.usage and completion.usage.completion_tokens <= 4
    chat = client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, seed=3
    )
    assert chat.choices[0].message.role == "assistant"
    pieces = [
        chunk.choices[0].delta.content or ""
        for chunk in client.chat.completions.create(
            model=server.model,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=4,
            seed=3,
            stream=True,
        )
        if chunk.choices
    ]
    assert "".join(pieces) == chat.choices[0].message.content
    text = "".join(
        c.choices[0].text
        for c in client.completions.create(model=server.model, prompt="Hello", max_tokens=4, stream=True)
    )
    assert isinstance(text, str)
    assert [m.id for m in client.models.list()] == [server.model]
    try:
        client.completions.create(model=server.model, prompt="x", temperature=9)
    except openai.BadRequestError as exc:
        assert exc.status_code == 400 and exc.body and exc.body["param"] == "temperature"  # type: ignore[index]
    else:
        raise AssertionError("temperature=9 was accepted")


def test_openai_sdk_async(server: RunningServer) -> None:
    async def main() -> tuple[str, str, int]:
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "Hey"}]
        chat = await client.chat.completions.create(
            model=server.model,
            messages=messages,
            max_tokens=5,
            temperature=0,  # type: ignore[arg-type]
            extra_body={"ignore_eos": True},
        )
        pieces = []
        usage_tokens = -1
        async for chunk in await client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=5, temperature=0, stream=True,  # type: ignore[arg-type]
            stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        ):  # fmt: skip
            if chunk.choices:
                pieces.append(chunk.choices[0].delta.content or "")
            elif chunk.usage:
                usage_tokens = chunk.usage.completion_tokens
        completion = await client.completions.create(model=server.model, prompt="Hey", max_tokens=3)
        assert completion.choices[0].finish_reason in ("stop", "length")
        await client.close()
        return chat.choices[0].message.content or "", "".join(pieces), usage_tokens

    whole, streamed, usage_tokens = asyncio.run(main())
    assert whole == streamed
    assert usage_tokens == 5
