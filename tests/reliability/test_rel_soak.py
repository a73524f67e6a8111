"""Soak, bounded: bench/soak.py's steady mixed load for about 30 seconds on a server of its own.
0 5xx and 0 dropped connections, resident memory flat after warm-up (<= 2% drift of VmRSS), /health
up throughout, and the request counters consistent (started = finished + aborted + failed).
`python -m bench.soak --seconds 1800` is the long run."""

from __future__ import annotations

import os
from collections.abc import Callable

from bench import soak
from bench.harness import RunningServer

SECONDS = float(os.environ.get("TINYSERVE_SOAK_SECONDS", "30"))
MAX_DRIFT = 0.02


def test_steady_load_without_errors_or_growth(start_server: Callable[..., RunningServer]) -> None:
    server = start_server()
    try:
        report = soak.soak(server.url, server.proc.pid, SECONDS, concurrency=4, warmup_s=SECONDS / 3)
    finally:
        server.stop()
    summary = report.summary()
    print(f"\nsoak: {summary['requests']} requests in {summary['seconds']}s {summary['statuses']}; RSS MiB "
          f"(first, last, max) {summary['rss_mib_first_last_max']}, drift after warm-up "
          f"{summary['rss_drift_after_warmup']:+.2%}; counters {summary['request_counters']}")  # fmt: skip
    assert report.server_errors == 0 and report.dropped == 0, summary
    assert report.health_failures == 0
    assert report.drift is not None and report.drift <= MAX_DRIFT, summary
    if report.counters is not None:  # /metrics present
        assert report.counters["started"] == report.counters["ended"], report.counters
        assert report.counters["aborted"] > 0 and report.counters["finished"] > 0
    assert sum(report.requests.values()) > 100
