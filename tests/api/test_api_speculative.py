"""Speculative decoding through the real server: same answers, its metrics, access line and start-up."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from bench.harness import RunningServer, free_port, scrape
from tests.api.test_api_metrics import access_lines
from tests.conftest import make_tiny_checkpoint
from tests.support import assert_one_line_error, run_server, sse_events

PROMPTS = [
    "def f(x):\n    return x + 1\n\ndef g(x):\n    return x + 1\n\ndef h(x):\n",
    "import os\nimport sys\nimport os\nimport sys\nimport",
    "Hello, world! Hello, world! Hello,",
    "class A:\n",
]


@pytest.fixture(scope="module")
def servers(start_server: Callable[..., RunningServer]) -> tuple[RunningServer, RunningServer]:
    spec = ("--speculative-method", "ngram", "--prompt-lookup-min", "1", "--num-speculative-tokens", "3")
    return start_server(), start_server(*spec)


Answer = tuple[str, str | None, list[float]]
"""Text, finish reason and token logprobs of one choice."""


def answers(server: RunningServer, **body: object) -> list[Answer]:
    with server.client() as client:
        out = []
        for prompt in PROMPTS:
            payload = {"model": server.model, "prompt": prompt, "logprobs": 1, **body}
            r = client.post("/v1/completions", json=payload, headers={"X-Request-Id": f"spec-{len(out)}"})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            out.append((choice["text"], choice["finish_reason"], choice["logprobs"]["token_logprobs"]))
        return out


def assert_same(a: list[Answer], b: list[Answer]) -> None:
    for (ta, fa, la), (tb, fb, lb) in zip(a, b, strict=True):
        assert (ta, fa) == (tb, fb)
        assert la == pytest.approx(lb, abs=1e-3)


def test_answers_are_those_of_plain_decoding(servers: tuple[RunningServer, RunningServer]) -> None:
    plain, spec = servers
    before = scrape(spec.url)
    for body in (
        {"max_tokens": 40, "temperature": 0, "ignore_eos": True},
        {"max_tokens": 30, "temperature": 0.8, "top_k": 5, "seed": 11, "stop": ["\n\n"]},
        {"max_tokens": 25, "temperature": 0, "frequency_penalty": 0.5, "stop": ["x"]},
    ):
        assert_same(answers(plain, **body), answers(spec, **body))
    after = scrape(spec.url)
    accepted = after.get("tinyserve_spec_decode_num_accepted_tokens_total") - before.get(
        "tinyserve_spec_decode_num_accepted_tokens_total"
    )
    drafts = after.get("tinyserve_spec_decode_num_drafts_total")
    assert accepted > 0 and drafts > 0
    assert after.get("tinyserve_spec_decode_num_draft_tokens_total") >= accepted
    assert after.get("tinyserve_spec_decode_num_emitted_tokens_total") >= accepted + drafts
    assert after.get("tinyserve_spec_decode_mean_acceptance_length") > 1
    assert scrape(plain.url).get("tinyserve_spec_decode_num_drafts_total") == 0


def test_streaming_is_the_same_text(servers: tuple[RunningServer, RunningServer]) -> None:
    texts = []
    for server in servers:
        body = {"model": server.model, "prompt": PROMPTS[0], "max_tokens": 48, "temperature": 0}
        body["stream"] = True
        with server.client() as client, client.stream("POST", "/v1/completions", json=body) as r:
            events = [e for e in sse_events(r) if e != "[DONE]"]
        texts.append("".join(e["choices"][0]["text"] for e in events))
    assert texts[0] == texts[1] and texts[0]


def test_start_up_line_and_access_line(servers: tuple[RunningServer, RunningServer]) -> None:
    plain, spec = servers
    assert (
        "speculative ngram (n-grams 1-5), k=3, off above 4" in spec.log() and "no speculation" in plain.log()
    )
    answers(spec, max_tokens=40, temperature=0, ignore_eos=True)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [a for a in access_lines(spec.log()) if a.get("request_id") == "spec-0"]
        if lines:
            break
        time.sleep(0.05)
    assert lines and 0 <= float(lines[-1]["spec_acceptance"]) <= 1, lines
    assert all("spec_acceptance" not in a for a in access_lines(plain.log()))


def test_draft_model_through_the_server(
    servers: tuple[RunningServer, RunningServer],
    start_server: Callable[..., RunningServer],
    tiny_checkpoint: Path,
) -> None:
    plain, _ = servers
    draft = start_server("--speculative-method", "draft", "--speculative-model", str(tiny_checkpoint))
    body = {"max_tokens": 32, "temperature": 0, "ignore_eos": True}
    assert_same(answers(plain, **body), answers(draft, **body))
    assert f"speculative draft model {tiny_checkpoint.name}" in draft.log()
    assert scrape(draft.url).get("tinyserve_spec_decode_num_accepted_tokens_total") > 0


def test_a_draft_with_another_vocabulary_fails_before_the_port_opens(
    tiny_checkpoint: Path, tmp_path: Path
) -> None:
    other = make_tiny_checkpoint(tmp_path / "other", added_tokens=("<extra>",))
    args = ("--model", str(tiny_checkpoint), "--port", str(free_port()), "--enforce-eager")
    draft = ("--speculative-method", "draft", "--speculative-model", str(other))
    assert_one_line_error(run_server(*args, *draft), "tokenizer is not the served model's")


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (("--deterministic",), "--deterministic"),
        (("--prompt-lookup-min", "4", "--prompt-lookup-max", "2"), "--prompt-lookup-min"),
        (("--num-speculative-tokens", "99"), "--num-speculative-tokens"),
        (("--speculative-model", "weights/default"), "--speculative-model goes with"),
    ],
)
def test_bad_combinations_fail_before_the_port_opens(
    tiny_checkpoint: Path, flags: tuple[str, ...], fragment: str
) -> None:
    args = ("--model", str(tiny_checkpoint), "--port", str(free_port()), "--speculative-method", "ngram")
    assert_one_line_error(run_server(*args, "--enforce-eager", *flags), fragment)
