"""Bursts: 4x and 8x capacity at once. The excess gets 503 + Retry-After quickly (p99 measured), no connection
hangs, every admitted request completes with the right text, and service is normal afterwards."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench.harness import RunningServer, percentile
from tests.reliability.rel_support import RawResponse, json_body, port_of, request, stream_text
from tests.support import wait_idle

MAX_NUM_SEQS, MAX_WAITING = 4, 4
CAPACITY = MAX_NUM_SEQS + MAX_WAITING
BURST = 8 * CAPACITY  # the repeated bursts' size
PROMPTS = ["burst one", "burst two", "the third burst", "a fourth"]
P99_TARGET_S = 0.050
# Asserted bound: the target where the machine is quiet; a shared 2-core runner gets headroom (env).
P99_BOUND_S = float(os.environ.get("TINYSERVE_BURST_P99_BOUND_S", "0.5"))


@pytest.fixture(scope="module")
def burst_server(start_server: Callable[..., RunningServer]) -> Iterator[RunningServer]:
    server = start_server("--max-num-seqs", str(MAX_NUM_SEQS), "--max-waiting", str(MAX_WAITING))
    yield server
    server.stop()


def body(model: str, i: int, stream: bool) -> dict[str, Any]:
    return {"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": 24, "temperature": 0,
            "ignore_eos": True, "stream": stream}  # fmt: skip


@pytest.mark.parametrize("factor", [4, 8])
def test_burst_past_capacity(burst_server: RunningServer, factor: int) -> None:
    burst = factor * CAPACITY
    port = port_of(burst_server.url)
    with burst_server.client() as client:
        expected = [client.post("/v1/completions", json=body(burst_server.model, i, False)).json()
                    ["choices"][0]["text"] for i in range(len(PROMPTS))]  # fmt: skip

    async def fire() -> list[RawResponse]:
        payloads = [json_body(body(burst_server.model, i, stream=i % 2 == 0)) for i in range(burst)]
        return await asyncio.gather(
            *(request(port, "POST", "/v1/completions", p, timeout=60) for p in payloads)
        )

    t0 = time.monotonic()
    results = asyncio.run(fire())  # every one answered within 60 s, or TimeoutError: no hangs
    burst_s = time.monotonic() - t0
    admitted = [(i, r) for i, r in enumerate(results) if r.status == 200]
    refused = [r for r in results if r.status == 503]
    assert len(admitted) + len(refused) == burst, [r.status for r in results]
    assert CAPACITY <= len(admitted) < burst and refused
    for r in refused:
        assert int(r.headers["retry-after"]) >= 1
        error = r.json()["error"]
        assert error["type"] == "service_unavailable_error" and error["code"] == "overloaded"
        assert set(error) == {"message", "type", "param", "code"}
    for i, r in admitted:  # every admitted request completes, with the text it gets alone
        if i % 2 == 0:
            assert r.events[-1] == "[DONE]" and not any("error" in e for e in r.events[:-1])
            assert stream_text(r.events)[0] == expected[i % len(PROMPTS)]
        else:
            assert r.json()["choices"][0]["text"] == expected[i % len(PROMPTS)]
    latencies = [r.elapsed for r in refused]
    p50, p99 = percentile(latencies, 50), percentile(latencies, 99)
    print(f"\nburst of {burst} ({factor}x capacity {CAPACITY}): {len(admitted)} admitted, {len(refused)} "
          f"refused; 503 latency p50 {1000 * p50:.1f} ms, p99 {1000 * p99:.1f} ms "
          f"(target {1000 * P99_TARGET_S:.0f} ms); all answered in {burst_s:.1f}s")  # fmt: skip
    assert p99 <= P99_BOUND_S, p99

    with burst_server.client() as client:  # normal service afterwards
        stats = wait_idle(client)
        assert (stats["running"], stats["waiting"], stats["kv_used_tokens"]) == (0, 0, 0), stats
        r = client.post("/v1/completions", json=body(burst_server.model, 1, False))
        assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected[1]


def test_repeated_bursts_never_wedge(burst_server: RunningServer) -> None:
    """Three more bursts back to back: each is answered in full, and the queue drains each time."""
    port = port_of(burst_server.url)

    async def fire() -> list[int]:
        payloads = [json_body(body(burst_server.model, i, stream=True)) for i in range(BURST)]
        done = await asyncio.gather(
            *(request(port, "POST", "/v1/completions", p, timeout=60) for p in payloads)
        )
        return [r.status for r in done]

    for _ in range(3):
        statuses = asyncio.run(fire())
        assert set(statuses) <= {200, 503} and statuses.count(200) >= CAPACITY, statuses
        with burst_server.client() as client:
            assert wait_idle(client)["kv_used_tokens"] == 0
