"""End to end on a real cluster: deploy/k8s with two replicas, streams through the Service.

Runs where kubectl reaches a cluster and TINYSERVE_K8S_IMAGE names the image of deploy/Dockerfile as
that cluster can run it (for kind: `docker build -f deploy/Dockerfile -t tinyserve:local . && kind load
docker-image tinyserve:local`). The default overlay is deployed into a namespace of its own, sized
down to fit a small node, scaled to two replicas (no HPA: no Prometheus Adapter is assumed), and a
client pod (the same image) streams completions through the Service's cluster address; both replicas'
access logs must show some of them. Without a cluster the test skips and says what is missing.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import yaml

from tests.deploy.deploy_tools import kubectl, which
from tests.deploy.k8s_objects import OVERLAYS, Obj, one, rendered

IMAGE_ENV = "TINYSERVE_K8S_IMAGE"
REQUESTS = 16
"""Through the Service: kube-proxy spreads connections at random, so both replicas get some."""
CLIENT = """
import json, sys, httpx
key, count = sys.argv[1], int(sys.argv[2])
out = []
with httpx.Client(base_url="http://tinyserve:8000", timeout=300) as client:
    for i in range(count):
        rid = f"e2e-{i}"
        body = {"model": "default", "prompt": "def f(x):", "max_tokens": 32, "stream": True}
        headers = {"Authorization": f"Bearer {key}", "X-Request-Id": rid}
        with client.stream("POST", "/v1/completions", json=body, headers=headers) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        last = events[-1] if events else ""
        out.append({"id": rid, "status": r.status_code, "events": len(events), "last": last})
print(json.dumps(out))
"""


def run(*args: str, stdin: str | None = None, timeout: float = 120) -> str:
    done = subprocess.run(
        [kubectl(), *args], input=stdin, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"kubectl {' '.join(args)}: {done.stderr.strip()}"
    return done.stdout


def no_cluster_reason() -> str | None:
    """Why no end-to-end run is possible here, or None when a cluster and an image are at hand."""
    probe = subprocess.run(
        [kubectl(), "version", "--output=json", "--request-timeout=5s"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    reachable = probe.returncode == 0 and "serverVersion" in probe.stdout
    if reachable and os.environ.get(IMAGE_ENV):
        return None
    missing = []
    if not reachable:
        said = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else "no context"
        missing.append(f"kubectl reaches no cluster ({said})")
        starters = [name for name in ("kind", "k3s", "k3d", "minikube") if which(name)]
        engine = which("docker") and subprocess.run(["docker", "info"], capture_output=True).returncode == 0
        missing.append(
            f"no cluster can be started here: {', '.join(starters) or 'none of kind, k3s, k3d, minikube'} "
            f"installed (none is packaged in PyPI, Debian or npm, the only registries this machine reaches), "
            f"and {'a' if engine else 'no'} Docker engine runs for kind's node containers"
        )
    if not os.environ.get(IMAGE_ENV):
        missing.append(f"{IMAGE_ENV} names no image of deploy/Dockerfile for the cluster to run")
    return "; ".join(missing)


def for_the_test(objects: tuple[Obj, ...], namespace: str, image: str) -> list[Obj]:
    """The default overlay in `namespace`, two small replicas, without what needs cluster add-ons."""
    out = []
    for obj in objects:
        if obj["kind"] in ("Namespace", "HorizontalPodAutoscaler", "Ingress"):
            continue  # our own namespace; no Prometheus Adapter or ingress controller is assumed
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["namespace"] = namespace
        if obj["kind"] == "ConfigMap":
            obj["data"] |= {"TINYSERVE_THREADS": "1", "TINYSERVE_KV_CACHE_MEMORY": "256M"}
        if obj["kind"] == "Deployment":
            obj["spec"]["replicas"] = 2
            (container,) = obj["spec"]["template"]["spec"]["containers"]
            container["image"] = image
            small = {"cpu": "1", "memory": "2Gi"}
            container["resources"] = {"requests": small, "limits": small}
        out.append(obj)
    return out


@pytest.fixture
def namespace() -> Iterator[str]:
    reason = no_cluster_reason()
    if reason:
        pytest.skip(f"no end-to-end run on a cluster: {reason}")
    name = f"tinyserve-e2e-{secrets.token_hex(3)}"
    run("create", "namespace", name)
    try:
        yield name
    finally:
        run("delete", "namespace", name, "--wait=false")


def test_two_replicas_stream_through_the_service(namespace: str) -> None:
    key = secrets.token_hex(16)
    image = os.environ[IMAGE_ENV]
    run("-n", namespace, "create", "secret", "generic", "tinyserve-api-key", f"--from-literal=api-key={key}")
    manifests = for_the_test(rendered(OVERLAYS["default"]), namespace, image)
    run("-n", namespace, "apply", "-f", "-", stdin=yaml.safe_dump_all(manifests))
    run("-n", namespace, "rollout", "status", "deployment/tinyserve", "--timeout=1500s", timeout=1560)
    pods = json.loads(
        run("-n", namespace, "get", "pods", "-l", "app.kubernetes.io/name=tinyserve", "-o", "json")
    )
    names = [p["metadata"]["name"] for p in pods["items"] if p["status"].get("phase") == "Running"]
    assert len(names) == 2, names

    args = ["-n", namespace, "run", "client", f"--image={image}", "--restart=Never", "--rm", "-i", "--quiet"]
    args += ["--command", "--", "python", "-c", CLIENT, key, str(REQUESTS)]
    results: list[dict[str, Any]] = json.loads(run(*args, timeout=900).strip().splitlines()[-1])
    assert len(results) == REQUESTS
    for r in results:  # every stream arrived whole through the Service: many events, then [DONE]
        assert r["status"] == 200 and r["events"] > 8 and r["last"] == "data: [DONE]", r
    served = {name: run("-n", namespace, "logs", name).count("request_id=e2e-") for name in names}
    assert all(served.values()) and sum(served.values()) == REQUESTS, served
    service = one(tuple(manifests), "Service")
    assert service["spec"]["ports"][0]["port"] == 8000
