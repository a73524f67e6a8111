"""Reliability fixtures: real servers (`python -m server` on 127.0.0.1) started per need.

`rel_server` is one shared server with default flags; `rel_launch` starts more with other flags and
stops them all at the end of the session (`stop_now` ends one early, to give its CPU back).
The helpers for starting servers are tests/api/api_server.py's, shared rather than copied.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

API_TESTS = Path(__file__).resolve().parents[1] / "api"
if str(API_TESTS) not in sys.path:
    sys.path.insert(0, str(API_TESTS))

from api_server import RunningServer, launch  # noqa: E402


@pytest.fixture(scope="session")
def rel_launch(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., RunningServer]]:
    started: list[RunningServer] = []

    def start(*args: str, env: dict[str, str] | None = None) -> RunningServer:
        log_path = tmp_path_factory.mktemp("rel_server") / "server.log"
        server = launch(tiny_checkpoint, log_path, *args, env=env)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def rel_server(rel_launch: Callable[..., RunningServer]) -> RunningServer:
    """Default flags (as `make serve` runs), shared by the tests that do not need their own."""
    return rel_launch()
