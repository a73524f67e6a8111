"""One request and its choices: token ids, cache blocks, progress, timings.

Progress is one number, vLLM v1 style: `num_computed_tokens` (tokens whose keys and values are in
the cache) catches up with `num_tokens`. A step computes some of the missing tokens; when none are
missing after it, the sequence samples its next token. A one-token catch-up is a decode, more is a
prefill chunk: the scheduler needs no separate phases.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

import torch

from server.engine.detokenizer import IncrementalDetokenizer
from server.engine.outputs import Timings, TokenLogprob
from server.engine.params import SamplingParams
from server.engine.structured import CompiledGrammar


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """What a client asked for: one prompt, `params.n` choices, one event sink."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int
    sink: Any
    """Where this request's events go (the async facade's queue); the core never touches it."""
    timings: Timings
    grammar: CompiledGrammar | None = None
    """The constraint every choice's output must match (None: free text)."""
    sequences: list[Sequence] = field(default_factory=list)
    held_back: list[Sequence] = field(default_factory=list)
    """Choices 1..n-1, admitted once choice 0 has prefilled the prompt they share."""
    cached_tokens: int = 0
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    """The prompt tokens scored so far (with `params.prompt_logprobs`), shared by the choices."""
    done: bool = False
    cut: bool = False
    """Its client fell too far behind; nothing more is delivered."""
    draft_tokens: int = 0
    """Tokens proposed for its choices by speculative decoding, and how many of them were accepted."""
    accepted_tokens: int = 0

    @property
    def completion_tokens(self) -> int:
        return sum(s.num_output_tokens for s in self.sequences)


@dataclass(eq=False)
class Sequence:
    request: Request
    index: int
    token_ids: list[int]
    detokenizer: IncrementalDetokenizer
    generator: torch.Generator | None = None
    matcher: Any = None
    """This choice's grammar state (an llguidance matcher), advanced with each output token."""
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)
    """Chain hashes of this sequence's full, computed blocks (for prefix caching)."""
    num_computed_tokens: int = 0
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def __post_init__(self) -> None:
        self.num_prompt_tokens = len(self.token_ids)

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def num_missing_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def needs_prompt_logits(self) -> bool:
        """Prompt tokens are still to be scored: their positions must be computed, not read from cache."""
        return (
            self.params.prompt_logprobs is not None
            and len(self.request.prompt_logprobs) < self.num_prompt_tokens
        )

    def prompt_logit_positions(self, start: int, end: int) -> range:
        """Of positions [start, end) computed now, those whose logits score a prompt token not scored
        yet (position p's logits score token p + 1; the first token is never scored)."""
        if self.params.prompt_logprobs is None:
            return range(0)
        return range(max(start, len(self.request.prompt_logprobs) - 1), min(end, self.num_prompt_tokens - 1))
