"""Prompt log-probabilities through /v1/completions: OpenAI's `echo` (legacy logprobs, `max_tokens: 0`
allowed) and vLLM's `prompt_logprobs`, scored in the prompt's own prefill and equal to model.evaluate's
per-token losses (float32, within 1e-4)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from bench.harness import RunningServer
from model.checkpoint import load_model
from model.evaluate import token_nats
from tests.support import sse_events

TEXT = "import json\n\ndef load(path):\n    with open(path) as f:\n        return json.load(f)\n"


@pytest.fixture(scope="module")
def scorer(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server("--dtype", "float32", "--prefill-chunk-tokens", "24")


@pytest.fixture(scope="module")
def client(scorer: RunningServer) -> Iterator[httpx.Client]:
    with scorer.client() as c:
        yield c


def complete(client: httpx.Client, model: str, **body: Any) -> dict[str, Any]:
    r = client.post("/v1/completions", json={"model": model, "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def evaluate_logprobs(checkpoint: Path, ids: list[int]) -> list[float]:
    model = load_model(checkpoint, dtype=torch.float32, device="cpu")
    tokens = torch.tensor([ids])
    return (-token_nats(model, tokens[:, :-1], tokens[:, 1:], torch.device("cpu"), torch.float32)[0]).tolist()


def test_echo_with_max_tokens_zero_scores_the_prompt_like_model_evaluate(
    client: httpx.Client, scorer: RunningServer, tiny_checkpoint: Path
) -> None:
    ids = client.post("/tokenize", json={"prompt": TEXT}).json()["tokens"]
    assert len(ids) >= 48  # two prefill chunks or more
    for prompt in (TEXT, ids):
        body = complete(client, scorer.model, prompt=prompt, echo=True, logprobs=2, max_tokens=0)
        (choice,) = body["choices"]
        assert choice["text"] == TEXT and choice["finish_reason"] == "length"
        assert (body["usage"]["prompt_tokens"], body["usage"]["completion_tokens"]) == (len(ids), 0)
        lp = choice["logprobs"]
        assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(ids)
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert "".join(lp["tokens"]) == TEXT and lp["text_offset"][0] == 0
        assert lp["token_logprobs"][1:] == pytest.approx(evaluate_logprobs(tiny_checkpoint, ids), abs=1e-4)
        for token, value, top in zip(
            lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:], strict=True
        ):
            assert 1 <= len(top) <= 2 and max(top.values()) >= value
            if token in top:
                assert top[token] == value


def test_echo_before_generated_tokens_streamed_or_not(client: httpx.Client, scorer: RunningServer) -> None:
    request = {"prompt": ["Hello", "def f():"], "n": 2, "max_tokens": 3, "ignore_eos": True, "logprobs": 0}
    plain = complete(client, scorer.model, **request)
    echoed = complete(client, scorer.model, **request, echo=True)
    for p, e in zip(plain["choices"], echoed["choices"], strict=True):
        prompt = request["prompt"][e["index"] // 2]
        assert e["text"] == prompt + p["text"]
        tokens = e["logprobs"]["tokens"]
        assert tokens[-3:] == p["logprobs"]["tokens"] and "".join(tokens[:-3]) == prompt
        assert e["logprobs"]["token_logprobs"][-3:] == pytest.approx(
            p["logprobs"]["token_logprobs"], abs=1e-5
        )
    texts: dict[int, str] = {}
    body = {"model": scorer.model, "temperature": 0, **request, "echo": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200
        for chunk in sse_events(r):
            for c in chunk["choices"] if chunk != "[DONE]" else []:
                texts[c["index"]] = texts.get(c["index"], "") + c["text"]
    assert [texts[i] for i in range(4)] == [c["text"] for c in echoed["choices"]]


def test_vllm_prompt_logprobs(client: httpx.Client, scorer: RunningServer) -> None:
    ids = client.post("/tokenize", json={"prompt": TEXT}).json()["tokens"]
    body = complete(client, scorer.model, prompt=ids, prompt_logprobs=3, max_tokens=2)
    echoed = complete(client, scorer.model, prompt=ids, echo=True, logprobs=0, max_tokens=0)
    expected = echoed["choices"][0]["logprobs"]["token_logprobs"]
    (choice,) = body["choices"]
    scored = choice["prompt_logprobs"]
    assert len(scored) == len(ids) and scored[0] is None
    for i, (token, entry) in enumerate(zip(ids[1:], scored[1:], strict=True), start=1):
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(expected[i], abs=1e-6) and own["rank"] >= 1
        assert sorted(e["rank"] for e in entry.values())[:3] == [1, 2, 3]  # the top 3, and the token itself
        assert len(entry) == (3 if own["rank"] <= 3 else 4)
        assert all(isinstance(e["decoded_token"], str) for e in entry.values())
    assert len(choice["text"]) > 0 and body["usage"]["completion_tokens"] == 2


def test_scoring_skips_the_prefix_cache_which_still_serves_the_rest(
    client: httpx.Client, scorer: RunningServer
) -> None:
    prompt = TEXT * 3
    first = complete(client, scorer.model, prompt=prompt, max_tokens=1)
    scored = [
        complete(client, scorer.model, prompt=prompt, echo=True, logprobs=1, max_tokens=1) for _ in range(2)
    ]
    assert [s["usage"]["prompt_tokens_details"]["cached_tokens"] for s in scored] == [0, 0]
    assert scored[0]["choices"][0]["logprobs"] == scored[1]["choices"][0]["logprobs"]
    again = complete(client, scorer.model, prompt=prompt, max_tokens=1)
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert again["choices"][0]["text"] == first["choices"][0]["text"]


def test_a_prompt_filling_the_context_can_be_scored(client: httpx.Client, scorer: RunningServer) -> None:
    ids = [(7 * i) % 400 + 3 for i in range(512)]  # the tiny model's whole context
    body = complete(client, scorer.model, prompt=ids, echo=True, logprobs=0, max_tokens=0)
    assert len(body["choices"][0]["logprobs"]["tokens"]) == 512
    r = client.post("/v1/completions", json={"model": scorer.model, "prompt": ids, "max_tokens": 1})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
