"""KV exhaustion: a cache that holds 8 full sequences, under 32 concurrent requests that each fill the
context. Requests wait, or are preempted and resumed; every one finishes in bounded time with the
greedy output of an unconstrained server, and nothing crashes or runs out of memory."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from bench.harness import RunningServer, rss_bytes, scrape
from tests.reliability.rel_support import json_body, port_of, request, stream_text
from tests.support import wait_idle

MAX_MODEL_LEN = 128
SEQUENCES = 8
KV_TOKENS = SEQUENCES * MAX_MODEL_LEN  # room for 8 full-length sequences
REQUESTS = 32
DEADLINE_S = 240


@pytest.fixture(scope="module")
def small_cache_server(start_server: Callable[..., RunningServer]) -> Iterator[RunningServer]:
    server = start_server("--max-model-len", str(MAX_MODEL_LEN), "--kv-cache-tokens", str(KV_TOKENS),
                        "--block-size", "16")  # fmt: skip
    yield server
    server.stop()


def jobs(model: str) -> list[dict[str, Any]]:
    rng = random.Random(5)
    out = []
    for i in range(REQUESTS):
        prompt = [rng.randrange(3, 500) for _ in range(rng.randint(8, 48))]
        out.append({"model": model, "prompt": prompt, "max_tokens": MAX_MODEL_LEN - len(prompt),
                    "temperature": 0, "ignore_eos": True, "stream": i % 2 == 0})  # fmt: skip
    return out


async def run_all(port: int, bodies: list[dict[str, Any]]) -> list[tuple[int, str, str | None]]:
    async def one(body: dict[str, Any]) -> tuple[int, str, str | None]:
        r = await request(port, "POST", "/v1/completions", json_body(body), timeout=DEADLINE_S)
        if r.status != 200:
            return r.status, r.body.decode(errors="replace"), None
        if body["stream"]:
            assert r.events[-1] == "[DONE]" and not any("error" in e for e in r.events[:-1]), r.events[-2:]
            finish = [c["finish_reason"] for e in r.events[:-1] for c in e["choices"] if c["finish_reason"]]
            return 200, stream_text(r.events)[0], finish[-1]
        choice = r.json()["choices"][0]
        return 200, choice["text"], choice["finish_reason"]

    return await asyncio.wait_for(asyncio.gather(*(one(b) for b in bodies)), DEADLINE_S)


def test_32_long_requests_on_a_cache_for_8(
    small_cache_server: RunningServer, default_server: RunningServer
) -> None:
    server = small_cache_server
    port = port_of(server.url)
    peak: dict[str, float] = {"kv_usage": 0.0, "waiting": 0, "rss": 0}
    stop = threading.Event()

    def watch() -> None:  # /stats and RSS while the flood runs
        with server.client() as client:
            while not stop.is_set():
                s = client.get("/stats").json()
                peak["kv_usage"] = max(peak["kv_usage"], s["kv_usage"])
                peak["waiting"] = max(peak["waiting"], s["waiting"])
                peak["rss"] = max(peak["rss"], rss_bytes(server.proc.pid))
                time.sleep(0.05)

    rss_before = rss_bytes(server.proc.pid)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    t0 = time.monotonic()
    try:
        flooded = asyncio.run(run_all(port, jobs(server.model)))
    finally:
        stop.set()
        watcher.join(5)
    elapsed = time.monotonic() - t0
    assert all(status == 200 for status, _, _ in flooded), [f[:2] for f in flooded if f[0] != 200]
    assert all(finish == "length" for _, _, finish in flooded)
    assert peak["kv_usage"] <= 1.0 and peak["waiting"] > 0, peak  # the cache really was the limit

    # The same requests on an unconstrained server (cache for 64 sequences of 512): same greedy text.
    reference = asyncio.run(run_all(port_of(default_server.url), jobs(default_server.model)))
    assert [text for _, text, _ in flooded] == [text for _, text, _ in reference]

    with server.client() as client:
        stats = wait_idle(client)
        assert (stats["running"], stats["waiting"], stats["kv_used_tokens"]) == (0, 0, 0), stats
    preempted = scrape(server.url).get("tinyserve_num_preemptions_total")
    assert server.proc.poll() is None
    log = server.log()
    assert "Traceback" not in log and "out of memory" not in log.lower()
    growth = (peak["rss"] - rss_before) / 2**20
    print(f"\n{REQUESTS} requests x {MAX_MODEL_LEN} tokens on a {KV_TOKENS}-token cache: {elapsed:.1f}s, "
          f"peak KV use {peak['kv_usage']:.0%}, peak waiting {peak['waiting']}, preemptions {preempted}, "
          f"RSS growth {growth:.1f} MiB")  # fmt: skip
