"""Structured output through the real server: response_format, guided_*, the SDK's parse(), bad input."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import httpx
import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from bench.harness import RunningServer, scrape
from tests.api.inprocess_server import serve_in_process
from tests.support import sse_events, wait_idle

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 12},
        "count": {"type": "integer", "minimum": -3, "maximum": 250},
        "status": {"enum": ["draft", "final", 7, None]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3},
        "owner": {"$ref": "#/$defs/person"},
        "reviewers": {"type": "array", "items": {"$ref": "#/$defs/person"}, "maxItems": 2},
    },
    "required": ["title", "count", "status", "tags", "owner", "reviewers"],
    "additionalProperties": False,
    "$defs": {
        "person": {
            "type": "object",
            "properties": {
                "name": {"type": "string", "maxLength": 6},
                "level": {"type": "integer", "minimum": 1, "maximum": 3},
                "admin": {"type": "boolean"},
            },
            "required": ["name", "level", "admin"],
            "additionalProperties": False,
        }
    },
}
MESSAGES = [{"role": "user", "content": "Describe the document as JSON."}]


class Pet(BaseModel):
    kind: Literal["cat", "dog", "fish"]
    age: int = Field(ge=0, le=30)


class Person(BaseModel):
    name: str = Field(max_length=8)
    pets: list[Pet] = Field(min_length=1, max_length=3)


@pytest.fixture(scope="module")
def server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server()


def json_schema_format(schema: dict[str, Any]) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "doc", "schema": schema, "strict": True}}


def chat(server: RunningServer, **fields: Any) -> dict[str, Any]:
    return {"model": server.model, "messages": MESSAGES, **fields}


def stream_texts(http: httpx.Client, path: str, body: dict[str, Any]) -> dict[int, tuple[str, str | None]]:
    """Each choice's streamed text and finish reason."""
    texts: dict[int, list[str]] = {}
    reasons: dict[int, str | None] = {}
    with http.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for event in sse_events(r):
            if event == "[DONE]":
                break
            for choice in event["choices"]:
                piece = choice["delta"].get("content") if "delta" in choice else choice["text"]
                texts.setdefault(choice["index"], []).append(piece or "")
                if choice["finish_reason"]:
                    reasons[choice["index"]] = choice["finish_reason"]
    return {i: ("".join(parts), reasons.get(i)) for i, parts in texts.items()}


def test_sdk_parse_returns_the_pydantic_object(sdk: openai.OpenAI, server: RunningServer) -> None:
    completion = sdk.chat.completions.parse(
        model=server.model, messages=MESSAGES, response_format=Person, max_tokens=300, seed=1
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert isinstance(choice.message.parsed, Person)
    assert choice.message.parsed == Person.model_validate_json(choice.message.content or "")


def test_fifty_sampled_json_schema_outputs_validate(http: httpx.Client, server: RunningServer) -> None:
    outputs = []
    for seed in range(5):
        body = chat(server, response_format=json_schema_format(SCHEMA), n=10, temperature=1.0, seed=10 * seed,
                    max_tokens=400)  # fmt: skip
        r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        outputs += [(c["message"]["content"], c["finish_reason"]) for c in r.json()["choices"]]
    assert len(outputs) == 50
    for text, reason in outputs:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len({text for text, _ in outputs}) > 40, "fifty different samples"


def test_fifty_streamed_guided_json_outputs_validate(http: httpx.Client, server: RunningServer) -> None:
    outputs = []
    for seed in range(5):
        body = chat(server, guided_json=SCHEMA, n=10, temperature=1.0, seed=100 + 10 * seed, max_tokens=400)
        outputs += list(stream_texts(http, "/v1/chat/completions", body).values())
    assert len(outputs) == 50
    for text, reason in outputs:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)


def test_json_object_mode(http: httpx.Client, server: RunningServer) -> None:
    body = chat(server, response_format={"type": "json_object"}, max_tokens=64, temperature=0)
    choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    text = choice["message"]["content"]
    assert text.startswith("{")
    if choice["finish_reason"] == "stop":  # a random model may also run out of tokens mid-object
        assert isinstance(json.loads(text), dict)


