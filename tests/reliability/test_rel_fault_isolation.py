"""Fault isolation: NaN or Inf in one row of a batch fails only that request, over HTTP.

The real app and engine run in-process (uvicorn on 127.0.0.1) so the fault can be injected into the
real model: its forward returns NaN/Inf logits, or its embeddings turn NaN so the poison also lands in
that sequence's cached keys and values, from a position only the victim's long prompt reaches.
The other requests share every step with the victim and must answer exactly as in a clean run.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.api.inprocess_server import (
    InProcessServer,
    poisoned_hidden_state,
    poisoned_logits,
    poisoned_token,
    serve_in_process,
    wait_until,
)
from tests.support import sse_events

GREEDY = {"temperature": 0, "ignore_eos": True}
OTHERS = [[(7 * i + j) % 500 + 3 for j in range(4 + i)] for i in range(6)]  # prompts of 4..9 tokens
OTHER_MAX_TOKENS = 24  # others stay below position 9 + 24 = 33
MARKER = 499  # a token only the victim's prompt holds (the others are biased against generating it)
VICTIM = [*range(100, 120), *[MARKER] * 12, *range(132, 140)]  # 40 tokens, the marker at 20..31
POISON_FROM = 42  # the victim decodes a few tokens first, then fails mid-stream


@pytest.fixture(scope="module")
def live(tiny_checkpoint: Path) -> Iterator[InProcessServer]:
    # Eager: faults are injected through forward hooks, which compiled decode graphs do not run. What is
    # under test (a non-finite row fails alone; its blocks leave the prefix cache) sits above the runner.
    with serve_in_process(tiny_checkpoint, enforce_eager=True) as server:
        yield server


def run_batch(
    server: InProcessServer, victim_stream: bool, victim_prompt: list[int]
) -> tuple[list[str], Any]:
    """The six others and the victim, all submitted at once; (others' texts, the victim's result)."""
    results: dict[str, Any] = {}
    start = threading.Barrier(len(OTHERS) + 1)

    def other(i: int) -> None:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            body = {"model": server.model, "prompt": OTHERS[i], "max_tokens": OTHER_MAX_TOKENS,
                    "logit_bias": {str(MARKER): -100}, **GREEDY}  # fmt: skip
            start.wait()
            r = client.post("/v1/completions", json=body)
            results[f"other{i}"] = (r.status_code, r.json())

    def victim() -> None:
        body = {"model": server.model, "prompt": victim_prompt, "max_tokens": 40, **GREEDY}
        with httpx.Client(base_url=server.url, timeout=60) as client:
            start.wait()
            if victim_stream:
                with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    results["victim"] = (r.status_code, list(sse_events(r)))
            else:
                r = client.post("/v1/completions", json=body)
                results["victim"] = (r.status_code, r.json())

    threads = [threading.Thread(target=other, args=(i,)) for i in range(len(OTHERS))]
    threads.append(threading.Thread(target=victim))
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    texts = []
    for i in range(len(OTHERS)):
        status, body = results[f"other{i}"]
        assert status == 200, body
        texts.append(body["choices"][0]["text"])
    return texts, results["victim"]


@pytest.fixture(scope="module")
def clean(live: InProcessServer) -> list[str]:
    texts, (status, _) = run_batch(live, victim_stream=False, victim_prompt=VICTIM)
    assert status == 200
    return texts


FAULTS: dict[str, Callable[[Any], contextlib.AbstractContextManager[None]]] = {
    "nan-logits": lambda model: poisoned_logits(model, POISON_FROM, float("nan")),
    "inf-logits": lambda model: poisoned_logits(model, POISON_FROM, float("inf")),
    "neg-inf-logits": lambda model: poisoned_logits(model, POISON_FROM, float("-inf")),
    "nan-hidden-state": lambda model: poisoned_hidden_state(model, POISON_FROM),
    # In the prompt: full cache blocks of NaN keys and values, which prefix caching must never hand out.
    "nan-kv-in-prompt": lambda model: poisoned_token(model, MARKER),
}


@pytest.mark.parametrize("victim_stream", [True, False], ids=["stream", "non-stream"])
@pytest.mark.parametrize("fault", list(FAULTS))
def test_non_finite_row_fails_only_its_request(
    live: InProcessServer, clean: list[str], fault: str, victim_stream: bool
) -> None:
    # A first token of its own: none of the victim's blocks can come from an earlier run's prefix cache.
    victim_prompt = [1 + list(FAULTS).index(fault) * 2 + victim_stream, *VICTIM[1:]]
    with FAULTS[fault](live.transformer):
        texts, (status, victim) = run_batch(live, victim_stream, victim_prompt)
    assert texts == clean  # the others: byte for byte as in the clean run
    if victim_stream:
        assert status == 200 and victim[-1] == "[DONE]", victim
        error = victim[-2]["error"]
        assert error["code"] == "engine_error" and "non-finite" in error["message"]
        streamed = "".join(e["choices"][0]["text"] for e in victim[:-2])
    else:
        assert status == 500 and victim["error"]["code"] == "engine_error"
        streamed = ""
    wait_until(lambda: live.engine.stats().kv_used_tokens == 0 and live.engine.stats().running == 0)
    # Without the fault the same prompt runs clean: no poisoned block was kept for prefix caching,
    # and what the victim streamed before failing was the start of the right answer.
    with httpx.Client(base_url=live.url, timeout=60) as client:
        body = {"model": live.model, "prompt": victim_prompt, "max_tokens": 40, **GREEDY}
        again = client.post("/v1/completions", json=body)
        assert again.status_code == 200, again.text
        assert again.json()["choices"][0]["text"].startswith(streamed)
