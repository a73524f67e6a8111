"""A real Prometheus, started with the repo's scrape config, scrapes a real server on loopback.

deploy/prometheus.yml finds replicas through Docker's DNS; here its DNS discovery is replaced by the
loopback target (everything else kept) and the interval shortened to 1 s so the test need not wait.
The dashboard's PromQL is run against it too, so a typo in a panel fails here rather than in Grafana.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from bench.harness import RunningServer, free_port, launch
from tests.deploy.deploy_tools import DEPLOY, alive, process, require, wait_for

KEY = "sk-prometheus-test"
TTFT_P90 = "histogram_quantile(0.9, sum by (le) (rate(tinyserve_time_to_first_token_seconds_bucket[30s])))"


def loopback_config(target: str) -> dict[str, Any]:
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "tinyserve"]
    assert job.pop("dns_sd_configs"), "the compose config discovers the replicas by DNS"
    job["static_configs"] = [{"targets": [target]}]
    config["global"]["scrape_interval"] = "1s"
    return config


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    """Flags as in docker-compose.yml: an API key, and /metrics open to the scraper."""
    log = tmp_path_factory.mktemp("prom_server") / "server.log"
    running = launch(tiny_checkpoint, log, "--api-key", KEY, "--metrics-without-auth", "--enforce-eager")
    yield running
    running.stop()


@pytest.fixture(scope="module")
def prometheus(server: RunningServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    binary = require("prometheus")
    work = tmp_path_factory.mktemp("prometheus")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump(loopback_config(server.url.removeprefix("http://"))))
    url = f"http://127.0.0.1:{free_port()}"
    command = [
        binary, f"--config.file={config}", f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address={url.removeprefix('http://')}", "--log.level=warn",
    ]  # fmt: skip
    log = work / "prometheus.log"
    with process(command, log) as proc:

        def ready() -> bool | None:
            alive(proc, log)
            return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200 or None

        wait_for(ready, 30, "Prometheus to be ready")
        yield url


def query(url: str, promql: str) -> dict[str, Any]:
    r = httpx.get(f"{url}/api/v1/query", params={"query": promql}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (promql, body)
    return body["data"]


def test_repo_config_is_valid() -> None:
    promtool = require("promtool")
    done = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus.yml")], capture_output=True)
    assert done.returncode == 0, done.stdout + done.stderr


def test_scrapes_the_server_and_answers_a_ttft_quantile(prometheus: str, server: RunningServer) -> None:
    def target_up() -> dict[str, Any] | None:
        targets = httpx.get(f"{prometheus}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        return next((t for t in targets if t["health"] == "up"), None)

    target = wait_for(target_up, 20, "the server's target to be up")
    assert target["labels"]["job"] == "tinyserve"
    assert target["scrapeUrl"] == f"{server.url}/metrics"
    headers = {"Authorization": f"Bearer {KEY}"}
    for i in range(4):  # after the first scrape, so that the bucket counters rise between samples
        body = {"model": server.model, "prompt": f"scrape me {i}", "max_tokens": 4}
        assert httpx.post(f"{server.url}/v1/completions", json=body, headers=headers).status_code == 200

    def ttft() -> float | None:
        result = query(prometheus, TTFT_P90)["result"]
        value = float(result[0]["value"][1]) if result else math.nan
        return value if math.isfinite(value) else None

    assert 0 < wait_for(ttft, 20, "a finite TTFT p90") < 10
    (up,) = query(prometheus, 'up{job="tinyserve"}')["result"]
    assert up["value"][1] == "1"


def test_every_dashboard_query_runs(prometheus: str) -> None:
    """Grafana's variables replaced by what they expand to; every metric a panel names must exist."""
    dashboard = json.loads((DEPLOY / "grafana" / "dashboards" / "tinyserve.json").read_text())
    exprs = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    assert len(exprs) >= 10
    wait_for(lambda: query(prometheus, "tinyserve_requests_started_total")["result"] or None, 20, "a scrape")
    names = set(httpx.get(f"{prometheus}/api/v1/label/__name__/values", timeout=5).json()["data"])
    for expr in exprs:
        promql = expr.replace("$__rate_interval", "30s").replace('"$job"', '"tinyserve"')
        assert "$" not in promql, promql
        query(prometheus, promql)
        missing = set(re.findall(r"tinyserve_\w+", promql)) - names
        assert not missing, f"{expr} names metrics the server does not export: {missing}"
