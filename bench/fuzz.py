"""Property-based fuzzing of every endpoint in the server's own OpenAPI schema (schemathesis + hypothesis).

Requests valid by the schema (`positive`) and requests that break it on purpose (`negative`) go to
every operation, plus requests to random unknown paths and with random model names. It checks:
no 5xx, no dropped connection, /health 200 throughout, the server process alive, the /metrics series
count unchanged by random paths and model names (no per-path or per-model labels), and the request
counters consistent afterwards (started = finished + aborted + failed). Loopback targets only.

    .venv/bin/python -m bench.fuzz --model weights/default --requests 10000      # starts its own server
    .venv/bin/python -m bench.fuzz --url http://127.0.0.1:8000 --requests 10000  # a running one

tests/reliability/test_rel_fuzz.py runs the same code with a few hundred requests.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import string
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from bench.harness import Scrape, is_loopback, launch


@dataclass
class FuzzReport:
    requests: int = 0
    by_status: Counter[int] = field(default_factory=Counter)
    by_operation: Counter[str] = field(default_factory=Counter)
    server_errors: list[str] = field(default_factory=list)
    """curl commands that reproduce each 5xx."""
    crashes: list[str] = field(default_factory=list)
    """Transport errors: the connection dropped or timed out."""
    health_checks: int = 0
    health_failures: int = 0
    series_before_probe: int | None = None
    series_after_probe: int | None = None
    counters: dict[str, float] | None = None
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        classes = Counter(f"{s // 100}xx" for s in self.by_status.elements())
        return {
            "requests": self.requests,
            "status_classes": dict(sorted(classes.items())),
            "statuses": {str(k): v for k, v in sorted(self.by_status.items())},
            "operations": dict(self.by_operation),
            "server_errors": len(self.server_errors),
            "crashes": len(self.crashes),
            "health_checks": self.health_checks,
            "health_failures": self.health_failures,
            "metrics_series_before_random_paths_and_models": self.series_before_probe,
            "metrics_series_after_random_paths_and_models": self.series_after_probe,
            "request_counters": self.counters,
            "seconds": round(self.seconds, 1),
            "first_server_errors": self.server_errors[:5],
            "first_crashes": self.crashes[:5],
        }

    @property
    def ok(self) -> bool:
        return (
            not self.server_errors
            and not self.crashes
            and self.health_failures == 0
            and self.series_before_probe == self.series_after_probe
            and (self.counters is None or self.counters["started"] == self.counters["ended"])
        )


def metrics(client: httpx.Client) -> Scrape | None:
    """The server's /metrics, parsed; None where it has none."""
    r = client.get("/metrics")
    return Scrape.parse(r.text) if r.status_code == 200 else None


def random_probe(client: httpx.Client, model_name: str, count: int, rng: random.Random) -> None:
    """Requests to unknown paths and with unknown model names: each must be a 4xx in OpenAI's shape."""
    alphabet = string.ascii_letters + string.digits + "-_"  # each is a new path, never a new kind of error
    for i in range(count):
        junk = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 24)))
        if i % 3 == 0:
            r = client.get(f"/{junk}/{i}")
        elif i % 3 == 1:
            r = client.get(f"/v1/models/{model_name}-{junk}")
        else:
            body = {"model": f"{junk}-{i}", "prompt": "x", "max_tokens": 1}
            r = client.post("/v1/completions", json=body)
        if not (400 <= r.status_code < 500 and "error" in r.json()):
            raise AssertionError(f"random probe {r.request.url}: {r.status_code} {r.text[:200]}")


