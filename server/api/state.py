"""What the routes share: `ServerState`, and `EngineClient`, the engine as the HTTP layer may use it.

The API layer depends on this protocol, not on `AsyncEngine` itself (vLLM's EngineClient idea): the
routes see submit, stream, tokenize and lifecycle calls, never the engine's internals, and the
modules that need the state import it from here rather than from the app factory.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import Request

from server.api.errors import APIError
from server.engine.outputs import Delta, EngineStats, Finished, StepStats
from server.engine.params import SamplingParams
from server.engine.structured import CompiledGrammar, Constraint
from server.metrics import Metrics
from server.settings import Settings


class EngineStream(Protocol):
    """One engine request's events: Deltas, then one Finished; closing it early aborts the request."""

    def __aiter__(self) -> AsyncIterator[Delta | Finished]: ...

    async def aclose(self) -> None: ...


class EngineClient(Protocol):
    """The engine calls the HTTP layer makes (implemented by `server.engine.async_engine.AsyncEngine`)."""

    @property
    def max_model_len(self) -> int: ...

    @property
    def vocab_size(self) -> int: ...

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """Sampling values for requests that omit them (the checkpoint's generation_config.json)."""
        ...

    @property
    def declares_chat(self) -> bool:
        """Whether the checkpoint is a chat model (`Tokenizer.declares_chat`), not a base model."""
        ...

    @property
    def is_ready(self) -> bool: ...

    @property
    def is_alive(self) -> bool: ...

    def add_step_listener(self, listener: Callable[[StepStats], None]) -> None: ...

    def add_compile_listener(self, listener: Callable[[float], None]) -> None: ...

    def start(self) -> None: ...

    def stop_admitting(self) -> None: ...

    async def drain(self, timeout: float) -> bool: ...

    def abort_all(self, reason: str) -> None: ...

    def shutdown(self) -> None: ...

    async def encode(self, text: str, parse_special: bool, add_special_tokens: bool) -> list[int]: ...

    async def encode_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        parse_special: bool,
        add_special_tokens: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> list[int]: ...

    async def decode(self, ids: list[int]) -> str: ...

    async def compile_grammar(self, constraint: Constraint) -> CompiledGrammar: ...

    def submit(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        request_id: str,
        grammar: CompiledGrammar | None = None,
    ) -> EngineStream: ...

    def stats(self) -> EngineStats: ...

    @property
    def in_flight(self) -> int:
        """Requests admitted and not yet finished or aborted (what admission counts)."""
        ...


@dataclass
class ServerState:
    """Settings, the engine, metrics, and whether we are shutting down."""

    settings: Settings
    engine: EngineClient
    metrics: Metrics
    created: int = field(default_factory=lambda: int(time.time()))
    draining: bool = False
    drained: bool = False

    @property
    def model_name(self) -> str:
        return self.settings.model_name

    def check_model(self, name: str) -> None:
        """Every request names the model; a name we do not serve is a 404, as OpenAI answers."""
        if name != self.model_name:
            raise APIError(
                404, f"the model '{name}' does not exist; this server serves '{self.model_name}'",
                param="model", code="model_not_found",
            )  # fmt: skip

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "tinyserve",
            "max_model_len": self.engine.max_model_len,
        }

    def ui_mode(self) -> tuple[str, str]:
        """The chat page's mode at load, and why: --ui-mode, or for `auto` what the checkpoint declares."""
        mode = self.settings.ui_mode
        if mode != "auto":
            return mode, "--ui-mode"
        if self.engine.declares_chat:
            return "chat", "the model's tokenizer has a chat template"
        return "completion", "a base model: its tokenizer has no chat template of its own"

    def readiness(self) -> str:
        if self.draining:
            return "draining"
        return "ready" if self.engine.is_ready else "not_ready"


def state_of(request: Request) -> ServerState:
    return request.app.state.server
