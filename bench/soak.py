"""Soak: a steady mixed load for a long time, watching for leaks and drift.

Workers (fixed concurrency) send completions and chat requests, streamed and not, some cut short on
purpose, some malformed. It checks: 0 5xx and 0 dropped connections; resident memory flat after
warm-up (VmRSS from /proc/PID/status; the median of the last samples against the median of the first
samples after warm-up, drift <= --max-drift); /health answering; and the request counters consistent
(started = finished + aborted + failed) once the load stops. Loopback targets only.

    .venv/bin/python -m bench.soak --model weights/default --seconds 1800          # starts its own server
    .venv/bin/python -m bench.soak --url http://127.0.0.1:8000 --pid 1234 --seconds 600

tests/reliability/test_rel_soak.py runs the same code for about a minute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.harness import Scrape, is_loopback, launch, rss_bytes

KINDS = (  # (kind, weight)
    ("completion", 30), ("completion_stream", 20), ("chat", 15), ("chat_stream", 15),
    ("cut_stream", 8), ("n_choices", 6), ("bad_request", 6),
)  # fmt: skip


@dataclass
class SoakReport:
    seconds: float = 0.0
    requests: Counter[str] = field(default_factory=Counter)
    statuses: Counter[int] = field(default_factory=Counter)
    server_errors: int = 0
    dropped: int = 0
    rss_samples: list[tuple[float, int]] = field(default_factory=list)
    warmup_s: float = 0.0
    drift: float | None = None
    counters: dict[str, float] | None = None
    health_failures: int = 0

    def summary(self) -> dict[str, Any]:
        rss = [r for _, r in self.rss_samples]
        return {
            "seconds": round(self.seconds, 1),
            "requests": sum(self.requests.values()),
            "by_kind": dict(self.requests),
            "statuses": {str(k): v for k, v in sorted(self.statuses.items())},
            "server_errors": self.server_errors,
            "dropped_connections": self.dropped,
            "health_failures": self.health_failures,
            "rss_mib_first_last_max": [round(x / 2**20, 1) for x in (rss[0], rss[-1], max(rss))]
            if rss
            else None,
            "rss_drift_after_warmup": None if self.drift is None else round(self.drift, 4),
            "request_counters": self.counters,
        }


def drift(samples: list[tuple[float, int]], warmup_s: float, window: int = 5) -> float | None:
    """Relative change of RSS between the first and the last `window` samples taken after warm-up."""
    start = samples[0][0] if samples else 0.0
    after = [rss for t, rss in samples if t - start >= warmup_s]
    if len(after) < 2 * window:
        return None
    first, last = statistics.median(after[:window]), statistics.median(after[-window:])
    return (last - first) / first


async def _http(port: int, method: str, path: str, body: bytes | None, cut_after: int | None = None) -> int:
    """One request over a fresh connection; reads the whole response (or `cut_after` bytes of it)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        head = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
        if body is not None:
            head += ["Content-Type: application/json", f"Content-Length: {len(body)}"]
        writer.write(("\r\n".join(head) + "\r\n\r\n").encode() + (body or b""))
        await writer.drain()
        status_line = await reader.readline()
        status = int(status_line.split()[1])
        if cut_after is not None:
            await reader.read(cut_after)
            return status
        while await reader.read(65536):
            pass
        return status
    finally:
        writer.close()


def _request_for(kind: str, model: str, rng: random.Random) -> tuple[str, dict[str, Any] | bytes]:
    words = " ".join(
        rng.choice(["soak", "test", "héllo", "世界", "😀", "def f():", "return"]) for _ in range(8)
    )
    base = {"model": model, "max_tokens": rng.randint(4, 40), "temperature": rng.choice([0, 0.8])}
    chat = {**base, "messages": [{"role": "user", "content": words}]}
    if kind == "completion":
        return "/v1/completions", {**base, "prompt": words}
    if kind == "completion_stream":
        return "/v1/completions", {**base, "prompt": words, "stream": True}
    if kind == "chat":
        return "/v1/chat/completions", chat
    if kind == "chat_stream":
        return "/v1/chat/completions", {**chat, "stream": True, "stream_options": {"include_usage": True}}
    if kind == "cut_stream":
        return "/v1/completions", {
            **base,
            "prompt": words,
            "stream": True,
            "max_tokens": 200,
            "ignore_eos": True,
        }
    if kind == "n_choices":
        return "/v1/completions", {**base, "prompt": [words, words[::-1]], "n": 2}
    return "/v1/completions", rng.choice([b'{"model": "x"', b"[]", json.dumps({**base, "top_p": 7}).encode()])


