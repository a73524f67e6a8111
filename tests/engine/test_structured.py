"""Constrained decoding inside the engine: masks per row, matchers per sequence, compile cache and errors."""

from __future__ import annotations

import json
import re
from collections.abc import Callable

import jsonschema
import pytest

from server.engine.core import LLMEngine
from server.engine.params import ParamError, SamplingParams
from server.engine.structured import CACHE_SIZE, Constraint
from tests.engine.engine_driver import run, submit
from tests.engine.test_engine_core import random_prompts

SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": -5, "maximum": 500},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "minItems": 1, "maxItems": 3},
        "owner": {"$ref": "#/$defs/person"},
    },
    "required": ["id", "tags", "owner"],
    "additionalProperties": False,
    "$defs": {
        "person": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 6}, "admin": {"type": "boolean"}},
            "required": ["name", "admin"],
            "additionalProperties": False,
        }
    },
}


def compile_schema(engine: LLMEngine, schema: dict[str, object] = SCHEMA) -> object:
    return engine.grammars.compile(Constraint("json_schema", json.dumps(schema)))


def test_free_rows_in_a_constrained_batch_give_their_solo_text(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    grammar = compile_schema(engine)
    prompts = random_prompts(6, engine.tokenizer.vocab_size, seed=21, max_len=30)
    free = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=200, temperature=1.0, seed=5)
    alone = [run(engine, [submit(engine, p, free)])[0].tokens() for p in prompts[:3]]
    mixed = [submit(engine, p, free) for p in prompts[:3]]
    mixed += [submit(engine, p, sampled, grammar) for p in prompts[3:]]  # type: ignore[arg-type]
    run(engine, mixed)
    assert [r.tokens() for r in mixed[:3]] == alone
    for r in mixed[3:]:
        assert r.finish_reason() == "stop" and r.error is None
        jsonschema.validate(json.loads(r.text()), SCHEMA)
    assert engine.blocks.num_used_blocks == 0
    assert all(s.matcher is None for r in mixed for s in r.request.sequences)