def test_seeds_and_prefix_caching_keep_constrained_outputs(http: httpx.Client, server: RunningServer) -> None:
    prompt = "A shared prefix long enough to fill several cache blocks. " * 4
    body = {"model": server.model, "prompt": prompt, "guided_json": SCHEMA, "seed": 42, "temperature": 1.0,
            "max_tokens": 300}  # fmt: skip
    first = http.post("/v1/completions", json=body).json()
    assert "error" not in first, first
    second = http.post("/v1/completions", json=body).json()
    assert second["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
    assert first["choices"][0]["text"] == second["choices"][0]["text"]
    jsonschema.validate(json.loads(first["choices"][0]["text"]), SCHEMA)


@pytest.mark.parametrize("stream", [False, True])
def test_guided_regex_on_completions(http: httpx.Client, server: RunningServer, stream: bool) -> None:
    regex = r"[0-9]{3}-[a-z]{2}(/[A-Z])?"
    body = {"model": server.model, "prompt": "Code:", "guided_regex": regex, "n": 4, "temperature": 1.0,
            "seed": 3, "max_tokens": 30}  # fmt: skip
    if stream:
        outputs = list(stream_texts(http, "/v1/completions", body).values())
    else:
        choices = http.post("/v1/completions", json=body).json()["choices"]
        outputs = [(c["text"], c["finish_reason"]) for c in choices]
    assert len(outputs) == 4
    for text, _ in outputs:
        assert re.fullmatch(regex, text), text


def test_guided_choice(http: httpx.Client, server: RunningServer) -> None:
    choices = ["positive", "negative", "neutral ☺"]
    body = chat(server, guided_choice=choices, n=8, temperature=1.0, seed=5)
    for c in http.post("/v1/chat/completions", json=body).json()["choices"]:
        assert c["message"]["content"] in choices and c["finish_reason"] == "stop"


@pytest.mark.parametrize(
    ("grammar", "pattern"),
    [
        (
            'root ::= hi " " name\nhi ::= "hello" | "hi"\nname ::= [a-z] [a-z]? [a-z]?',
            r"(hello|hi) [a-z]{1,3}",
        ),
        ('start: "(" NUM ("," NUM)~0..2 ")"\nNUM: /[1-9][0-9]?/', r"\([1-9][0-9]?(,[1-9][0-9]?){0,2}\)"),
    ],
    ids=["gbnf", "lark"],
)
def test_guided_grammar(http: httpx.Client, server: RunningServer, grammar: str, pattern: str) -> None:
    body = chat(server, guided_grammar=grammar, n=4, temperature=1.0, seed=6, max_tokens=40)
    for c in http.post("/v1/chat/completions", json=body).json()["choices"]:
        assert re.fullmatch(pattern, c["message"]["content"]), c["message"]["content"]
        assert c["finish_reason"] == "stop"


def test_unsatisfiable_under_max_tokens_ends_with_length(http: httpx.Client, server: RunningServer) -> None:
    body = chat(server, guided_regex="z{300}", max_tokens=5)
    choice = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["finish_reason"] == "length" and set(choice["message"]["content"]) == {"z"}


def test_free_requests_beside_constrained_ones_give_their_solo_text(
    server: RunningServer, http: httpx.Client
) -> None:
    prompts = ["def parse(text):", "import os\n", "class Queue:"]
    free = [{"model": server.model, "prompt": p, "max_tokens": 24, "temperature": 0, "ignore_eos": True}
            for p in prompts]  # fmt: skip
    alone = [http.post("/v1/completions", json=b).json()["choices"][0]["text"] for b in free]
    constrained = [chat(server, guided_json=SCHEMA, n=4, seed=s, max_tokens=400) for s in range(3)]
    results: dict[str, Any] = {}

    def post(key: str, path: str, body: dict[str, Any]) -> None:
        with server.client() as client:
            results[key] = client.post(path, json=body).json()

    jobs = [(f"c{i}", "/v1/chat/completions", b) for i, b in enumerate(constrained)]
    jobs += [(f"f{i}", "/v1/completions", b) for i, b in enumerate(free)]
    threads = [threading.Thread(target=post, args=job) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert [results[f"f{i}"]["choices"][0]["text"] for i in range(3)] == alone
    for i in range(3):
        for c in results[f"c{i}"]["choices"]:
            jsonschema.validate(json.loads(c["message"]["content"]), SCHEMA)


def test_metrics_count_constrained_requests_and_compiles(http: httpx.Client, server: RunningServer) -> None:
    before = scrape(server.url)
    regex = r"[a-f]{2}[0-9]"  # not compiled yet by any other test
    for _ in range(2):
        assert http.post("/v1/chat/completions", json=chat(server, guided_regex=regex)).status_code == 200
    after = scrape(server.url)
    kinds = "tinyserve_structured_output_requests_total"
    assert after.get(kinds, kind="regex") - before.get(kinds, kind="regex") == 2
    compiles = "tinyserve_grammar_compile_seconds_count"
    assert after.get(compiles) - before.get(compiles) == 1, "the second request used the cached grammar"


BIG = {"type": "object", "properties": {"x": {"type": "string"}}}
BAD_INPUTS = [
    ({"response_format": json_schema_format({"type": "strin"})}, "response_format", "invalid JSON Schema"),
    (
        {"response_format": json_schema_format({"type": "object", "required": "a"})},
        "response_format",
        "invalid",
    ),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format", "schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "schema"),
    ({"response_format": {"type": "xml"}}, "response_format", ""),
    ({"response_format": {"type": "json_object", "json_schema": {"name": "x"}}}, "response_format", ""),
    ({"guided_json": {"not": {"type": "string"}}}, "guided_json", "Unimplemented"),
    ({"guided_json": {"type": "object", "if": {}, "then": {}}}, "guided_json", "Unimplemented"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": "[1, 2]"}, "guided_json", "object"),
    ({"guided_json": {"$ref": "#/$defs/nowhere"}}, "guided_json", "does not exist"),
    ({"guided_regex": "a(("}, "guided_regex", "unclosed group"),
    ({"guided_regex": ""}, "guided_regex", "empty"),
    ({"guided_choice": []}, "guided_choice", "at least one"),
    ({"guided_grammar": 'root ::= ("a"'}, "guided_grammar", "GBNF"),
    ({"guided_grammar": "start: missing_rule"}, "guided_grammar", "unknown name"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
    ({"response_format": {"type": "json_object"}, "guided_json": BIG}, "guided_json", "at most one"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("fields", "param", "message"), BAD_INPUTS)
def test_bad_structured_inputs_are_400s_naming_the_parameter(
    http: httpx.Client, server: RunningServer, fields: dict[str, Any], param: str, message: str, stream: bool
) -> None:
    started = scrape(server.url).get("tinyserve_requests_started_total")
    r = http.post("/v1/chat/completions", json=chat(server, stream=stream, **fields))
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"]
    assert error["type"] == "invalid_request_error"
    assert scrape(server.url).get("tinyserve_requests_started_total") == started, "no work was queued"
    assert wait_idle(http)["kv_used_tokens"] == 0


def huge_schema() -> dict[str, Any]:
    """A schema whose compile takes most of a second even on a fast machine (measured: 0.7 s here)."""
    fields = {
        f"g{j}": {"type": "string", "pattern": f"^[a-z]{{1,{j + 2}}}x[0-9]{{{j % 7 + 1}}}$"}
        for j in range(40)
    }
    objects = {f"f{i}": {"type": "object", "properties": fields} for i in range(100)}
    return {"type": "object", "properties": objects}


def test_slow_compile_is_refused_and_blocks_no_one(tiny_checkpoint: Path) -> None:
    with serve_in_process(tiny_checkpoint, enforce_eager=True, grammar_compile_timeout=0.1) as quick:
        client = httpx.Client(base_url=quick.url, timeout=60, trust_env=False)
        body = {"model": quick.model, "messages": MESSAGES, "guided_json": huge_schema()}
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "guided_json"
        assert "took longer than 0.1 s" in r.json()["error"]["message"]
        # While that compile still runs in the pool, other requests (with a grammar or without) go on.
        plain = client.post("/v1/completions", json={"model": quick.model, "prompt": "hi", "max_tokens": 4})
        body = {"model": quick.model, "prompt": "hi", "guided_choice": ["a", "b"]}
        choice = client.post("/v1/completions", json=body)
        assert plain.status_code == 200 and choice.status_code == 200
        assert choice.json()["choices"][0]["text"] in ("a", "b")
        assert wait_idle(client)["kv_used_tokens"] == 0
        client.close()