async def _run_load(
    port: int, model: str, seconds: float, concurrency: int, report: SoakReport, seed: int
) -> None:
    deadline = time.monotonic() + seconds
    kinds, weights = zip(*KINDS, strict=True)

    async def worker(w: int) -> None:
        rng = random.Random(seed * 1000 + w)
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            path, payload = _request_for(kind, model, rng)
            body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
            try:
                status = await asyncio.wait_for(
                    _http(
                        port,
                        "POST",
                        path,
                        body,
                        cut_after=rng.randint(1, 600) if kind == "cut_stream" else None,
                    ),
                    timeout=120,
                )
            except (OSError, asyncio.IncompleteReadError, TimeoutError, ValueError, IndexError):
                report.dropped += 1
                continue
            report.requests[kind] += 1
            report.statuses[status] += 1
            report.server_errors += status >= 500

    await asyncio.gather(*(worker(w) for w in range(concurrency)))


def soak(
    url: str, pid: int, seconds: float, concurrency: int = 4, warmup_s: float | None = None, seed: int = 0
) -> SoakReport:
    parts = urlsplit(url)
    if not is_loopback(url) or parts.port is None:
        raise SystemExit(f"error: soak only loopback servers, not {url}")
    report = SoakReport(warmup_s=seconds / 3 if warmup_s is None else warmup_s)
    client = httpx.Client(base_url=url, timeout=30)
    model = client.get("/v1/models").json()["data"][0]["id"]
    started = time.monotonic()

    async def main() -> None:
        load = asyncio.ensure_future(_run_load(parts.port, model, seconds, concurrency, report, seed))
        while not load.done():
            report.rss_samples.append((time.monotonic() - started, rss_bytes(pid)))
            try:
                healthy = (await asyncio.to_thread(client.get, "/health")).status_code == 200
            except httpx.TransportError:
                healthy = False
            report.health_failures += not healthy
            await asyncio.wait({load}, timeout=1.0)
        await load

    asyncio.run(main())
    report.seconds = time.monotonic() - started
    report.drift = drift(report.rss_samples, report.warmup_s)
    end = time.monotonic() + 30
    while True:  # the counters settle once every request has ended
        stats = client.get("/stats").json()
        r = client.get("/metrics")
        if r.status_code == 200:
            report.counters = Scrape.parse(r.text).request_counters()
        settled = report.counters is None or report.counters["started"] == report.counters["ended"]
        if (stats["running"] == 0 and stats["waiting"] == 0 and settled) or time.monotonic() > end:
            break
        time.sleep(0.1)
    client.close()
    return report


def ok(report: SoakReport, max_drift: float) -> bool:
    return (
        report.server_errors == 0
        and report.dropped == 0
        and report.health_failures == 0
        and report.drift is not None
        and report.drift <= max_drift
        and (report.counters is None or report.counters["started"] == report.counters["ended"])
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server on loopback (give --pid too)")
    target.add_argument("--model", type=Path, help="start `python -m server --model MODEL` on a free port")
    parser.add_argument("--pid", type=int, help="the running server's process id (with --url)")
    parser.add_argument("--seconds", type=float, default=600)
    parser.add_argument("--warmup", type=float, help="seconds before RSS is compared (default: a third)")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-drift", type=float, default=0.02)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if args.url and args.pid is None:
        parser.error("--url needs --pid (for the resident memory)")
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        server = launch(args.model, Path(tmp) / "server.log") if args.model else None
        url, pid = (server.url, server.proc.pid) if server else (args.url.rstrip("/"), args.pid)
        try:
            report = soak(url, pid, args.seconds, args.concurrency, args.warmup)
        finally:
            if server is not None:
                server.stop(timeout=60)
    summary = {**report.summary(), "ok": ok(report, args.max_drift)}
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
