"""SamplingParams: every generation parameter and all of its validation, in one place.

The HTTP layer builds one from a request and turns a `ParamError` into a 400 naming `param`;
nothing else re-declares these limits.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_STRING_CHARS = 256
MAX_STOP_TOKEN_IDS = 64
MAX_LOGIT_BIAS_ENTRIES = 1024
MAX_SEED = 2**63 - 1
GREEDY_BELOW = 1e-5
"""A temperature under this is greedy (vLLM's threshold): dividing logits by it would overflow float32."""


class ParamError(ValueError):
    """A bad request parameter; `param` is its name, as the OpenAI error shape reports it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _number(name: str, value: Any, lo: float, hi: float, *, lo_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ParamError(name, f"{name} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ParamError(name, f"{name} must be finite, got {value}")
    if value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise ParamError(name, f"{name} must be in {left}{lo:g}, {hi:g}], got {value:g}")
    return value


def _integer(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise ParamError(name, f"{name} must be an integer, got {value!r}")
    if value < lo or value > hi:
        raise ParamError(name, f"{name} must be in [{lo}, {hi}], got {value}")
    return value


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's continuations. Construction validates and normalizes.

    Defaults follow OpenAI/vLLM. `max_tokens=None` means "up to the context length".
    `top_k` of 0 or -1 and `top_p` of 1 disable those filters; `temperature` 0 is greedy, and so is
    any temperature below GREEDY_BELOW. `top_p` keeps the smallest set of most likely tokens whose
    probability reaches it, and never fewer than one: a top_p too small for float32 (it rounds to 0
    below about 1e-45) keeps only the most likely token.
    `logprobs` is the number of alternatives reported per token (None: no logprobs at all);
    `prompt_logprobs` the same for each prompt token (vLLM's), computed in the prompt's own prefill.
    `max_tokens` may be 0 only with `prompt_logprobs`: the prompt is scored, nothing is generated.
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        put("n", _integer("n", self.n, 1, MAX_N))
        if self.logprobs is not None:
            put("logprobs", _integer("logprobs", self.logprobs, 0, MAX_TOP_LOGPROBS))
        if self.prompt_logprobs is not None:
            put("prompt_logprobs", _integer("prompt_logprobs", self.prompt_logprobs, 0, MAX_TOP_LOGPROBS))
        if self.max_tokens is not None:
            least = 0 if self.prompt_logprobs is not None else 1
            put("max_tokens", _integer("max_tokens", self.max_tokens, least, 2**31 - 1))
        put("min_tokens", _integer("min_tokens", self.min_tokens, 0, 2**31 - 1))
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ParamError(
                "min_tokens", f"min_tokens ({self.min_tokens}) exceeds max_tokens ({self.max_tokens})"
            )
        temperature = _number("temperature", self.temperature, 0.0, 2.0)
        put("temperature", 0.0 if temperature < GREEDY_BELOW else temperature)
        put("top_p", _number("top_p", self.top_p, 0.0, 1.0, lo_open=True))
        top_k = _integer("top_k", self.top_k, -1, 2**31 - 1)
        put("top_k", max(top_k, 0))
        put("min_p", _number("min_p", self.min_p, 0.0, 1.0))
        put(
            "repetition_penalty",
            _number("repetition_penalty", self.repetition_penalty, 0.0, 2.0, lo_open=True),
        )
        put("presence_penalty", _number("presence_penalty", self.presence_penalty, -2.0, 2.0))
        put("frequency_penalty", _number("frequency_penalty", self.frequency_penalty, -2.0, 2.0))
        put("logit_bias", self._checked_logit_bias(self.logit_bias))
        if self.seed is not None:
            put("seed", _integer("seed", self.seed, -MAX_SEED - 1, MAX_SEED))
        put("stop", self._checked_stop(self.stop))
        put("stop_token_ids", self._checked_token_ids("stop_token_ids", self.stop_token_ids))
        if not isinstance(self.ignore_eos, bool):
            raise ParamError("ignore_eos", f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        if not isinstance(self.skip_special_tokens, bool):
            raise ParamError("skip_special_tokens", "skip_special_tokens must be a boolean")

    @staticmethod
    def _checked_logit_bias(bias: Any) -> dict[int, float]:
        if not isinstance(bias, Mapping):
            raise ParamError("logit_bias", "logit_bias must be an object mapping token ids to numbers")
        if len(bias) > MAX_LOGIT_BIAS_ENTRIES:
            raise ParamError("logit_bias", f"logit_bias has more than {MAX_LOGIT_BIAS_ENTRIES} entries")
        out: dict[int, float] = {}
        for key, value in bias.items():
            try:
                token = int(key)
                if str(token) != str(key).strip():
                    raise ValueError
            except (TypeError, ValueError):
                raise ParamError("logit_bias", f"logit_bias key {key!r} is not a token id") from None
            if token < 0:
                raise ParamError("logit_bias", f"logit_bias key {token} is not a token id")
            out[token] = _number("logit_bias", value, -100.0, 100.0)
        return out

    @staticmethod
    def _checked_stop(stop: Any) -> tuple[str, ...]:
        if stop is None:
            return ()
        if isinstance(stop, str):
            stop = (stop,)
        if not isinstance(stop, Sequence) or not all(isinstance(s, str) for s in stop):
            raise ParamError("stop", "stop must be a string or a list of strings")
        if len(stop) > MAX_STOP_STRINGS:
            raise ParamError("stop", f"stop allows at most {MAX_STOP_STRINGS} strings, got {len(stop)}")
        for s in stop:
            if not s:
                raise ParamError("stop", "stop strings must not be empty")
            if len(s) > MAX_STOP_STRING_CHARS:
                raise ParamError("stop", f"stop strings are limited to {MAX_STOP_STRING_CHARS} characters")
        return tuple(stop)

    @staticmethod
    def _checked_token_ids(name: str, ids: Any) -> tuple[int, ...]:
        if ids is None:
            return ()
        if not isinstance(ids, Sequence) or isinstance(ids, str):
            raise ParamError(name, f"{name} must be a list of token ids")
        if len(ids) > MAX_STOP_TOKEN_IDS:
            raise ParamError(name, f"{name} allows at most {MAX_STOP_TOKEN_IDS} ids")
        return tuple(_integer(name, i, 0, 2**31 - 1) for i in ids)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def check_against_model(self, prompt_len: int, vocab_size: int, max_model_len: int) -> int:
        """Validate what depends on the model and prompt; return the effective max_tokens."""
        for name, ids in (("logit_bias", self.logit_bias), ("stop_token_ids", self.stop_token_ids)):
            bad = next((i for i in ids if i >= vocab_size), None)
            if bad is not None:
                raise ParamError(name, f"{name} token id {bad} is outside the vocabulary (size {vocab_size})")
        room = max_model_len - prompt_len
        need = 0 if self.max_tokens == 0 else 1
        if room < need:
            more = " and generation needs at least one more" if need else ""
            raise ParamError(
                "prompt",
                f"the prompt has {prompt_len} tokens; this model's context is {max_model_len} tokens{more}",
            )
        if self.max_tokens is None:
            return room
        if self.max_tokens > room:
            raise ParamError(
                "max_tokens",
                f"max_tokens ({self.max_tokens}) plus the prompt ({prompt_len} tokens) exceeds the "
                f"context length of {max_model_len} tokens",
            )
        return self.max_tokens
