"""Helpers for tests that talk to a running server; starting one is bench/harness.py's job."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx


def wait_idle(client: httpx.Client, timeout: float = 10.0) -> dict[str, Any]:
    """Poll /stats until nothing runs or waits and no KV is held (or `timeout`); return the last stats."""
    deadline = time.monotonic() + timeout
    while True:
        stats = client.get("/stats").json()
        if (stats["running"], stats["waiting"], stats["kv_used_tokens"]) == (0, 0, 0):
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
