"""Past --max-waiting the server answers 503 + Retry-After at once, in OpenAI's error shape."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import httpx

from bench.harness import RunningServer
from tests.support import wait_idle


def test_burst_past_the_queue_gets_503_with_retry_after(start_server: Callable[..., RunningServer]) -> None:
    server = start_server("--max-num-seqs", "1", "--max-waiting", "1")
    body = {"model": server.model, "prompt": "burst", "max_tokens": 480, "ignore_eos": True, "stream": True}

    async def burst(count: int) -> list[tuple[int, dict[str, str], Any, float]]:
        async with httpx.AsyncClient(base_url=server.url, timeout=10) as client:
            start = time.monotonic()

            async def one() -> tuple[int, dict[str, str], Any, float]:
                async with client.stream("POST", "/v1/completions", json=body) as r:
                    elapsed = time.monotonic() - start
                    payload = (await r.aread()) if r.status_code != 200 else None
                    # 200s: leave at once (closing the stream aborts the request).
                    return r.status_code, dict(r.headers), payload, elapsed

            return await asyncio.gather(*(one() for _ in range(count)))

    results = asyncio.run(burst(8))
    statuses = sorted(status for status, *_ in results)
    assert statuses.count(200) >= 1 and statuses.count(503) >= 4, statuses
    assert set(statuses) <= {200, 503}
    for status, headers, payload, elapsed in results:
        if status == 503:
            assert int(headers["retry-after"]) >= 1
            error = httpx.Response(503, content=payload).json()["error"]
            assert error["type"] == "service_unavailable_error" and error["code"] == "overloaded"
            assert elapsed < 10.0  # at once, not queued: a margin for a loaded 2-core box
    with server.client() as client:
        assert wait_idle(client)["kv_used_tokens"] == 0
        r = client.post("/v1/completions", json={**body, "stream": False, "max_tokens": 2})
        assert r.status_code == 200
