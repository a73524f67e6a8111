"""OpenAI tools through the real server: forced calls under a grammar, parsed calls, history, bad input.

A random model never writes a tool call by itself, so the checkpoint here has one extra vocabulary
entry holding a whole `<tool_call>` block; `logit_bias` makes the model emit it, and the server's own
template, parser and stream formatting do the rest.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from bench.harness import RunningServer, scrape
from model.tokenizer import Tokenizer
from tests.conftest import make_tiny_checkpoint
from tests.support import sse_events, wait_idle

CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}\n</tool_call>'
WEATHER = {
    "type": "object",
    "properties": {"city": {"type": "string", "maxLength": 10}, "unit": {"enum": ["c", "f"]}},
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"$ref": "#/$defs/zone"}, "exact": {"type": "boolean"}},
    "required": ["zone"],
    "additionalProperties": False,
    "$defs": {"zone": {"enum": ["UTC", "CET", "PST"]}},
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME, "strict": True}},
]
PARAMETERS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = make_tiny_checkpoint(tmp_path_factory.mktemp("tool_checkpoint"), added_tokens=(CALL,))
    config = json.loads((directory / "config.json").read_text())
    config["max_position_embeddings"] = 2048  # the tools' system turn alone is ~700 tiny-vocabulary tokens
    (directory / "config.json").write_text(json.dumps(config))
    return directory


@pytest.fixture(scope="module")
def server(start_server: Callable[..., RunningServer], checkpoint: Path) -> RunningServer:
    return start_server(model=checkpoint)


@pytest.fixture(scope="module")
def call_token(checkpoint: Path) -> int:
    token = Tokenizer.load(checkpoint).token_id(CALL)
    assert token is not None
    return token


def body(server: RunningServer, **fields: Any) -> dict[str, Any]:
    return {"model": server.model, "messages": MESSAGES, "tools": TOOLS, **fields}


def assert_valid_call(call: Any) -> None:
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])


def streamed(http: httpx.Client, request: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Each choice accumulated from the stream the way the SDK does: content, tool_calls, finish_reason."""
    choices: dict[int, dict[str, Any]] = {}
    with http.stream("POST", "/v1/chat/completions", json={**request, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        for event in sse_events(r):
            if event == "[DONE]":
                break
            for c in event["choices"]:
                acc = choices.setdefault(c["index"], {"content": "", "tool_calls": {}, "finish_reason": None})
                acc["content"] += c["delta"].get("content") or ""
                for call in c["delta"].get("tool_calls", []):
                    slot = acc["tool_calls"].setdefault(
                        call["index"], {"id": None, "name": "", "arguments": ""}
                    )
                    slot["id"] = call.get("id") or slot["id"]
                    slot["name"] += call.get("function", {}).get("name") or ""
                    slot["arguments"] += call.get("function", {}).get("arguments") or ""
                acc["finish_reason"] = c["finish_reason"] or acc["finish_reason"]
    return choices


def test_required_calls_follow_their_schemas(sdk: openai.OpenAI, server: RunningServer) -> None:
    completion = sdk.chat.completions.create(
        model=server.model, messages=MESSAGES, tools=TOOLS, tool_choice="required",  # type: ignore[arg-type]
        n=6, temperature=1.0, seed=1, max_tokens=300,
    )  # fmt: skip
    names = set()
    for choice in completion.choices:
        assert choice.finish_reason == "tool_calls", choice.message
        assert choice.message.content is None and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert_valid_call(call)
            names.add(call.function.name)
    assert names == {"get_weather", "get_time"}


def test_required_without_parallel_calls_makes_one_call(http: httpx.Client, server: RunningServer) -> None:
    request = body(server, tool_choice="required", parallel_tool_calls=False, n=4, temperature=1.0, seed=2)
    for choice in http.post("/v1/chat/completions", json=request).json()["choices"]:
        assert len(choice["message"]["tool_calls"]) == 1 and choice["finish_reason"] == "tool_calls"


def test_named_tool_choice_streams_that_call(http: httpx.Client, server: RunningServer) -> None:
    choice = {"type": "function", "function": {"name": "get_time"}}
    choices = streamed(http, body(server, tool_choice=choice, n=3, temperature=1.0, seed=3, max_tokens=100))
    for acc in choices.values():
        assert acc["finish_reason"] == "tool_calls" and acc["content"] == ""
        [call] = acc["tool_calls"].values()
        assert call["name"] == "get_time" and call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), TIME)


def test_auto_parses_the_models_tool_calls(
    sdk: openai.OpenAI, http: httpx.Client, server: RunningServer, call_token: int
) -> None:
    forced = {str(call_token): 100}
    completion = sdk.chat.completions.create(
        model=server.model, messages=MESSAGES, tools=TOOLS, logit_bias=forced, max_tokens=2,  # type: ignore[arg-type]
    )  # fmt: skip
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris", "unit": "c"})
    ] * 2
    assert len({c.id for c in calls}) == 2
    acc = streamed(http, body(server, logit_bias=forced, max_tokens=2))[0]
    assert acc["finish_reason"] == "tool_calls" and acc["content"] == ""
    assert [(c["name"], c["arguments"]) for c in acc["tool_calls"].values()] == [
        ("get_weather", '{"city": "Paris", "unit": "c"}')
    ] * 2


