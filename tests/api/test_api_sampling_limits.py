"""Sampling values that pass validation but underflow or overflow float32 on their way to a draw.

A temperature below 1e-5 is greedy (vLLM's rule); a top_p that rounds to 0 keeps the most likely token;
a repetition penalty that turns logits into +inf still draws among the tokens it favours. Never NaN
probabilities, never a run of end-of-text tokens, never a dead engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from bench.harness import RunningServer

PROMPT = "def load(path):\n    with open(path) as f:"
TINY = [1e-45, 1e-300, 5e-324, 1e-40, 1e-8, 9.99e-6]
"""Denormal and sub-denormal in float32, zero in float32, small but normal: all in (0, 2]."""


def complete(http: httpx.Client, model: str, **fields: Any) -> dict[str, Any]:
    body = {"model": model, "prompt": PROMPT, "max_tokens": 8, "ignore_eos": True, **fields}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 8
    return choice


@pytest.fixture(scope="module")
def http_module(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture(scope="module")
def greedy(http_module: httpx.Client, server: RunningServer) -> str:
    text = complete(http_module, server.model, temperature=0)["text"]
    assert text.strip(), "the tiny model's greedy continuation should be visible text"
    return text


@pytest.mark.parametrize("temperature", TINY)
def test_a_temperature_that_underflows_is_greedy(
    http_module: httpx.Client, server: RunningServer, greedy: str, temperature: float
) -> None:
    for seed in (1, 2):
        assert complete(http_module, server.model, temperature=temperature, seed=seed)["text"] == greedy


@pytest.mark.parametrize("top_p", TINY)
def test_a_top_p_that_underflows_keeps_the_most_likely_token(
    http_module: httpx.Client, server: RunningServer, greedy: str, top_p: float
) -> None:
    for seed in (1, 2):
        text = complete(http_module, server.model, temperature=1.0, top_p=top_p, seed=seed)["text"]
        assert text == greedy


@pytest.mark.parametrize("penalty", [1e-45, 1e-300, 1e-30])
def test_a_repetition_penalty_that_overflows_draws_among_seen_tokens(
    http_module: httpx.Client, server: RunningServer, penalty: float
) -> None:
    ids = http_module.post("/tokenize", json={"prompt": PROMPT}).json()["tokens"]
    seen = {http_module.post("/detokenize", json={"tokens": [i]}).json()["prompt"] for i in ids}
    choice = complete(
        http_module, server.model, prompt=ids, temperature=1.0, seed=3, repetition_penalty=penalty, logprobs=0
    )
    tokens = choice["logprobs"]["tokens"]
    assert choice["text"] and set(tokens) <= seen, tokens


def test_streams_and_chat_with_underflowing_values_are_greedy(
    http_module: httpx.Client, server: RunningServer
) -> None:
    messages = [{"role": "user", "content": "Hello"}]
    chat = {"model": server.model, "messages": messages, "max_tokens": 6, "ignore_eos": True}
    expected = http_module.post("/v1/chat/completions", json={**chat, "temperature": 0}).json()
    for fields in ({"temperature": 1e-300}, {"top_p": 5e-324, "seed": 9}):
        got = http_module.post("/v1/chat/completions", json={**chat, **fields}).json()
        assert got["choices"][0]["message"] == expected["choices"][0]["message"]
    # The engine is alive and well afterwards.
    assert http_module.get("/health").status_code == 200
