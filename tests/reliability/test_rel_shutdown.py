"""Shutdown under load, beyond tests/api/test_api_lifecycle.py: SIGTERM while streams run (some still
queued). New requests of every kind get a 503 at once while /health stays up; every in-flight stream
finishes in full within the grace period and the process exits 0 right after the last one, not at the
end of the grace period. A second SIGTERM (lifecycle tests send SIGINT) exits at once."""

from __future__ import annotations

import asyncio
import signal
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from bench.harness import RunningServer
from tests.reliability.rel_support import json_body, port_of, request, stream_text

GRACE_S = 30.0
STREAMS = 4
TOKENS = 300


def start_streams(server: RunningServer, results: list[Any]) -> threading.Thread:
    """STREAMS streams (two at a time run, the others queue) read to the end in a background thread."""
    port = port_of(server.url)

    async def all_streams() -> None:
        async def one(i: int) -> None:
            path = "/v1/chat/completions" if i % 2 else "/v1/completions"
            body: dict[str, Any] = {
                "model": server.model,
                "max_tokens": TOKENS,
                "ignore_eos": True,
                "stream": True,
            }
            if i % 2:
                body["messages"] = [{"role": "user", "content": f"drain {i}"}]
            else:
                body["prompt"] = f"drain {i}"
            try:
                r = await request(port, "POST", path, json_body(body), timeout=GRACE_S + 30)
            except (asyncio.IncompleteReadError, ConnectionError):
                r = None  # the connection was cut
            results.append((i, r, time.monotonic()))

        await asyncio.gather(*(one(i) for i in range(STREAMS)))

    thread = threading.Thread(target=lambda: asyncio.run(all_streams()), daemon=True)
    thread.start()
    return thread


def wait_for_load(server: RunningServer, count: int) -> None:
    deadline = time.monotonic() + 20
    with server.client() as client:
        while time.monotonic() < deadline:
            s = client.get("/stats").json()
            if s["running"] + s["waiting"] >= count and s["running"] >= 1:
                return
            time.sleep(0.02)
    raise AssertionError("the streams never started")


def test_sigterm_refuses_new_work_at_once_and_lets_streams_finish(
    start_server: Callable[..., RunningServer],
) -> None:
    server = start_server("--max-num-seqs", "2", "--shutdown-grace-seconds", str(GRACE_S))
    results: list[Any] = []
    thread = start_streams(server, results)
    wait_for_load(server, STREAMS)
    sigterm_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)

    chat = {"model": server.model, "messages": [{"role": "user", "content": "x"}]}
    plain = {"model": server.model, "prompt": "late", "max_tokens": 2}
    late = [("/v1/completions", plain), ("/v1/completions", {**plain, "stream": True}),
            ("/v1/chat/completions", chat), ("/v1/chat/completions", {**chat, "stream": True})]  # fmt: skip
    refused_ms = []
    with httpx.Client(base_url=server.url, timeout=10) as client:
        deadline = time.monotonic() + 5
        while client.get("/ready").status_code != 503:  # the signal is handled on the event loop
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for path, body in late:
            t0 = time.monotonic()
            r = client.post(path, json=body)
            refused_ms.append(1000 * (time.monotonic() - t0))
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "shutting_down"
        assert client.get("/health").status_code == 200  # alive while draining
    assert max(refused_ms) < 500, refused_ms

    code = server.proc.wait(GRACE_S + 15)
    exited_at = time.monotonic()
    thread.join(10)
    assert code == 0
    assert len(results) == STREAMS
    for i, r, _ in results:  # every stream, queued ones included, complete and error-free
        assert r is not None and r.status == 200 and r.events[-1] == "[DONE]", (i, r.events[-3:])
        assert not any(isinstance(e, dict) and "error" in e for e in r.events)
        finishes = [c["finish_reason"] for e in r.events[:-1] for c in e["choices"] if c["finish_reason"]]
        assert finishes == ["length"], finishes
        assert stream_text(r.events, chat=bool(i % 2))[0]
    last_stream = max(t for _, _, t in results)
    assert last_stream - sigterm_at < GRACE_S
    assert exited_at - last_stream < 5.0, exited_at - last_stream  # no waiting out the grace period
    print(f"\nSIGTERM: late requests refused in {max(refused_ms):.0f} ms at most; streams done "
          f"{last_stream - sigterm_at:.1f}s after the signal; exit 0 after "
          f"{exited_at - last_stream:.1f}s more")  # fmt: skip


def test_second_sigterm_exits_at_once(start_server: Callable[..., RunningServer]) -> None:
    server = start_server("--max-num-seqs", "1", "--shutdown-grace-seconds", "60")
    results: list[Any] = []
    thread = start_streams(server, results)
    wait_for_load(server, STREAMS)
    server.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 5
    while httpx.get(f"{server.url}/ready", timeout=2).status_code != 503:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    t0 = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(10)
    assert time.monotonic() - t0 < 3.0 and code != 0
    thread.join(15)
    # The streams were cut, not completed: none ends with a clean [DONE].
    assert len(results) == STREAMS
    for _, r, _ in results:
        assert (
            r is None or not r.events or r.events[-1] != "[DONE]" or any("error" in e for e in r.events[:-1])
        )