def test_auto_renders_the_tools_and_a_plain_reply_stays_text(
    http: httpx.Client, server: RunningServer
) -> None:
    plain = {"model": server.model, "messages": MESSAGES, "max_tokens": 8, "temperature": 0}
    without = http.post("/v1/chat/completions", json=plain).json()
    with_tools = http.post("/v1/chat/completions", json={**plain, "tools": TOOLS}).json()
    assert with_tools["usage"]["prompt_tokens"] > without["usage"]["prompt_tokens"] + 50
    message = with_tools["choices"][0]["message"]
    assert "tool_calls" not in message and isinstance(message["content"], str)
    assert with_tools["choices"][0]["finish_reason"] in ("stop", "length")


def test_tool_choice_none_neither_renders_nor_parses(
    http: httpx.Client, server: RunningServer, call_token: int
) -> None:
    plain = http.post(
        "/v1/chat/completions", json={"model": server.model, "messages": MESSAGES, "max_tokens": 1}
    )
    request = body(server, tool_choice="none", logit_bias={str(call_token): 100}, max_tokens=1)
    r = http.post("/v1/chat/completions", json=request).json()
    assert r["usage"]["prompt_tokens"] == plain.json()["usage"]["prompt_tokens"]
    assert r["choices"][0]["message"]["content"] == CALL and r["choices"][0]["finish_reason"] == "length"


def test_tool_results_feed_a_second_turn(http: httpx.Client, server: RunningServer, call_token: int) -> None:
    first = http.post(
        "/v1/chat/completions", json=body(server, logit_bias={str(call_token): 100}, max_tokens=1)
    )
    message = first.json()["choices"][0]["message"]
    [call] = message["tool_calls"]
    history = [*MESSAGES, message, {"role": "tool", "tool_call_id": call["id"], "content": "21 degrees"}]
    second = http.post("/v1/chat/completions", json=body(server, messages=history, max_tokens=5))
    assert second.status_code == 200, second.text
    rendered = http.post("/tokenize", json={"model": server.model, "messages": history}).json()["tokens"]
    text = http.post("/detokenize", json={"model": server.model, "tokens": rendered}).json()["prompt"]
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}' in text
    assert "<tool_response>\n21 degrees\n</tool_response>" in text


def test_constrained_tool_requests_are_counted(http: httpx.Client, server: RunningServer) -> None:
    before = scrape(server.url).get("tinyserve_structured_output_requests_total", kind="tool_call")
    assert http.post("/v1/chat/completions", json=body(server, tool_choice="required")).status_code == 200
    after = scrape(server.url).get("tinyserve_structured_output_requests_total", kind="tool_call")
    assert after - before == 1


def tool(name: Any = "f", parameters: Any = None) -> dict[str, Any]:
    function: dict[str, Any] = {"name": name} if name is not None else {}
    if parameters is not None:
        function["parameters"] = parameters
    return {"type": "function", "function": function}


ASSISTANT_CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
BROKEN = {**ASSISTANT_CALL, "function": {"name": "f", "arguments": "{"}}
BAD_INPUTS = [
    ({"tools": [tool(name=None)]}, "tools", "name"),
    ({"tools": [tool(name="has space")]}, "tools", "letters, digits"),
    ({"tools": [tool(), tool()]}, "tools", "twice"),
    ({"tools": [tool(parameters={"type": "strin"})]}, "tools", "invalid JSON Schema"),
    ({"tools": [tool(parameters={"not": {}})], "tool_choice": "required"}, "tools", "Unimplemented"),
    ({"tools": [{"type": "retrieval"}]}, "tools", ""),
    ({"tools": [tool()], "tool_choice": {"type": "function", "function": {"name": "g"}}}, "tool_choice", "g"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tool_choice": {"type": "function", "function": {"name": "f"}}}, "tool_choice", "needs tools"),
    ({"tools": [tool()], "tool_choice": "sometimes"}, "tool_choice", ""),
    ({"tools": [tool()], "response_format": {"type": "json_object"}}, "response_format", "combined"),
    ({"tools": [tool()], "guided_regex": "a+"}, "guided_regex", "combined"),
    ({"messages": [{"role": "tool", "content": "20C"}]}, "messages", "tool_call_id"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": [ASSISTANT_CALL]}]}, "messages", "only"),
    ({"messages": [{"role": "user", "content": "x", "tool_call_id": "c1"}]}, "messages", "tool_call_id"),
    ({"messages": [{"role": "assistant", "tool_calls": [BROKEN]}]}, "messages", "not valid JSON"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c1", "type": "function"}]}]}, "messages", ""),
    ({"messages": [{"role": "assistant", "content": None}]}, "messages", "content"),
]  # fmt: skip


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("fields", "param", "message"), BAD_INPUTS)
def test_bad_tool_inputs_are_400s_naming_the_parameter(
    http: httpx.Client, server: RunningServer, fields: dict[str, Any], param: str, message: str, stream: bool
) -> None:
    started = scrape(server.url).get("tinyserve_requests_started_total")
    request = {"model": server.model, "messages": MESSAGES, "stream": stream, **fields}
    r = http.post("/v1/chat/completions", json=request)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and message in error["message"], error
    assert scrape(server.url).get("tinyserve_requests_started_total") == started, "no work was queued"
    assert wait_idle(http)["kv_used_tokens"] == 0
