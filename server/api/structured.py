"""A request's structured-output fields → at most one engine Constraint, checked before any work.

OpenAI's `response_format` (`json_object`, `json_schema`) and vLLM's `guided_json`, `guided_regex`,
`guided_choice` and `guided_grammar` all become one `Constraint`; tools forced by `tool_choice` become
one too (server/api/tools.py). Two of them in one request contradict each other and are refused.
The compile itself (and every check that needs it) runs in the engine's compile pool.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from server.api.schemas import ChatCompletionRequest, CompletionRequest, check_unicode
from server.engine.params import ParamError
from server.engine.structured import Constraint

ANY_OBJECT = '{"type":"object"}'
GenerationRequest = CompletionRequest | ChatCompletionRequest


@dataclass(frozen=True)
class Structured:
    """A request's constraint and its kind, as the metrics count it (one of metrics.STRUCTURED_KINDS)."""

    constraint: Constraint
    kind: str


def schema_text(param: str, schema: Any) -> str:
    """A JSON Schema given as an object or as JSON text, as compact JSON text (key order kept: it is the
    order the properties are generated in)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(check_unicode(param, schema))
        except json.JSONDecodeError as exc:
            raise ParamError(param, f"{param} is not valid JSON ({exc})") from None
    if not isinstance(schema, dict):
        raise ParamError(param, f"{param} must be a JSON Schema object")
    try:
        return json.dumps(schema, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise ParamError(param, f"{param} holds a number JSON cannot represent") from None


def _response_format(body: GenerationRequest) -> Structured | None:
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        if fmt is not None and fmt.json_schema is not None:
            raise ParamError("response_format", "response_format.json_schema needs type json_schema")
        return None
    if fmt.type == "json_object":
        if fmt.json_schema is not None:
            raise ParamError("response_format", "response_format.json_schema needs type json_schema")
        return Structured(Constraint("json_schema", ANY_OBJECT, "response_format"), "json_object")
    if fmt.json_schema is None or fmt.json_schema.schema_ is None:
        raise ParamError(
            "response_format", "response_format of type json_schema needs json_schema.schema (an object)"
        )
    text = schema_text("response_format", fmt.json_schema.schema_)
    return Structured(Constraint("json_schema", text, "response_format"), "json_schema")


def _guided(body: GenerationRequest) -> list[Structured]:
    found = []
    if body.guided_json is not None:
        text = schema_text("guided_json", body.guided_json)
        found.append(Structured(Constraint("json_schema", text, "guided_json"), "json_schema"))
    if body.guided_regex is not None:
        if not body.guided_regex:
            raise ParamError("guided_regex", "guided_regex must not be empty")
        regex = check_unicode("guided_regex", body.guided_regex)
        found.append(Structured(Constraint("regex", regex, "guided_regex"), "regex"))
    if body.guided_choice is not None:
        if not body.guided_choice:
            raise ParamError("guided_choice", "guided_choice must list at least one string")
        for choice in body.guided_choice:
            check_unicode("guided_choice", choice)
        text = json.dumps(body.guided_choice, ensure_ascii=False)
        found.append(Structured(Constraint("choice", text, "guided_choice"), "choice"))
    if body.guided_grammar is not None:
        if not body.guided_grammar.strip():
            raise ParamError("guided_grammar", "guided_grammar must not be empty")
        grammar = check_unicode("guided_grammar", body.guided_grammar)
        found.append(Structured(Constraint("grammar", grammar, "guided_grammar"), "grammar"))
    return found


def structured_output(body: GenerationRequest) -> Structured | None:
    """The request's one constraint from response_format or guided_* (None: free text)."""
    found = [s for s in [_response_format(body), *_guided(body)] if s is not None]
    if len(found) > 1:
        names = ", ".join(s.constraint.param for s in found)
        raise ParamError(found[1].constraint.param, f"give at most one of {names}: they contradict")
    return found[0] if found else None
