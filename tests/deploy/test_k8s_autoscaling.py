"""The HPA's input, end to end short of a cluster: two real servers stand in for two pods, a real Prometheus
(Debian's) scrapes them with the pod scrape job of deploy/k8s/monitoring/prometheus-scrape.yaml, and
the Prometheus Adapter rule of deploy/k8s/monitoring/prometheus-adapter.yaml is run as the adapter runs
it: its seriesQuery discovers the series, its name rule names the metrics, and its metricsQuery, with
the adapter's template filled in for "every pod of the namespace", returns the waiting requests per pod.

Kubernetes service discovery is swapped for static targets that carry the labels it would attach
(`__meta_kubernetes_namespace`, `__meta_kubernetes_pod_name`, the pod's prometheus.io annotations), so
the job's own relabelling makes the `namespace` and `pod` labels the adapter maps to resources. The
servers run with the pod's TINYSERVE_* flags (rendered from deploy/k8s), an API key as from the Secret,
and each its own --metrics-port (the pod's, moved to a free loopback port), which Prometheus scrapes
without the key, as in the cluster.

One pod is loaded past its batch (--max-num-seqs 1, four streams of thousands of tokens each), so its
queue holds requests for as long as the test looks, on any machine; the other is idle.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
import yaml

from bench.harness import RunningServer, free_port
from tests.conftest import LONG_CONTEXT
from tests.deploy.deploy_tools import K8S, alive, process, require, wait_for
from tests.deploy.k8s_objects import (
    OVERLAYS,
    adapter_metric_names,
    adapter_rules,
    loopback_env,
    one,
    rendered,
)

KEY = "sk-k8s-autoscaling-test"
PODS = ("tinyserve-5d8f7c9b4-busy", "tinyserve-5d8f7c9b4-idle")
STREAMS = 4
STREAM_TOKENS = LONG_CONTEXT - 64
"""Per stream: with one decoded at a time, three wait behind the first for thousands of steps."""
MONITORING = K8S / "monitoring"


def pod_target(port: int, pod: str, namespace: str, annotations: dict[str, str]) -> dict[str, Any]:
    """A static target labelled as Kubernetes' pod discovery labels a pod (before relabelling)."""
    meta = {
        "__meta_kubernetes_namespace": namespace,
        "__meta_kubernetes_pod_name": pod,
        "__meta_kubernetes_pod_phase": "Running",
        # The pod's own annotations, but the port: each stand-in pod has its own metrics port here.
        **{
            f"__meta_kubernetes_pod_annotation_{re.sub(r'[^a-z0-9]', '_', k)}": v
            for k, v in annotations.items()
        },
        "__meta_kubernetes_pod_annotation_prometheus_io_port": str(port),
    }
    return {"targets": [f"127.0.0.1:{port}"], "labels": meta}


@pytest.fixture(scope="module")
def pods(
    start_server: Callable[..., RunningServer], long_checkpoint: Any
) -> dict[str, tuple[RunningServer, int]]:
    """Each stand-in pod: its server and its metrics port (the pod's TINYSERVE_METRICS_PORT, moved)."""
    env = loopback_env(rendered(OVERLAYS["default"]))
    flags = ("--api-key", KEY, "--max-num-seqs", "1", "--threads", "1")  # loopback-sized
    out = {}
    for pod in PODS:
        metrics_port = free_port()
        server = start_server(*flags, "--metrics-port", str(metrics_port), env=env, model=long_checkpoint)
        out[pod] = (server, metrics_port)
    return out


@pytest.fixture(scope="module")
def namespace() -> str:
    return one(rendered(OVERLAYS["default"]), "Namespace")["metadata"]["name"]


