"""Prompt log-probabilities: scored in the prompt's own prefill (chunked or not), equal to a full
forward's, shared by the choices, and never read from the prefix cache (which still serves others)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from model.checkpoint import load_model
from model.evaluate import token_nats
from server.engine.core import LLMEngine
from server.engine.params import ParamError, SamplingParams
from tests.engine.engine_driver import run, submit

PROMPT = list(range(3, 120))
"""117 tokens: several prefill chunks of 32 and blocks of 16."""


def reference(checkpoint: Path, ids: list[int]) -> list[float]:
    """model.evaluate's per-token losses, negated: the log-probability of each token after the first."""
    model = load_model(checkpoint, dtype=torch.float32, device="cpu")
    tokens = torch.tensor([ids])
    nats = token_nats(model, tokens[:, :-1], tokens[:, 1:], torch.device("cpu"), torch.float32)
    return (-nats[0]).tolist()


def test_prompt_logprobs_equal_the_full_forward(
    make_engine: Callable[..., LLMEngine], tiny_checkpoint: Path
) -> None:
    engine = make_engine(prefill_chunk_tokens=32)
    (only,) = run(engine, [submit(engine, PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=3))])
    assert only.error is None and only.finished is not None
    assert only.tokens() == [] and only.finish_reason() == "length"
    assert only.finished.prompt_tokens == len(PROMPT) and only.finished.completion_tokens == 0
    (delta,) = only.deltas
    scored = delta.prompt_logprobs
    assert scored is not None and [t.token_id for t in scored] == PROMPT
    assert scored[0].logprob is None and scored[0].top == []
    assert all(t.logprob is not None for t in scored[1:])
    got = [t.logprob for t in scored[1:]]
    assert got == pytest.approx(reference(tiny_checkpoint, PROMPT), abs=1e-4)
    for t in scored[1:]:
        assert len(t.top) == 3 and t.top[0].logprob >= t.top[1].logprob >= t.top[2].logprob
        assert t.rank is not None and t.rank >= 1
        assert (t.rank == 1) == (t.top[0].token_id == t.token_id)


def test_every_choice_gets_the_prompt_logprobs_once_and_generation_goes_on(
    make_engine: Callable[..., LLMEngine],
) -> None:
    engine = make_engine(prefill_chunk_tokens=32)
    params = SamplingParams(max_tokens=4, n=2, prompt_logprobs=0, ignore_eos=True, seed=5)
    (r,) = run(engine, [submit(engine, PROMPT, params)])
    firsts = [next(d for d in r.deltas if d.index == i) for i in (0, 1)]
    assert all(f.prompt_logprobs is not None and len(f.prompt_logprobs) == len(PROMPT) for f in firsts)
    assert all(d.prompt_logprobs is None for d in r.deltas if d not in firsts)
    assert len(r.tokens(0)) == len(r.tokens(1)) == 4


def test_prefix_cache_is_not_read_for_scoring_but_still_serves_others(
    make_engine: Callable[..., LLMEngine],
) -> None:
    engine = make_engine(prefill_chunk_tokens=32)
    scoring = SamplingParams(max_tokens=1, prompt_logprobs=1, temperature=0)
    first = run(engine, [submit(engine, PROMPT, scoring)])[0]
    second = run(engine, [submit(engine, PROMPT, scoring)])[0]
    assert second.finished is not None and second.finished.cached_tokens == 0
    assert [t.logprob for t in second.deltas[0].prompt_logprobs or []] == [
        t.logprob for t in first.deltas[0].prompt_logprobs or []
    ]
    # The scoring requests published their blocks: a plain request reads them.
    plain = run(engine, [submit(engine, PROMPT, SamplingParams(max_tokens=1, temperature=0))])[0]
    assert plain.finished is not None and plain.finished.cached_tokens >= 96
    assert plain.tokens() == first.tokens()


def test_scoring_beside_other_work_in_the_same_steps(make_engine: Callable[..., LLMEngine]) -> None:
    engine = make_engine(prefill_chunk_tokens=24)
    alone = run(engine, [submit(engine, PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=0))])[0]
    engine = make_engine(prefill_chunk_tokens=24)
    busy = SamplingParams(max_tokens=40, ignore_eos=True)
    results = run(
        engine,
        [submit(engine, [5, 6, 7], busy)],
        arrivals={2: [(PROMPT, SamplingParams(max_tokens=0, prompt_logprobs=0))]},
    )
    together = results[1].deltas[0].prompt_logprobs or []
    expected = alone.deltas[0].prompt_logprobs or []
    assert [t.logprob for t in together] == pytest.approx([t.logprob for t in expected], abs=1e-5)
    assert len(results[0].tokens()) == 40


def test_max_tokens_zero_only_with_prompt_logprobs() -> None:
    with pytest.raises(ParamError) as exc:
        SamplingParams(max_tokens=0)
    assert exc.value.param == "max_tokens"
    with pytest.raises(ParamError) as exc:
        SamplingParams(prompt_logprobs=21)
    assert exc.value.param == "prompt_logprobs"
    # A prompt that fills the whole context can be scored (nothing is generated after it).
    SamplingParams(max_tokens=0, prompt_logprobs=0).check_against_model(512, 512, 512)
    with pytest.raises(ParamError):
        SamplingParams(max_tokens=1, prompt_logprobs=0).check_against_model(512, 512, 512)
