"""SamplingParams is the one place that says what a valid request parameter is."""

from __future__ import annotations

import math

import pytest

from server.engine.params import MAX_N, MAX_STOP_STRINGS, MAX_TOP_LOGPROBS, ParamError, SamplingParams

BAD = [
    ("n", 0),
    ("n", MAX_N + 1),
    ("n", 1.5),
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 2.5),
    ("max_tokens", "10"),
    ("temperature", -0.1),
    ("temperature", 2.5),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", True),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_k", -2),
    ("min_p", 1.5),
    ("repetition_penalty", 0.0),
    ("presence_penalty", 2.5),
    ("frequency_penalty", -3),
    ("logit_bias", {"x": 1}),
    ("logit_bias", {"5": 101}),
    ("logit_bias", {"-1": 1}),
    ("logit_bias", [1, 2]),
    ("stop", [""]),
    ("stop", ["a"] * (MAX_STOP_STRINGS + 1)),
    ("stop", ["x" * 10_000]),
    ("stop", [1, 2]),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", "12"),
    ("logprobs", MAX_TOP_LOGPROBS + 1),
    ("logprobs", -1),
    ("seed", 2**70),
    ("ignore_eos", "yes"),
]


@pytest.mark.parametrize(("name", "value"), BAD)
def test_bad_values_name_their_parameter(name: str, value: object) -> None:
    with pytest.raises(ParamError) as exc:
        SamplingParams(**{name: value})  # type: ignore[arg-type]
    assert exc.value.param == name
    assert name in str(exc.value)


def test_normalization() -> None:
    p = SamplingParams(stop="###", top_k=-1, max_tokens=3.0, logit_bias={"7": 5})  # type: ignore[arg-type]
    assert p.stop == ("###",) and p.top_k == 0 and p.max_tokens == 3 and p.logit_bias == {7: 5.0}
    assert SamplingParams(temperature=0).greedy
    with pytest.raises(ParamError, match="min_tokens"):
        SamplingParams(max_tokens=2, min_tokens=3)
