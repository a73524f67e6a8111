"""Fixtures running the REAL server as a subprocess on 127.0.0.1 (helpers in bench/harness.py).

`server` is the suite's shared server with default flags (`default_server`, tests/conftest.py), unless
a module defines its own; `start_server` starts more with other flags, stopped when their module ends.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from bench.harness import RunningServer


@pytest.fixture(scope="session")
def server(default_server: RunningServer) -> RunningServer:
    return default_server


@pytest.fixture
def http(server: RunningServer) -> Iterator[httpx.Client]:
    with server.client() as client:
        yield client


@pytest.fixture
def sdk(server: RunningServer) -> openai.OpenAI:
    """The official SDK on `server` (a module's own `server` fixture, where it has one)."""
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
