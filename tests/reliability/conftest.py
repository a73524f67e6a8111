"""Reliability fixtures: real servers (`python -m server` on 127.0.0.1) started per need.

`rel_server` is one shared server with default flags; `start_server` (tests/conftest.py) starts more
with other flags and stops them all at the end of the session (`stop_now` ends one early).
The helpers for starting servers are tests/api/api_server.py's, shared rather than copied.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import pytest

API_TESTS = Path(__file__).resolve().parents[1] / "api"
if str(API_TESTS) not in sys.path:
    sys.path.insert(0, str(API_TESTS))

from api_server import RunningServer  # noqa: E402


@pytest.fixture(scope="session")
def rel_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    """Default flags (as `make serve` runs), shared by the tests that do not need their own."""
    return start_server()
