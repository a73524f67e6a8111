"""The rendered manifests of deploy/k8s, read as the cluster would read them (for the k8s tests)."""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import yaml

from tests.deploy.deploy_tools import K8S, render

APP = K8S  # `kubectl apply -k deploy/k8s`: the CPU overlay
OVERLAYS = {
    "default": APP,
    "cpu": K8S / "overlays" / "cpu",
    "gpu": K8S / "overlays" / "gpu",
    "weights-pvc": K8S / "overlays" / "weights-pvc",
}
"""Every way of deploying the server; each must stand on its own."""
MONITORING = {"monitoring": K8S / "monitoring", "operator": K8S / "monitoring" / "operator"}
ADAPTER_RULES = K8S / "monitoring" / "prometheus-adapter.yaml"

Obj = dict[str, Any]


@functools.cache
def rendered(kustomization: Path) -> tuple[Obj, ...]:
    return tuple(render(kustomization))


def one(objects: tuple[Obj, ...], kind: str, name: str | None = None) -> Obj:
    found = [o for o in objects if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"{len(found)} {kind} objects named {name or 'anything'}"
    return found[0]


def server_container(objects: tuple[Obj, ...]) -> Obj:
    (container,) = one(objects, "Deployment", "tinyserve")["spec"]["template"]["spec"]["containers"]
    return container


def server_env(objects: tuple[Obj, ...]) -> dict[str, str]:
    """The container's environment: its ConfigMap's variables, then its own literal `env` entries."""
    container = server_container(objects)
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"])["data"])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def prestop_sleep_seconds(container: Obj) -> float:
    """The preStop hook's `sleep N` (the pod stays an endpoint that long before SIGTERM)."""
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and len(command) == 2, command
    return float(command[1])


MACHINE_SPECIFIC = ("HOST", "PORT", "METRICS_PORT", "MODEL", "SERVED_MODEL_NAME")


def loopback_env(objects: tuple[Obj, ...]) -> dict[str, str]:
    """The container's TINYSERVE_* flags for a server the tests start on loopback: all but where it
    listens and what it loads, which are the test's (the pod's paths do not exist here)."""
    env = server_env(objects)
    mine = {f"TINYSERVE_{name}" for name in MACHINE_SPECIFIC}
    return {k: v for k, v in env.items() if k.startswith("TINYSERVE_") and k not in mine}


def container_port(container: Obj, name: str) -> int:
    (port,) = [p["containerPort"] for p in container["ports"] if p["name"] == name]
    return port


def adapter_rules() -> list[Obj]:
    return yaml.safe_load(ADAPTER_RULES.read_text())["rules"]


def adapter_metric_names(series: list[str]) -> set[str]:
    """The custom metric names the adapter serves for these series (its `name.matches` / `name.as`)."""
    names = set()
    for rule in adapter_rules():
        pattern, template = re.compile(rule["name"]["matches"]), rule["name"]["as"]
        for s in series:
            if match := pattern.search(s):
                names.add(re.sub(r"\$\{(\d+)\}", lambda m, match=match: match.group(int(m[1])), template))
    return names