def fuzz(
    base_url: str,
    total: int,
    seed: int = 0,
    headers: dict[str, str] | None = None,
    alive: Callable[[], bool] = lambda: True,
    progress: bool = False,
) -> FuzzReport:
    """Send about `total` schema-driven requests to `base_url`; see the module docstring."""
    if not is_loopback(base_url):
        raise SystemExit(f"error: fuzz only loopback servers, not {base_url}")
    started = time.monotonic()
    report = FuzzReport()
    client = httpx.Client(base_url=base_url, headers=headers or {}, timeout=60)
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=headers or {})
    operations = [result.ok() for result in schema.get_all_operations()]
    model_name = client.get("/v1/models").json()["data"][0]["id"]
    rng = random.Random(seed)

    def check_health() -> None:
        report.health_checks += 1
        try:
            healthy = client.get("/health", timeout=10).status_code == 200 and alive()
        except httpx.TransportError:
            healthy = False
        report.health_failures += not healthy

    def call(case: Any) -> None:
        label = f"{case.method} {case.operation.path}"
        # Mostly the served model, so that requests get past the model check to the deeper validation.
        if isinstance(case.body, dict) and "model" in case.body and rng.random() < 0.8:
            case.body["model"] = model_name
        try:
            response = case.call(base_url=base_url, headers=headers, timeout=60)
        except Exception as exc:  # requests' ConnectionError, Timeout, ...
            report.crashes.append(f"{label}: {type(exc).__name__}: {exc} :: {case.as_curl_command()}")
            return
        report.requests += 1
        report.by_status[response.status_code] += 1
        report.by_operation[label] += 1
        if response.status_code >= 500:
            report.server_errors.append(f"{response.status_code} {case.as_curl_command()}")
        if report.requests % 100 == 0:
            check_health()
            if progress:
                print(f"{report.requests} requests, {report.by_status}", file=sys.stderr, flush=True)

    # Random paths and model names first, so each (route, status) series they can touch exists.
    random_probe(client, model_name, 6, rng)
    round_no = 0
    while report.requests < total:
        per_target = max(1, (total - report.requests) // (2 * len(operations)))
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            for operation in operations:
                strategy = operation.as_strategy(generation_mode=mode)
                run = settings(
                    max_examples=per_target,
                    database=None,
                    deadline=None,
                    derandomize=False,
                    phases=[Phase.generate],
                    suppress_health_check=list(HealthCheck),
                )(given(case=strategy)(call))
                # hypothesis seeds from the test function: one seed per operation, mode and round.
                run._hypothesis_internal_use_seed = hash((seed, round_no, operation.label, mode.value))
                with contextlib.suppress(Unsatisfiable):  # no negative case without parameters
                    run()
                if report.requests >= total:
                    break
            if report.requests >= total:
                break
        round_no += 1
        if round_no > 50:  # the schema cannot produce more distinct requests
            break

    check_health()
    metrics(client)  # a first scrape: the scrape itself is counted, under its own (route, status) series
    before = metrics(client)
    random_probe(client, model_name, 200, rng)
    after = metrics(client)
    if before is not None and after is not None:
        report.series_before_probe, report.series_after_probe = len(before.samples), len(after.samples)
    # Counters settle once every request has ended (aborted streams are counted on the engine thread).
    deadline = time.monotonic() + 30
    while True:
        current = metrics(client)
        stats = client.get("/stats").json()
        idle = stats["running"] == 0 and stats["waiting"] == 0
        if current is None:
            break
        report.counters = current.request_counters()
        if idle and report.counters["started"] == report.counters["ended"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    check_health()
    report.seconds = time.monotonic() - started
    client.close()
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server on loopback, e.g. http://127.0.0.1:8000")
    target.add_argument("--model", type=Path, help="start `python -m server --model MODEL` on a free port")
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-key", default=os.environ.get("TINYSERVE_API_KEY"))
    parser.add_argument("--server-arg", action="append", default=[], help="extra flag for the started server")
    parser.add_argument("--json", type=Path, help="write the report here")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    with tempfile.TemporaryDirectory(prefix="bench-fuzz-") as tmp:
        server = None
        if args.model:
            extra = args.server_arg + (["--api-key", args.api_key] if args.api_key else [])
            server = launch(args.model, Path(tmp) / "server.log", *extra)
        url = server.url if server else args.url.rstrip("/")
        try:
            alive = (lambda: server.proc.poll() is None) if server else (lambda: True)
            report = fuzz(url, args.requests, args.seed, headers, alive=alive, progress=True)
        finally:
            if server is not None:
                server.stop(timeout=60)
    summary = {**report.summary(), "ok": report.ok}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
