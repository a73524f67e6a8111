"""Fixtures running the REAL server as a subprocess on 127.0.0.1 (helpers in api_server.py).

`server` is one shared instance with default flags; `start_server` starts more with other flags
(API key, tiny queues, short grace periods), each stopped at the end of the session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from api_server import RunningServer, launch


@pytest.fixture(scope="session")
def start_server(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def start(*args: str, env: dict[str, str] | None = None) -> RunningServer:
        log_path = tmp_path_factory.mktemp("server") / "server.log"
        server = launch(tiny_checkpoint, log_path, *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server()


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client
