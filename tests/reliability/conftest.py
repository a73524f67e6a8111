"""Reliability fixtures: real servers (`python -m server` on 127.0.0.1) started per need.

`rel_server` is one shared server with default flags; `start_server` (tests/conftest.py) starts more
with other flags and stops them all at the end of the session (`stop_now` ends one early).
The helpers for starting servers are bench/harness.py's, shared with the benchmarks.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from bench.harness import RunningServer


@pytest.fixture(scope="session")
def rel_server(start_server: Callable[..., RunningServer]) -> RunningServer:
    """Default flags (as `make serve` runs), shared by the tests that do not need their own."""
    return start_server(compiled=True)  # the default path: compiled decode buckets
