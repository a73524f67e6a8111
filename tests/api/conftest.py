"""Fixtures running the REAL server as a subprocess on 127.0.0.1 (helpers in bench/harness.py).

`server` is one shared instance with default flags; `start_server` (tests/conftest.py) starts
more with other flags (API key, tiny queues, short grace periods), each stopped at the end of the session.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import httpx
import openai
import pytest

from bench.harness import RunningServer


@pytest.fixture(scope="session")
def server(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(compiled=True)  # the default path: compiled decode buckets


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture
def sdk(server: RunningServer) -> openai.OpenAI:
    """The official SDK on `server` (a module's own `server` fixture, where it has one)."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
