"""Request schemas → SamplingParams, and every failure → OpenAI's error shape (pure: no server)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from server.api.errors import APIError, from_engine_exception, validation_error
from server.api.schemas import MAX_PROMPTS, ChatCompletionRequest, CompletionRequest, LegacyLogprobs
from server.api.structured import structured_output
from server.engine.outputs import EngineError, EngineOverloaded, EngineStopped, TokenLogprob, TopLogprob
from server.engine.params import ParamError, SamplingParams
from server.engine.structured import Constraint


def completion(**fields: Any) -> CompletionRequest:
    return CompletionRequest.model_validate({"model": "m", "prompt": "hi", **fields})


def chat(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_unset_fields_keep_sampling_defaults() -> None:
    assert completion().sampling_params({}) == SamplingParams()
    assert chat().sampling_params({}) == SamplingParams(max_tokens=None)  # chat: up to the context


def test_openai_and_extension_fields_reach_sampling_params() -> None:
    params = completion(
        n=2, max_tokens=5, temperature=0.5, top_p=0.9, stop=["a", "b"], presence_penalty=0.1,
        frequency_penalty=-0.2, logit_bias={"7": 3}, seed=11, logprobs=3, top_k=4, min_p=0.05,
        repetition_penalty=1.1, ignore_eos=True, stop_token_ids=[1, 2], min_tokens=1,
        skip_special_tokens=False, user="someone",
    ).sampling_params({})  # fmt: skip
    assert params == SamplingParams(
        n=2, max_tokens=5, temperature=0.5, top_p=0.9, stop=("a", "b"), presence_penalty=0.1,
        frequency_penalty=-0.2, logit_bias={7: 3.0}, seed=11, logprobs=3, top_k=4, min_p=0.05,
        repetition_penalty=1.1, ignore_eos=True, stop_token_ids=(1, 2), min_tokens=1,
        skip_special_tokens=False,
    )  # fmt: skip


def test_chat_token_limits_and_logprobs() -> None:
    assert chat(max_tokens=9).sampling_params({}).max_tokens == 9
    assert chat(max_tokens=9, max_completion_tokens=4).sampling_params({}).max_tokens == 4
    assert chat(logprobs=True).sampling_params({}).logprobs == 0
    assert chat(logprobs=True, top_logprobs=5).sampling_params({}).logprobs == 5
    assert chat(logprobs=False).sampling_params({}).logprobs is None


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"temperature": 2.5}, "temperature"),
        ({"n": 0}, "n"),
        ({"stop": ["x"] * 100}, "stop"),
        ({"logit_bias": {"abc": 1}}, "logit_bias"),
        ({"top_p": float("nan")}, "top_p"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"echo": True, "logprobs": 21}, "logprobs"),
        ({"suffix": "tail"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
    ],
)
def test_completion_param_errors_name_the_field(request_fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ParamError) as exc:
        completion(**request_fields).sampling_params({})
    assert exc.value.param == param


@pytest.mark.parametrize(
    ("request_fields", "param"),
    [
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 99}, "top_logprobs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"modalities": ["text", "audio"]}, "modalities"),
    ],
)
def test_chat_param_errors_name_the_field(request_fields: dict[str, Any], param: str) -> None:
    with pytest.raises(ParamError) as exc:
        chat(**request_fields).sampling_params({})
    assert exc.value.param == param


def test_harmless_openai_fields_are_accepted() -> None:
    request = chat(user="u", store=False, metadata={"k": "v"}, service_tier="auto", parallel_tool_calls=True,
                   response_format={"type": "text"}, tool_choice="none", modalities=["text"])  # fmt: skip
    assert request.sampling_params({}) == SamplingParams(max_tokens=None)


def test_structured_fields_become_one_constraint() -> None:
    assert structured_output(chat()) is None
    assert structured_output(chat(response_format={"type": "text"})) is None
    json_object = structured_output(chat(response_format={"type": "json_object"}))
    assert json_object is not None and json_object.kind == "json_object"
    assert json_object.constraint == Constraint("json_schema", '{"type":"object"}')
    schema = {"type": "object", "properties": {"b": {}, "a": {}}}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    from_format = structured_output(chat(response_format=fmt))
    from_guided = structured_output(completion(guided_json=json.dumps(schema, indent=2)))
    assert from_format is not None and from_guided is not None
    assert from_format.constraint == from_guided.constraint, "one cache entry, whichever field carried it"
    assert from_format.constraint.source == '{"type":"object","properties":{"b":{},"a":{}}}', "key order kept"
    choice = structured_output(completion(guided_choice=["x", "y"]))
    assert choice is not None and (choice.kind, choice.constraint.param) == ("choice", "guided_choice")


def test_prompt_shapes() -> None:
    assert completion(prompt="a").prompts() == ["a"]
    assert completion(prompt=[1, 2]).prompts() == [[1, 2]]
    assert completion(prompt=["a", [3]]).prompts() == ["a", [3]]
    for empty in ("", [], [[]], ["a", ""]):
        with pytest.raises(ParamError, match="empty"):
            completion(prompt=empty).prompts()
    with pytest.raises(ParamError, match="at most"):
        completion(prompt=["a"] * (MAX_PROMPTS + 1)).prompts()


@pytest.mark.parametrize(
    "fields",
    [{"prompt": 5}, {"prompt": [1, "a"]}, {"prompt": [True]}, {"n": "2"}, {"stream": "true"}, {"unknown": 1}],
)
def test_wrong_types_and_unknown_fields_fail_validation(fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        completion(**fields)


def test_message_content_parts() -> None:
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    request = ChatCompletionRequest.model_validate(
        {
            "model": "m",
            "messages": [{"role": "developer", "content": "sys"}, {"role": "user", "content": parts}],
        }
    )
    assert request.chat_messages() == [
        {"role": "system", "content": "sys"},
        {"role": "user", "content": "a\nb"},
    ]
    image = [{"type": "image_url", "image_url": {"url": "x"}}]
    with pytest.raises(ParamError, match="image_url"):
        ChatCompletionRequest.model_validate(
            {"model": "m", "messages": [{"role": "user", "content": image}]}
        ).chat_messages()
    with pytest.raises(ParamError, match="empty"):
        ChatCompletionRequest.model_validate({"model": "m", "messages": []}).chat_messages()


def _shape(error: APIError) -> dict[str, Any]:
    body = error.body()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def test_engine_exceptions_become_openai_errors() -> None:
    e = from_engine_exception(ParamError("prompt", "too long"))
    assert e.status == 400 and _shape(e) == {
        "message": "too long", "type": "invalid_request_error", "param": "prompt", "code": "invalid_value",
    }  # fmt: skip
    e = from_engine_exception(EngineOverloaded("busy"))
    assert e.status == 503 and e.headers and int(e.headers["Retry-After"]) >= 1
    assert from_engine_exception(EngineStopped("bye")).status == 503
    assert from_engine_exception(EngineError("nan")).status == 500
    assert _shape(from_engine_exception(RuntimeError("x")))["type"] == "server_error"


def test_validation_errors_become_400_naming_the_param() -> None:
    try:
        completion(temperature="hot")
    except ValidationError as exc:
        errors = [{**e, "loc": ("body", *e["loc"])} for e in exc.errors()]
    e = validation_error(RequestValidationError(errors))
    assert e.status == 400 and _shape(e)["param"] == "temperature"
    bad_json = [
        {"type": "json_invalid", "loc": ("body", 1), "msg": "JSON decode error", "ctx": {"error": "x"}}
    ]
    e = validation_error(RequestValidationError(bad_json))
    assert e.status == 400 and _shape(e)["param"] is None and "JSON" in e.message


def test_legacy_logprobs_offsets_run_across_chunks() -> None:
    def lp(text: str) -> TokenLogprob:
        return TokenLogprob(
            1, text, -0.5, list(text.encode()), [TopLogprob(1, text, -0.5, list(text.encode()))]
        )

    tracker = LegacyLogprobs()
    first = tracker.render([lp("ab"), lp("c")])
    second = tracker.render([lp("de")])
    assert first["text_offset"] == [0, 2] and second["text_offset"] == [3]
    assert first["tokens"] == ["ab", "c"] and first["top_logprobs"][0] == {"ab": -0.5}
