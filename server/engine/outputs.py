"""What the engine hands back: plain data, no tensors, no HTTP.

A request's stream yields `Delta`s (new text of one choice) and ends with one `Finished`
carrying usage and timings. Timings are `time.monotonic()` seconds; the HTTP layer turns them
into headers, metrics and logs.
"""

from __future__ import annotations

from dataclasses import dataclass, field


class EngineError(RuntimeError):
    """A request failed inside the engine (for example non-finite logits); only that request ends."""


class EngineOverloaded(RuntimeError):
    """The waiting queue is full; the caller should retry later (HTTP 503 with Retry-After)."""


class EngineStopped(RuntimeError):
    """The engine no longer admits requests (shutting down)."""


@dataclass(frozen=True)
class TopLogprob:
    token_id: int
    token: str
    logprob: float
    bytes: list[int]


@dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability under the model, and the `logprobs` most likely ones.

    For a prompt token, `rank` is its rank among all tokens (1: the most likely); the first prompt
    token has no logprob (nothing precedes it).
    """

    token_id: int
    token: str
    logprob: float | None
    bytes: list[int]
    top: list[TopLogprob]
    rank: int | None = None


@dataclass
class Delta:
    """New output of one choice since its previous Delta.

    `text` may be empty while bytes of a split character or a possible stop string are held back.
    `finish_reason` is set on the choice's last Delta: "stop" (EOS, stop token or stop string),
    "length" (max_tokens or context), "abort" (cancelled) or "error".
    """

    index: int
    text: str
    token_ids: list[int]
    logprobs: list[TokenLogprob] | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    prompt_logprobs: list[TokenLogprob] | None = None
    """On each choice's first Delta when `prompt_logprobs` was asked: one entry per prompt token."""


@dataclass
class Timings:
    arrival: float
    scheduled: float | None = None
    first_token: float | None = None
    finished: float | None = None
    token_times: list[float] = field(default_factory=list)

    @property
    def queue_time(self) -> float:
        return (self.scheduled or self.arrival) - self.arrival

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def time_per_output_token(self) -> float | None:
        """Mean inter-token latency after the first token (TGI's x-time-per-token)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)


@dataclass
class Finished:
    """The request's last event: totals over all choices."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int
    timings: Timings
    draft_tokens: int = 0
    """Speculative decoding: tokens proposed for this request, and how many the model accepted."""
    accepted_tokens: int = 0


@dataclass(frozen=True)
class StepStats:
    """One engine step, for histograms: how many rows decoded, how many prompt tokens computed."""

    decode_rows: int
    prefill_tokens: int
    preempted: int
    seconds: float


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for gauges and health checks."""

    running: int
    waiting: int
    kv_total_tokens: int
    kv_used_tokens: int
    prefix_cache_hit_tokens: int
    steps: int
    spec_drafts: int = 0
    """Speculative decoding totals: rows verified with proposals, tokens proposed, accepted, emitted."""
    spec_draft_tokens: int = 0
    spec_accepted_tokens: int = 0
    spec_emitted_tokens: int = 0

    @property
    def kv_usage(self) -> float:
        return self.kv_used_tokens / self.kv_total_tokens if self.kv_total_tokens else 0.0