@pytest.fixture(scope="module")
def prometheus(
    pods: dict[str, tuple[RunningServer, int]], namespace: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    binary = require("prometheus")
    deployment = one(rendered(OVERLAYS["default"]), "Deployment", "tinyserve")
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    (job,) = yaml.safe_load((MONITORING / "prometheus-scrape.yaml").read_text())["scrape_configs"]
    (sd,) = job.pop("kubernetes_sd_configs")
    assert sd["role"] == "pod" and sd["namespaces"]["names"] == [namespace]
    job["static_configs"] = [pod_target(port, pod, namespace, annotations) for pod, (_, port) in pods.items()]
    job["scrape_interval"] = "1s"  # so that the test need not wait
    work = tmp_path_factory.mktemp("prometheus_k8s")
    config = work / "prometheus.yml"
    config.write_text(yaml.safe_dump({"global": {"scrape_interval": "1s"}, "scrape_configs": [job]}))
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


def prom(url: str, path: str, **params: Any) -> Any:
    r = httpx.get(f"{url}/api/v1/{path}", params=params, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (path, params, body)
    return body["data"]


def fill(template: str, series: str, matchers: dict[str, str], group_by: list[str]) -> str:
    """The adapter's Go template (<< >> delimiters) filled as it fills it for a per-pod request."""
    label_matchers = ",".join(f'{k}{"=~" if "|" in v else "="}"{v}"' for k, v in matchers.items())
    query = (
        template.replace("<<.Series>>", series)
        .replace("<<.LabelMatchers>>", label_matchers)
        .replace("<<.GroupBy>>", ",".join(group_by))
    )
    assert "<<" not in query, f"the rule uses template fields this test does not fill: {query}"
    return query


class Load:
    """STREAMS long streams to one server, read in threads until the `with` block ends and closes them
    (the server aborts them)."""

    def __init__(self, server: RunningServer) -> None:
        self.server, self.stopping, self.threads = server, threading.Event(), []

    def _one(self, i: int) -> None:
        body = {"model": self.server.model, "prompt": f"queue {i}", "max_tokens": STREAM_TOKENS}
        body |= {"ignore_eos": True, "stream": True}
        headers = {"Authorization": f"Bearer {KEY}"}
        with (
            httpx.Client(base_url=self.server.url, timeout=60, trust_env=False) as client,
            client.stream("POST", "/v1/completions", json=body, headers=headers) as r,
        ):
            for _ in r.iter_lines():
                if self.stopping.is_set():
                    return

    def __enter__(self) -> Load:
        self.threads = [threading.Thread(target=self._one, args=(i,), daemon=True) for i in range(STREAMS)]
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stopping.set()
        for t in self.threads:
            t.join(30)


def waiting_now(server: RunningServer) -> int:
    stats = httpx.get(f"{server.url}/stats", headers={"Authorization": f"Bearer {KEY}"}, timeout=10).json()
    return stats["waiting"]


def test_adapter_rule_serves_the_waiting_requests_of_each_pod(
    prometheus: str, pods: dict[str, tuple[RunningServer, int]], namespace: str
) -> None:
    (rule,) = adapter_rules()
    overrides = rule["resources"]["overrides"]
    assert overrides == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    busy, idle = PODS
    server = pods[busy][0]

    def both_up() -> list[dict[str, Any]] | None:
        targets = [t for t in prom(prometheus, "targets")["activeTargets"] if t["health"] == "up"]
        return targets if len(targets) == len(PODS) else None

    for target in wait_for(both_up, 30, "both pods' targets to be up"):
        assert target["labels"]["job"] == "tinyserve" and target["labels"]["namespace"] == namespace
        pod = target["labels"]["pod"]
        assert target["scrapeUrl"] == f"http://127.0.0.1:{pods[pod][1]}/metrics"  # the metrics port, no key

    with Load(server):
        wait_for(lambda: waiting_now(server) >= 1 or None, 60, "requests to queue on the busy pod")

        # Discovery, as the adapter does it: the seriesQuery, then the name rule.
        def discovered() -> list[dict[str, str]] | None:
            found = prom(prometheus, "series", **{"match[]": rule["seriesQuery"]})
            return (
                found
                if {(s["__name__"], s["pod"]) for s in found}
                >= {("tinyserve_num_requests_waiting", pod) for pod in PODS}
                else None
            )

        series = wait_for(discovered, 30, "the rule's seriesQuery to find both pods' gauges")
        assert "tinyserve_num_requests_waiting" in adapter_metric_names([s["__name__"] for s in series])

        # What the adapter asks Prometheus when the HPA asks for the metric of every pod in the namespace.
        query = fill(
            rule["metricsQuery"],
            "tinyserve_num_requests_waiting",
            {"namespace": namespace, "pod": "|".join(PODS)},
            ["pod"],
        )

        def per_pod() -> dict[str, float] | None:
            result = prom(prometheus, "query", query=query)["result"]
            values = {r["metric"]["pod"]: float(r["value"][1]) for r in result}
            assert all(set(r["metric"]) == {"pod"} for r in result), result  # one series per pod, by pod
            return values if set(values) == set(PODS) and values[busy] >= 1 else None

        values = wait_for(per_pod, 30, f"{query} to report the busy pod's queue")
        assert waiting_now(server) >= 1  # still queued: the value is the queue, not a leftover
    assert values[idle] == 0, values
    assert values[busy] <= STREAMS - 1, values
    print(f"\n{query}\n  -> {values}")
