"""Engine fixtures: a factory for synchronous engines over the tiny checkpoint."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from server.engine.config import EngineConfig
from server.engine.core import LLMEngine


@pytest.fixture
def make_engine(tiny_checkpoint: Path) -> Callable[..., LLMEngine]:
    def make(**overrides: object) -> LLMEngine:
        # Eager unless asked (`enforce_eager=False`): the fast-path tests compile; the rest test the
        # engine's logic, which is the same on both paths, without paying for compilation each time.
        settings: dict[str, object] = {
            "model": tiny_checkpoint,
            "kv_cache_tokens": 4096,
            "enforce_eager": True,
        }
        settings.update(overrides)
        return LLMEngine(EngineConfig(**settings))  # type: ignore[arg-type]

    return make
