"""One copy of what benchmarks and tests both need: a real server on a free loopback port, resident
memory, percentiles and /metrics.

Tests import this module; nothing here imports tests.
"""

from __future__ import annotations

import ipaddress
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT = 300.0
"""Seconds a server may take to answer its ready route: loading a ~110M checkpoint on a busy 2-core box."""
REQUEST_COUNTERS = ("started", "finished", "aborted", "failed")


def free_port() -> int:
    """A TCP port nobody listens on right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def is_loopback(url: str) -> bool:
    """Whether `url` names this machine: load and fuzzing must never hit someone else's server by mistake."""
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass
class RunningServer:
    """A server subprocess on 127.0.0.1, its output in `log_path`; a context manager that stops it."""

    proc: subprocess.Popen[bytes]
    url: str
    model: str
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, trust_env=False, **kwargs)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig`, wait up to `timeout` seconds, then kill; the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_process(
    command: Sequence[str],
    port: int,
    log_path: Path,
    *,
    model: str = "",
    ready_path: str = "/ready",
    headers: dict[str, str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = START_TIMEOUT,
) -> RunningServer:
    """Run `command` (a server that listens on 127.0.0.1:`port`) until `ready_path` answers 200.

    Raises RuntimeError with the server's log if it exits first or is not ready within `timeout`.
    """
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    with log_path.open("wb") as log:
        proc = subprocess.Popen(list(command), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=full_env)
    server = RunningServer(proc, f"http://127.0.0.1:{port}", model, log_path)
    deadline = time.monotonic() + timeout
    # One client for all the polls: each new one builds an SSL context, CPU the starting server needs.
    with httpx.Client(headers=headers, timeout=2, trust_env=False) as client:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                log = server.log()[-4000:]
                raise RuntimeError(f"{' '.join(command)} exited with {proc.returncode}:\n{log}")
            try:
                if client.get(server.url + ready_path).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"{' '.join(command)} not ready after {timeout:.0f}s:\n{server.log()[-4000:]}")


def launch(
    model: Path, log_path: Path, *args: str, env: dict[str, str] | None = None, timeout: float = START_TIMEOUT
) -> RunningServer:
    """`python -m server` on `model` and a free loopback port, ready (/ready 200) when it returns.

    TINYSERVE_MODEL / TINYSERVE_PORT / TINYSERVE_API_KEY in `env` stand in for the flags.
    """
    env = env or {}
    command = [sys.executable, "-m", "server"]
    if "TINYSERVE_MODEL" not in env:
        command += ["--model", str(model)]
    key = env.get("TINYSERVE_API_KEY") or next(
        (args[i + 1] for i, a in enumerate(args[:-1]) if a == "--api-key"), None
    )
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    name = model.resolve().name
    fixed_port = "TINYSERVE_PORT" in env
    attempts = 1 if fixed_port else 3  # another process may take a free port before the server binds it
    for attempt in range(1, attempts + 1):
        port = int(env["TINYSERVE_PORT"]) if fixed_port else free_port()
        full = [*command, *([] if fixed_port else ["--host", "127.0.0.1", "--port", str(port)]), *args]
        try:
            return start_process(full, port, log_path, model=name, headers=headers, env=env, timeout=timeout)
        except RuntimeError:
            if attempt == attempts or "address already in use" not in log_path.read_text(errors="replace"):
                raise
    raise AssertionError("unreachable")


def rss_bytes(pid: int) -> int:
    """Resident set size from /proc/PID/status (VmRSS, in kB)."""
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0-100), linear between closest ranks (numpy's default); None for no values."""
    if not values:
        return None
    s = sorted(values)
    k = (len(s) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


@dataclass
class Scrape:
    """One /metrics exposition, parsed with prometheus-client's own parser."""

    samples: list[tuple[str, dict[str, str], float]]

    @classmethod
    def parse(cls, text: str) -> Scrape:
        families = text_string_to_metric_families(text)
        return cls([(s.name, dict(s.labels), s.value) for f in families for s in f.samples])

    def get(self, name: str, **labels: str) -> float:
        """The sum of `name`'s samples whose labels include `labels` (0 if there are none)."""
        return sum(
            value
            for sample, have, value in self.samples
            if sample == name and all(have.get(k) == v for k, v in labels.items())
        )

    def names(self) -> set[str]:
        return {name for name, _, _ in self.samples}

    def request_counters(self) -> dict[str, float]:
        """The request counters, plus `ended` (finished + aborted + failed): it must equal `started`."""
        c = {k: self.get(f"tinyserve_requests_{k}_total") for k in REQUEST_COUNTERS}
        return {**c, "ended": c["finished"] + c["aborted"] + c["failed"]}


def scrape(url: str, headers: dict[str, str] | None = None) -> Scrape:
    """GET `url`/metrics and parse it."""
    r = httpx.get(f"{url}/metrics", headers=headers, timeout=10, trust_env=False)
    r.raise_for_status()
    return Scrape.parse(r.text)
