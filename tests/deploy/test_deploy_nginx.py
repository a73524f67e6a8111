"""A real nginx with the repo's load-balancer config, in front of two real servers on loopback.

The config is deploy/nginx.conf as compose mounts it, with only what names the compose network
replaced (the upstream's `server server:8000 resolve`, the listen port, the include and log paths):
every proxy and streaming directive is the repo's own, read from deploy/nginx/proxy.conf.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from bench.harness import RunningServer, free_port, launch, scrape
from tests.deploy.deploy_tools import DEPLOY, alive, process, require, wait_for

STREAM_TOKENS = 400


def substitute(text: str, pattern: str, replacement: str) -> str:
    """Replace the one match of `pattern`: if the repo file changes shape, fail here, loudly."""
    out, count = re.subn(pattern, lambda _: replacement, text, flags=re.MULTILINE)
    assert count == 1, f"deploy/nginx.conf: expected one match of {pattern!r}, found {count}"
    return out


def loopback_config(upstreams: list[str], port: int, work: Path) -> str:
    site = (DEPLOY / "nginx.conf").read_text()
    servers = "\n".join(f"    server {u};" for u in upstreams)
    site = substitute(site, r"^\s*server\s+server:8000\s+resolve;$", servers)
    site = substitute(site, r"^\s*listen\s+8080;$", f"    listen 127.0.0.1:{port};")
    site = substitute(site, r"/etc/nginx/tinyserve/proxy\.conf", str(DEPLOY / "nginx" / "proxy.conf"))
    site = substitute(site, r"/var/log/nginx/access\.log", str(work / "access.log"))
    temp = "\n".join(
        f"    {kind}_temp_path {work / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""{"user root;" if os.geteuid() == 0 else ""}
worker_processes 1;
daemon off;
pid {work / "nginx.pid"};
error_log {work / "error.log"} warn;
events {{ worker_connections 256; }}
http {{
{temp}
    # The server's X-Accel-Buffering: no would turn nginx's buffering off on its own; ignored here,
    # so what is tested is the repo's proxy.conf.
    proxy_ignore_headers X-Accel-Buffering;
{site}
}}
"""


@pytest.fixture(scope="module")
def replicas(
    tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[RunningServer]]:
    logs = [tmp_path_factory.mktemp(f"replica{i}") / "server.log" for i in range(2)]
    with ThreadPoolExecutor(2) as pool:  # they load at the same time
        started = [pool.submit(launch, tiny_checkpoint, log, "--enforce-eager") for log in logs]
    servers = [f.result() for f in started]
    yield servers
    for s in servers:
        s.stop()


@pytest.fixture(scope="module")
def balancer(replicas: list[RunningServer], tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = require("nginx")
    work = tmp_path_factory.mktemp("nginx")
    port = free_port()
    config = work / "nginx.conf"
    config.write_text(loopback_config([s.url.removeprefix("http://") for s in replicas], port, work))
    test = subprocess.run([binary, "-t", "-p", str(work), "-c", str(config), "-e", str(work / "error.log")],
                          capture_output=True, text=True)  # fmt: skip
    assert test.returncode == 0, test.stderr
    url = f"http://127.0.0.1:{port}"
    log = work / "nginx.out"
    with process([binary, "-p", str(work), "-c", str(config), "-e", str(work / "error.log")], log) as proc:

        def up() -> bool | None:
            alive(proc, log)
            return httpx.get(f"{url}/health", timeout=2).status_code == 200 or None

        wait_for(up, 20, "nginx to proxy /health")
        yield url


def test_requests_spread_over_both_replicas(balancer: str, replicas: list[RunningServer]) -> None:
    before = [scrape(s.url) for s in replicas]
    body = {"model": replicas[0].model, "prompt": "spread", "max_tokens": 2}
    with httpx.Client(base_url=balancer, timeout=30) as client:
        ids = []
        for _ in range(8):
            r = client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            ids.append(r.headers["x-request-id"])
        r = client.post("/v1/completions", json=body, headers={"X-Request-Id": "through-nginx"})
        assert r.headers["x-request-id"] == "through-nginx" and r.json()["id"] == "cmpl-through-nginx"
    after = [scrape(s.url) for s in replicas]
    name = "tinyserve_requests_finished_total"
    served = [a.get(name) - b.get(name) for a, b in zip(after, before, strict=True)]
    assert sum(served) == 9 and min(served) >= 1, served
    # nginx made the ids (its $request_id) and the servers used them: one id in both logs.
    assert all(re.fullmatch(r"cmpl-[0-9a-f]{32}|[0-9a-f]{32}", i) for i in ids), ids
    logs = "".join(s.log() for s in replicas)
    assert all(f"request_id={i} " in logs for i in ids)


def test_streams_pass_through_unbuffered(balancer: str, replicas: list[RunningServer]) -> None:
    """Each event reaches the client as it is generated: many reads, the first long before the end."""
    body = {"model": replicas[0].model, "prompt": "stream", "max_tokens": STREAM_TOKENS, "ignore_eos": True,
            "stream": True}  # fmt: skip
    reads: list[tuple[float, bytes]] = []
    with httpx.Client(base_url=balancer, timeout=60) as client:
        start = time.monotonic()
        with client.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            reads.extend((time.monotonic() - start, chunk) for chunk in r.iter_raw())
    events = [
        line[6:] for line in b"".join(c for _, c in reads).decode().splitlines() if line.startswith("data: ")
    ]
    assert events[-1] == "[DONE]" and len(events) > STREAM_TOKENS // 2 and '"error"' not in "".join(events)
    first, total = reads[0][0], reads[-1][0]
    # Buffered, the events would come in a few large reads near the end; streamed, one read per event
    # or so (a client briefly starved of CPU merges a few).
    assert first < total / 4, f"first bytes after {first:.3f}s of {total:.3f}s"
    assert len(reads) >= STREAM_TOKENS // 4, f"{len(reads)} reads for {len(events)} events in {total:.3f}s"


def test_metrics_are_not_exposed_through_the_balancer(balancer: str) -> None:
    assert httpx.get(f"{balancer}/metrics", timeout=5).status_code == 404
