"""Schema fuzzing, bounded: bench/fuzz.py's code with a few hundred requests from our own OpenAPI
schema (valid and schema-breaking bodies, random paths and model names). 0 5xx, 0 dropped connections,
/health 200 throughout, the /metrics series count unchanged by random paths and model names, and the
request counters consistent. `python -m bench.fuzz --requests 10000` is the long run."""

from __future__ import annotations

import os

from bench import fuzz
from bench.harness import RunningServer

REQUESTS = int(os.environ.get("TINYSERVE_FUZZ_REQUESTS", "400"))


def test_fuzzing_from_the_openapi_schema(default_server: RunningServer) -> None:
    report = fuzz.fuzz(default_server.url, REQUESTS, seed=0, alive=lambda: default_server.proc.poll() is None)
    summary = report.summary()
    print(f"\nfuzz: {summary['requests']} requests in {summary['seconds']}s, {summary['status_classes']}, "
          f"metrics series {summary['metrics_series_before_random_paths_and_models']} -> "
          f"{summary['metrics_series_after_random_paths_and_models']}")  # fmt: skip
    assert report.requests >= REQUESTS
    assert not report.server_errors, report.server_errors[:5]
    assert not report.crashes, report.crashes[:5]
    assert report.health_checks >= REQUESTS // 100 and report.health_failures == 0
    # Every operation was reached, and not only with refusals.
    assert len(report.by_operation) == 9 and report.by_status[200] > 0
    if report.series_before_probe is not None:  # /metrics present
        assert report.series_before_probe == report.series_after_probe
        assert report.counters is not None and report.counters["started"] == report.counters["ended"]
    assert "Traceback" not in default_server.log()
