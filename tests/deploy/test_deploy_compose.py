"""docker-compose.yml validated by compose itself, and the deploy files checked against each other.

There is no Docker engine here, so nothing is built or started: `compose config` validates the file
without one, and the cross-checks below catch what it cannot (a mount of a file that is not in the
repo, nginx including a path nothing is mounted at, a dashboard naming a metric nobody exports).
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.engine.outputs import EngineStats
from server.metrics import Metrics
from tests.deploy.deploy_tools import DEPLOY, ROOT, compose_command

SERVICES = {"server", "nginx", "prometheus", "grafana"}


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def mounts(service: dict[str, Any]) -> dict[str, Path]:
    """Bind mounts of the repo's files: container path → repo path."""
    out = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        if source.startswith("./"):
            out[target] = ROOT / source
    return out


def test_compose_config_validates() -> None:
    command = compose_command()
    done = subprocess.run([*command, "-f", str(ROOT / "docker-compose.yml"), "config", "-q"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)  # fmt: skip
    assert done.returncode == 0, done.stderr


def test_mounted_files_exist_and_are_where_their_users_look(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == SERVICES
    for name, service in services.items():
        for source in mounts(service).values():
            assert source.exists(), f"{name} mounts {source}, which is not in the repo"
    nginx = mounts(services["nginx"])
    (include,) = re.findall(r"include\s+(\S+);", (DEPLOY / "nginx.conf").read_text())
    assert nginx[include] == DEPLOY / "nginx" / "proxy.conf"
    assert nginx["/etc/nginx/conf.d/default.conf"] == DEPLOY / "nginx.conf"
    assert mounts(services["prometheus"])["/etc/prometheus/prometheus.yml"] == DEPLOY / "prometheus.yml"
    assert services["nginx"]["depends_on"]["server"]["condition"] == "service_healthy"
    assert (
        ROOT / services["server"]["build"]["context"] / services["server"]["build"]["dockerfile"]
    ).exists()


def test_discovery_names_the_service_and_its_port(compose: dict[str, Any]) -> None:
    env = dict(e.split("=", 1) for e in compose["services"]["server"]["environment"] if "=" in e)
    assert env["TINYSERVE_HOST"] == "0.0.0.0" and env["TINYSERVE_METRICS_WITHOUT_AUTH"] == "1"
    port = env["TINYSERVE_PORT"]
    (job,) = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["server"] and sd["type"] == "A" and str(sd["port"]) == port
    nginx = (DEPLOY / "nginx.conf").read_text()
    assert re.search(rf"^\s*server\s+server:{port}\s+resolve;", nginx, re.MULTILINE)
    assert "resolver 127.0.0.11" in nginx  # Docker's DNS, so scaled replicas are found
    proxy = (DEPLOY / "nginx" / "proxy.conf").read_text()
    for directive in ("proxy_buffering off;", "proxy_http_version 1.1;", "proxy_read_timeout 3600s;"):
        assert directive in proxy


def test_dockerfile_installs_cpu_torch_first_and_ships_the_weights() -> None:
    text = (DEPLOY / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.MULTILINE)
    # The CPU index unless the build says otherwise (the CUDA image of deploy/k8s/overlays/gpu).
    assert re.search(r"^ARG TORCH_INDEX=https://download\.pytorch\.org/whl/cpu$", text, re.MULTILINE)
    torch = re.search(r'^RUN pip install torch==2\.13\.0 --index-url "\$TORCH_INDEX"$', text, re.MULTILINE)
    package = re.search(r"^RUN pip install \. ", text, re.MULTILINE)
    assert torch and package and torch.start() < package.start()
    assert "COPY weights/default/" in text and "TINYSERVE_HOST=0.0.0.0" in text
    assert re.search(r"HEALTHCHECK .*/health", text, re.DOTALL)
    ignore = (ROOT / ".dockerignore").read_text().split()
    for source in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.MULTILINE):
        for path in source.split():
            assert (ROOT / path).exists() or path == "weights/default/", path
            assert f"!{path}" in ignore, f".dockerignore leaves {path} out of the build context"


def test_grafana_reads_the_prometheus_service_and_panels_name_real_metrics() -> None:
    grafana = DEPLOY / "grafana"
    (source,) = yaml.safe_load((grafana / "provisioning/datasources/prometheus.yml").read_text())[
        "datasources"
    ]
    assert source["url"] == "http://prometheus:9090"
    dashboard = json.loads((grafana / "dashboards/tinyserve.json").read_text())
    titles = " ".join(p["title"] for p in dashboard["panels"]).lower()
    for needed in ("time to first token", "inter-token", "tokens per second", "by status", "running", "kv"):
        assert needed in titles, needed
    metrics = Metrics(lambda: EngineStats(0, 0, 1, 0, 0, 0))
    exported = {
        f"{family.name}{suffix}"
        for family in metrics.registry.collect()
        for suffix in ("", "_total", "_bucket", "_count", "_sum")
    }
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"]
        for target in panel["targets"]:
            unknown = set(re.findall(r"tinyserve_\w+", target["expr"])) - exported
            assert not unknown, f"panel {panel['title']!r}: {unknown}"
    providers = yaml.safe_load((grafana / "provisioning/dashboards/tinyserve.yml").read_text())["providers"]
    assert providers[0]["options"]["path"] == "/var/lib/grafana/dashboards"
