"""The real app over a real AsyncEngine, served by uvicorn on 127.0.0.1 inside the test process.

Faults the engine only shows under rare conditions (NaN or Inf logits in one row, a failing
request mid-stream) are injected into the REAL model with forward hooks, so everything from the
sampler's finiteness check to the SSE error event runs as in production; nothing of ours is faked.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI
from torch import nn

from server.api.app import create_app
from server.engine.async_engine import AsyncEngine
from server.engine.config import EngineConfig
from server.settings import parse_settings


@dataclass
class InProcessServer:
    url: str
    engine: AsyncEngine
    app: FastAPI

    @property
    def model(self) -> str:
        return self.app.state.server.model_name

    @property
    def transformer(self) -> nn.Module:
        return self.engine.core.model


@contextmanager
def serve_in_process(model: Path, *flags: str, **engine: Any) -> Iterator[InProcessServer]:
    """Serve `model` (engine knobs as EngineConfig keywords, HTTP knobs as flags) until the block ends."""
    config = EngineConfig(model=model, **engine)
    async_engine = AsyncEngine(config)
    app = create_app(parse_settings(["--model", str(model), *flags], env={}), async_engine)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="on", ws="none"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "in-process server did not start"
        time.sleep(0.01)
    try:
        yield InProcessServer(f"http://127.0.0.1:{port}", async_engine, app)
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()


def _positions(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[1] if len(args) > 1 else kwargs["positions"]


@contextmanager
def poisoned_logits(model: nn.Module, from_position: int, value: float = float("nan")) -> Iterator[None]:
    """The model's forward returns `value` in every logits row whose token sits at `from_position` or later.

    Positions identify the victim: give it the only prompt long enough to reach `from_position`.
    """

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], out: torch.Tensor) -> Any:
        indices = kwargs.get("logits_indices")
        if indices is None or out.shape[0] == 0:
            return None
        rows = _positions(args, kwargs)[indices] >= from_position
        if bool(rows.any()):
            out = out.clone()
            out[rows] = value
            return out
        return None

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@contextmanager
def poisoned_hidden_state(model: nn.Module, from_position: int) -> Iterator[None]:
    """NaN embeddings for tokens at `from_position` or later: the NaN reaches that sequence's cached keys
    and values, so any other sequence that read its cache slots would be poisoned too."""
    current: dict[str, torch.Tensor] = {}

    def remember(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        current["positions"] = _positions(args, kwargs)

    def poison(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> Any:
        rows = current["positions"] >= from_position
        if bool(rows.any()):
            out = out.clone()
            out[rows] = float("nan")
            return out
        return None

    handles = [
        model.register_forward_pre_hook(remember, with_kwargs=True),
        model.embed_tokens.register_forward_hook(poison),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def poisoned_token(model: nn.Module, token_id: int) -> Iterator[None]:
    """NaN embeddings wherever `token_id` is an input: its keys and values in the cache are NaN too."""

    def poison(module: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> Any:
        rows = args[0] == token_id
        if bool(rows.any()):
            out = out.clone()
            out[rows] = float("nan")
            return out
        return None

    handle = model.embed_tokens.register_forward_hook(poison)
    try:
        yield
    finally:
        handle.remove()


def wait_until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)
