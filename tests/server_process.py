"""Helpers to run the REAL server (`python -m server`) as a subprocess and to talk to it.

Shared by tests/api and tests/deploy (importable because tests/conftest.py puts tests/ on sys.path).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 90.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class RunningServer:
    proc: subprocess.Popen[bytes]
    url: str
    model: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


def launch(model: Path, log_path: Path, *args: str, env: dict[str, str] | None = None) -> RunningServer:
    """Start `python -m server` and wait until /ready answers 200 (or the process dies)."""
    env = env or {}
    command = [sys.executable, "-m", "server"]
    if "TINYSERVE_MODEL" not in env:
        command += ["--model", str(model)]
    if "TINYSERVE_PORT" in env:
        port = int(env["TINYSERVE_PORT"])
    else:
        port = free_port()
        command += ["--host", "127.0.0.1", "--port", str(port)]
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **env}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [*command, *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=full_env
        )
    server = RunningServer(proc, f"http://127.0.0.1:{port}", model.resolve().name, log_path)
    key = env.get("TINYSERVE_API_KEY") or next(
        (args[i + 1] for i, a in enumerate(args[:-1]) if a == "--api-key"), None
    )
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{server.log()}")
        try:
            if httpx.get(f"{server.url}/ready", headers=headers, timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"server not ready after {START_TIMEOUT}s:\n{server.log()}")


def wait_idle(client: httpx.Client, timeout: float = 3.0) -> dict[str, Any]:
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


@dataclass
class Scrape:
    """One /metrics scrape, parsed with prometheus-client's own parser."""

    samples: list[tuple[str, dict[str, str], float]]

    def get(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels` (0 if there are none)."""
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )

    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}


def scrape(url: str, headers: dict[str, str] | None = None) -> Scrape:
    """GET `url`/metrics and parse it."""
    r = httpx.get(f"{url}/metrics", headers=headers, timeout=10)
    r.raise_for_status()
    families = text_string_to_metric_families(r.text)
    return Scrape([(s.name, dict(s.labels), s.value) for f in families for s in f.samples])
