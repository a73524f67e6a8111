"""Shutdown under load, beyond tests/api/test_api_lifecycle.py: SIGTERM while streams run (some still
queued). New requests of every kind get a 503 at once while /health stays up; every in-flight stream
finishes in full within the grace period and the process exits 0 right after the last one, not at the
end of the grace period. A second SIGTERM (lifecycle tests send SIGINT) exits at once.

Nothing here depends on how fast the machine is: the streams run on a checkpoint with a long context
and are long enough to still be running when the signals arrive, and every bound on time is a small
fraction of the grace period (and of the streams' length), not an absolute speed.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.harness import RunningServer
from tests.reliability.rel_support import (
    completed,
    start_streams,
    stream_text,
    wait_for_load,
    wait_until_not_ready,
)

STREAMS = 4
DRAIN_TOKENS = 1000
"""Per stream while draining: long enough that all four are in flight when SIGTERM comes, short enough
to finish well within the grace period on a loaded 2-core box."""
DRAIN_GRACE_S = 240.0
CUT_TOKENS = 8000
"""Per stream for the second signal: no machine gets through 4 x 8000 decode steps before it arrives."""
CUT_GRACE_S = 600.0


def test_sigterm_refuses_new_work_at_once_and_lets_streams_finish(
    start_server: Callable[..., RunningServer], long_checkpoint: Path
) -> None:
    server = start_server(
        "--max-num-seqs", "2", "--shutdown-grace-seconds", str(DRAIN_GRACE_S), model=long_checkpoint
    )
    results: list[Any] = []
    thread = start_streams(server, DRAIN_TOKENS, results, STREAMS, CUT_GRACE_S)
    wait_for_load(server, STREAMS)
    sigterm_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)

    chat = {"model": server.model, "messages": [{"role": "user", "content": "x"}]}
    plain = {"model": server.model, "prompt": "late", "max_tokens": 2}
    late = [("/v1/completions", plain), ("/v1/completions", {**plain, "stream": True}),
            ("/v1/chat/completions", chat), ("/v1/chat/completions", {**chat, "stream": True})]  # fmt: skip
    refused_ms = []
    wait_until_not_ready(server.url)
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for path, body in late:
            t0 = time.monotonic()
            r = client.post(path, json=body)
            refused_ms.append(1000 * (time.monotonic() - t0))
            assert r.status_code == 503, r.text
            assert r.json()["error"]["code"] == "shutting_down"
        assert client.get("/health").status_code == 200  # alive while draining
    refused_by = time.monotonic()

    code = server.proc.wait(DRAIN_GRACE_S + 30)
    exited_at = time.monotonic()
    thread.join(30)
    assert code == 0
    assert len(results) == STREAMS
    for i, r, _ in results:  # every stream, queued ones included, complete and error-free
        assert completed(r), (i, r and r.events[-3:])
        finishes = [c["finish_reason"] for e in r.events[:-1] for c in e["choices"] if c["finish_reason"]]
        assert finishes == ["length"], finishes
        assert stream_text(r.events, chat=bool(i % 2))[0]
    first_stream, last_stream = min(t for _, _, t in results), max(t for _, _, t in results)
    # "At once": every late request was refused while the streams still ran, not queued behind them.
    assert refused_by < first_stream, (refused_by - sigterm_at, first_stream - sigterm_at)
    assert last_stream - sigterm_at < DRAIN_GRACE_S
    # No waiting out the grace period: the exit follows the last stream by far less than the grace.
    assert exited_at - last_stream < DRAIN_GRACE_S / 8, exited_at - last_stream
    print(f"\nSIGTERM: late requests refused in {max(refused_ms):.0f} ms at most; streams done "
          f"{last_stream - sigterm_at:.1f}s after the signal; exit 0 after "
          f"{exited_at - last_stream:.1f}s more")  # fmt: skip


def test_second_sigterm_exits_at_once(
    start_server: Callable[..., RunningServer], long_checkpoint: Path
) -> None:
    server = start_server(
        "--max-num-seqs", "1", "--shutdown-grace-seconds", str(CUT_GRACE_S), model=long_checkpoint
    )
    results: list[Any] = []
    thread = start_streams(server, CUT_TOKENS, results, STREAMS, CUT_GRACE_S)
    wait_for_load(server, STREAMS)
    server.proc.send_signal(signal.SIGTERM)
    wait_until_not_ready(server.url)
    second_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(CUT_GRACE_S / 10)
    exit_s = time.monotonic() - second_at
    thread.join(30)
    assert code != 0
    # "At once": far sooner than the grace period, or than draining 4 x CUT_TOKENS tokens one at a time.
    assert exit_s < CUT_GRACE_S / 40, exit_s
    assert len(results) == STREAMS
    # A stream still running when the second signal came is cut, never completed; one that had already
    # ended before it (none should, at this length) is not counted against it.
    in_flight = [(i, r) for i, r, done_at in results if done_at >= second_at]
    assert in_flight, "every stream ended before the second signal: make them longer"
    for i, r in in_flight:
        assert not completed(r), (i, r and r.events[-3:])
    print(f"\nsecond SIGTERM: exit {code} after {exit_s:.2f}s; {len(in_flight)} of {STREAMS} streams cut")
