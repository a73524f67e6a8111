"""Helpers for tests that talk to a running server; starting one is bench/harness.py's job."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx

from bench.harness import ROOT


def wait_idle(client: httpx.Client, timeout: float = 10.0) -> dict[str, Any]:
    """Poll /stats until no request is in flight (admitted and unfinished: the engine's own figures lag
    admission by a step), nothing runs or waits and no KV is held (or `timeout`); return the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = client.get("/stats").json()
        if (stats["in_flight"], stats["running"], stats["waiting"], stats["kv_used_tokens"]) == (0, 0, 0, 0):
            return stats
        if time.monotonic() > deadline:
            return stats
        time.sleep(0.05)


def sse_events(response: httpx.Response) -> Iterator[Any]:
    """The `data:` payloads of an SSE response, parsed; `[DONE]` is yielded as the string."""
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            yield data if data == "[DONE]" else json.loads(data)


def run_server(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """`python -m server ARGS` to its end: for start-ups that must fail."""
    return subprocess.run(
        [sys.executable, "-m", "server", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str], *fragments: str) -> None:
    """The process failed with one `error:` line (naming each of `fragments`), no traceback."""
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