def test_sampling_parameters_apply_within_the_allowed_set(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    grammar = compile_schema(engine)
    prompt = engine.tokenizer.encode("data = ")
    params = [
        SamplingParams(max_tokens=200, temperature=0),
        SamplingParams(max_tokens=200, temperature=1.5, top_k=5, top_p=0.9, min_p=0.05, seed=1),
        SamplingParams(max_tokens=200, temperature=0.7, repetition_penalty=1.3, presence_penalty=1, seed=2),
        SamplingParams(max_tokens=200, logit_bias={7: 100.0, 8: -100.0}, seed=3, min_tokens=10),
    ]
    results = run(engine, [submit(engine, prompt, p, grammar) for p in params])  # type: ignore[arg-type]
    for r in results:
        assert r.finish_reason() == "stop"
        jsonschema.validate(json.loads(r.text()), SCHEMA)


def test_n_choices_seeds_and_preemption_keep_each_matcher_consistent(
    make_engine: Callable[..., LLMEngine],
) -> None:
    roomy = make_engine(max_model_len=256)
    tight = make_engine(max_model_len=256, kv_cache_tokens=256, block_size=16, prefill_chunk_tokens=64)
    prompts = random_prompts(6, roomy.tokenizer.vocab_size, seed=22, max_len=80)
    params = SamplingParams(n=2, max_tokens=120, temperature=1.0, seed=9)
    preempted = []
    schedule = tight.scheduler.schedule

    def recording():  # type: ignore[no-untyped-def]
        step = schedule()
        preempted.extend(step.preempted)
        return step

    tight.scheduler.schedule = recording  # type: ignore[method-assign]
    outputs = []
    for engine in (roomy, tight):
        grammar = compile_schema(engine)
        results = run(engine, [submit(engine, p, params, grammar) for p in prompts])  # type: ignore[arg-type]
        outputs.append([(r.text(0), r.text(1)) for r in results])
        for r in results:
            for i in (0, 1):
                assert r.finish_reason(i) == "stop", r.text(i)
                jsonschema.validate(json.loads(r.text(i)), SCHEMA)
        assert engine.blocks.num_used_blocks == 0
    assert preempted, "the tight cache preempts and recomputes sequences mid-output"
    assert outputs[0] == outputs[1], "the same seeds give the same outputs, preempted or not"
    assert any(a != b for a, b in outputs[0]), "each choice has its own matcher and generator"


def test_unsatisfiable_under_max_tokens_ends_with_length(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    grammar = engine.grammars.compile(Constraint("regex", "x{40}", "guided_regex"))
    result = run(engine, [submit(engine, [5, 6], SamplingParams(max_tokens=8), grammar)])[0]
    assert result.finish_reason() == "length" and set(result.text()) == {"x"}


def test_a_complete_grammar_stops_even_with_ignore_eos(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    grammar = engine.grammars.compile(Constraint("choice", '["yes", "no"]', "guided_choice"))
    params = SamplingParams(max_tokens=50, temperature=1.0, ignore_eos=True, seed=4)
    result = run(engine, [submit(engine, [5, 6], params, grammar)])[0]
    assert result.finish_reason() == "stop" and result.text() in ("yes", "no")
    grammar = engine.grammars.compile(Constraint("grammar", 'start: "a" /[0-9]{2}/', "guided_grammar"))
    result = run(engine, [submit(engine, [5, 6], SamplingParams(max_tokens=50), grammar)])[0]
    assert re.fullmatch("a[0-9]{2}", result.text())


def test_abort_frees_matchers_and_blocks(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    grammar = compile_schema(engine)
    result = submit(engine, [5, 6, 7], SamplingParams(n=3, max_tokens=100), grammar)  # type: ignore[arg-type]
    for _ in range(3):
        engine.step()
    engine.abort(result.request)
    assert all(s.matcher is None for s in result.request.sequences)
    assert engine.blocks.num_used_blocks == 0 and not engine.has_work


def test_compiles_are_cached_by_text_and_bounded(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine()
    first = engine.grammars.compile(Constraint("regex", "[a-c]+", "guided_regex"))
    assert engine.grammars.compile(Constraint("regex", "[a-c]+", "other_param")) is first
    for i in range(CACHE_SIZE):
        engine.grammars.compile(Constraint("regex", f"a{{{i}}}"))
    assert engine.grammars.compile(Constraint("regex", "[a-c]+")) is not first


@pytest.mark.parametrize(
    ("kind", "source", "message"),
    [
        ("json_schema", '{"type": "strin"}', "invalid JSON Schema"),
        ("json_schema", '{"type": "object", "minProperties": -1}', "invalid JSON Schema"),
        ("json_schema", "[1, 2]", "must be an object"),
        ("json_schema", "{not json", "not valid JSON"),
        ("json_schema", '{"not": {"type": "string"}}', "Unimplemented keys"),
        ("json_schema", '{"$ref": "#/$defs/missing"}', "does not exist"),
        ("json_schema", '{"type": "integer", "minimum": 5, "maximum": 1}', "Unsatisfiable"),
        ("json_schema", '{"items": ' * 900 + "{}" + "}" * 900, "nested too deeply"),
        ("regex", "a((", "unclosed group"),
        ("grammar", 'root ::= ("a"', "GBNF"),
        ("grammar", "start: undefined_rule", "unknown name"),
    ],
)
def test_bad_constraints_are_param_errors_naming_the_field(
    make_engine: Callable[..., LLMEngine], kind: str, source: str, message: str
) -> None:
    engine = make_engine()
    with pytest.raises(ParamError, match=re.escape(message)) as exc:
        engine.grammars.compile(Constraint(kind, source, "some_field"))
    assert exc.value.param == "some_field"
