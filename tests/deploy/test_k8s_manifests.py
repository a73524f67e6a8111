"""deploy/k8s rendered by kubectl's kustomize, validated offline, and held to the server's own facts.

Every overlay renders and every object validates against Kubernetes' OpenAPI schemas (strict: unknown
fields fail) for the oldest and newest versions the kubernetes-validate package ships, 1.28 and 1.37.
Then what the manifests promise is checked against the server's flags and defaults (server/settings.py),
its metric names (server/metrics.py) and the nginx settings streams need (deploy/nginx/proxy.conf): the
grace period covers the preStop sleep and the drain, the probes hit the routes that mean what they
should, the API key never sits in a ConfigMap, and the autoscaler asks for metrics that exist.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from server.__main__ import UVICORN_SHUTDOWN_SECONDS
from server.engine.outputs import EngineStats
from server.metrics import Metrics
from server.settings import Settings, env_name, parse_settings
from tests.deploy.deploy_tools import DEPLOY, K8S
from tests.deploy.k8s_objects import (
    MONITORING,
    OVERLAYS,
    Obj,
    adapter_metric_names,
    container_port,
    one,
    prestop_sleep_seconds,
    rendered,
    server_container,
    server_env,
)

KUBERNETES_VERSIONS = ("1.28.0", kubernetes_validate.latest_version())
OPERATOR_KINDS = {("monitoring.coreos.com/v1", "PodMonitor")}
"""Custom resources: their schemas come with the operator's CRDs, not with Kubernetes."""
STARTUP_BUDGET_S = 600
"""The least time the startup probe must allow: a cold start (kernels built, decode step compiled)
took 9 minutes on a busy 2-core machine."""
RUNTIME_MEMORY = 2 << 30
"""Beyond the KV budget, what a CPU replica needs: weights and runtime (0.8 GiB resident for the
shipped model) and the compiler's peaks."""
WRITABLE_ENV = ("HOME", "TMPDIR", "TORCH_EXTENSIONS_DIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
"""Where the server writes at run time (root filesystem read-only): each must lie on an emptyDir."""
_UNITS = {"": 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}


def quantity(text: str | int) -> float:
    number, unit = re.fullmatch(r"([0-9.]+)([a-zA-Z]*)", str(text)).groups()  # type: ignore[union-attr]
    return float(number) * _UNITS[unit]


def settings_of(objects: tuple[Obj, ...]) -> Settings:
    """The flags the container runs with, parsed by the server's own parser (bad values fail here)."""
    env = server_env(objects)
    known = {env_name(f.name) for f in dataclasses.fields(Settings)}
    unknown = {k for k in env if k.startswith("TINYSERVE_")} - known
    assert not unknown, f"no such flag: {unknown}"
    return parse_settings([], env=env)


def pod_spec(objects: tuple[Obj, ...]) -> Obj:
    return one(objects, "Deployment", "tinyserve")["spec"]["template"]["spec"]


def pod_labels(objects: tuple[Obj, ...]) -> dict[str, str]:
    return one(objects, "Deployment", "tinyserve")["spec"]["template"]["metadata"]["labels"]


def selects_the_pods(selector: dict[str, str], objects: tuple[Obj, ...]) -> bool:
    labels = pod_labels(objects)
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


@pytest.mark.parametrize("name", [*OVERLAYS, *MONITORING])
def test_renders_and_validates_against_the_kubernetes_schemas(name: str) -> None:
    objects = rendered({**OVERLAYS, **MONITORING}[name])
    assert objects
    for obj in objects:
        if (obj["apiVersion"], obj["kind"]) in OPERATOR_KINDS:
            continue
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                raise AssertionError(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {exc}") from None


@pytest.mark.parametrize("name", OVERLAYS)
def test_grace_period_covers_the_presleep_the_drain_and_the_last_flush(name: str) -> None:
    objects = rendered(OVERLAYS[name])
    settings = settings_of(objects)
    grace = pod_spec(objects)["terminationGracePeriodSeconds"]
    sleep = prestop_sleep_seconds(server_container(objects))
    needed = sleep + settings.shutdown_grace_seconds + UVICORN_SHUTDOWN_SECONDS
    assert grace >= needed, (
        f"terminationGracePeriodSeconds {grace} < preStop sleep {sleep} + --shutdown-grace-seconds "
        f"{settings.shutdown_grace_seconds} + the server's last flush {UVICORN_SHUTDOWN_SECONDS}: "
        "the kubelet would kill streams the server is still draining"
    )
    assert 0 < sleep < grace


@pytest.mark.parametrize("name", OVERLAYS)
def test_probes_ask_the_routes_that_mean_started_ready_and_alive(name: str) -> None:
    objects = rendered(OVERLAYS[name])
    settings = settings_of(objects)
    container = server_container(objects)
    assert container_port(container, "http") == settings.port and settings.host == "0.0.0.0"
    assert container_port(container, "metrics") == settings.metrics_port
    assert len(container["ports"]) == 2
    routes = {"startupProbe": "/health", "readinessProbe": "/ready", "livenessProbe": "/health"}
    for probe, path in routes.items():
        get = container[probe]["httpGet"]
        assert get == {"path": path, "port": "http"}, (probe, get)
        assert "httpHeaders" not in get  # open routes: a probe cannot carry the API key
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= STARTUP_BUDGET_S
    # Liveness must not kill a pod that is still draining or merely busy: it outlasts a slow answer.
    live = container["livenessProbe"]
    assert live["timeoutSeconds"] >= 5 and live["failureThreshold"] >= 3


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_api_key_comes_from_a_secret_never_a_configmap(name: str) -> None:
    objects = rendered(OVERLAYS[name])
    assert not [o for o in objects if o["kind"] == "Secret"]
    for config in (o for o in objects if o["kind"] == "ConfigMap"):
        assert not any("KEY" in k for k in config["data"]), config["data"]
    (key,) = [e for e in server_container(objects)["env"] if e["name"] == "TINYSERVE_API_KEY"]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "tinyserve-api-key", "key": "api-key"}


@pytest.mark.parametrize("name", OVERLAYS)
def test_read_only_root_non_root_user_and_an_emptydir_for_every_write(name: str) -> None:
    objects = rendered(OVERLAYS[name])
    spec, container = pod_spec(objects), server_container(objects)
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["runAsUser"] != 0
    assert spec["automountServiceAccountToken"] is False
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] and not security["allowPrivilegeEscalation"]
    assert security["capabilities"]["drop"] == ["ALL"]
    empty = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    env = server_env(objects)
    for variable in WRITABLE_ENV:
        path = Path(env[variable])
        on = [mounts[m] for m in mounts if path == Path(m) or Path(m) in path.parents]
        assert on and on[0] in empty, f"{variable}={path} is not on an emptyDir: {mounts}"
    for mount in container["volumeMounts"]:  # the only other volume, the weights, is mounted read-only
        assert mount["name"] in empty or mount.get("readOnly"), mount


@pytest.mark.parametrize("name", OVERLAYS)
def test_resources_follow_the_device_and_the_kv_budget(name: str) -> None:
    objects = rendered(OVERLAYS[name])
    settings = settings_of(objects)
    resources = server_container(objects)["resources"]
    requests, limits = resources["requests"], resources["limits"]
    if settings.device == "cpu":
        assert requests == limits, "Guaranteed QoS: neither throttled below its threads nor evicted first"
        assert settings.threads == quantity(limits["cpu"]), "torch threads != the CPU limit"
        # The KV cache is host memory here, all of it allocated at start-up.
        assert quantity(limits["memory"]) >= settings.kv_cache_memory + RUNTIME_MEMORY
    else:
        assert settings.device == "cuda"
        assert limits["nvidia.com/gpu"] == requests["nvidia.com/gpu"] == 1
        assert server_container(objects)["image"].endswith(":cuda")  # torch's CUDA build (deploy/Dockerfile)
        assert quantity(limits["memory"]) >= RUNTIME_MEMORY


@pytest.mark.parametrize("name", OVERLAYS)
def test_rollout_disruptions_service_and_network_policy_agree(name: str) -> None:
    objects = rendered(OVERLAYS[name])
    deployment = one(objects, "Deployment", "tinyserve")
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    assert deployment["spec"]["strategy"]["rollingUpdate"] == {"maxUnavailable": 0, "maxSurge": 1}
    assert selects_the_pods(deployment["spec"]["selector"]["matchLabels"], objects)
    pdb = one(objects, "PodDisruptionBudget")
    assert selects_the_pods(pdb["spec"]["selector"]["matchLabels"], objects)
    hpa = one(objects, "HorizontalPodAutoscaler")
    assert pdb["spec"]["maxUnavailable"] < hpa["spec"]["minReplicas"]  # one replica always serves
    service = one(objects, "Service")
    assert selects_the_pods(service["spec"]["selector"], objects)
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == "http"
    policy = one(objects, "NetworkPolicy")["spec"]
    assert selects_the_pods(policy["podSelector"]["matchLabels"], objects)
    assert policy["policyTypes"] == ["Ingress"]
    api, metrics = policy["ingress"]
    assert api == {"ports": [{"port": "http", "protocol": "TCP"}]}  # from anywhere: the key guards it
    assert metrics["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    (monitoring,) = metrics["from"]
    assert monitoring == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}


def test_hpa_asks_for_metrics_the_adapter_serves_from_the_servers_gauges() -> None:
    objects = rendered(OVERLAYS["default"])
    hpa = one(objects, "HorizontalPodAutoscaler")["spec"]
    deployment = one(objects, "Deployment", "tinyserve")
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "tinyserve"}
    exported = [f.name for f in Metrics(lambda: EngineStats(0, 0, 1, 0, 0, 0)).registry.collect()]
    served = adapter_metric_names(exported)
    targets = {m["pods"]["metric"]["name"]: m["pods"]["target"] for m in hpa["metrics"]}
    assert "tinyserve_num_requests_waiting" in targets
    assert set(targets) <= served, f"the adapter serves {served}, the HPA asks for {set(targets)}"
    # A running-requests target above the batch size could never be reached.
    running = quantity(targets["tinyserve_num_requests_running"]["averageValue"])
    assert 0 < running <= settings_of(objects).max_num_seqs
    # Scale-down removes one pod at a time, each given its whole grace period to drain first.
    down = hpa["behavior"]["scaleDown"]
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    (policy,) = down["policies"]
    assert policy["type"] == "Pods" and policy["value"] == 1 and policy["periodSeconds"] >= grace
    assert down["stabilizationWindowSeconds"] >= 300
    assert hpa["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == 0


def proxy_setting(name: str) -> str:
    match = re.search(rf"^{name}\s+(\S+);", (DEPLOY / "nginx" / "proxy.conf").read_text(), re.MULTILINE)
    assert match, name
    return match[1]


def routed(path: str, rules: list[Obj]) -> bool:
    """Whether an Ingress path list sends `path` to a backend (Exact, or Prefix by whole segments)."""
    for p in (p for rule in rules for p in rule["http"]["paths"]):
        prefix = p["path"].rstrip("/")
        if path == p["path"] or (p["pathType"] == "Prefix" and (path + "/").startswith(prefix + "/")):
            return True
    return False


def test_ingress_streams_unbuffered_with_the_compose_proxys_timeouts() -> None:
    objects = rendered(OVERLAYS["default"])
    ingress = one(objects, "Ingress")
    notes = ingress["metadata"]["annotations"]
    prefix = "nginx.ingress.kubernetes.io/"
    assert notes[prefix + "proxy-buffering"] == "off" and notes[prefix + "proxy-request-buffering"] == "off"
    assert notes[prefix + "proxy-http-version"] == "1.1"
    assert notes[prefix + "proxy-read-timeout"] + "s" == proxy_setting("proxy_read_timeout")
    assert notes[prefix + "proxy-send-timeout"] + "s" == proxy_setting("proxy_send_timeout")
    assert notes[prefix + "proxy-body-size"] == proxy_setting("client_max_body_size")
    rules = ingress["spec"]["rules"]
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/models", "/tokenize", "/", "/static/app.js"):
        assert routed(path, rules), path
    for path in ("/metrics", "/stats", "/ready", "/health", "/docs", "/v1x"):
        assert not routed(path, rules), path
    for p in (p for rule in rules for p in rule["http"]["paths"]):
        assert p["backend"]["service"] == {"name": "tinyserve", "port": {"name": "http"}}


def test_monitoring_objects_are_the_repositorys_files_and_find_the_pods() -> None:
    monitoring = rendered(MONITORING["monitoring"])
    dashboard_file = DEPLOY / "grafana" / "dashboards" / "tinyserve.json"
    dashboard = one(monitoring, "ConfigMap", "tinyserve-dashboard")
    assert dashboard["metadata"]["labels"] == {"grafana_dashboard": "1"}
    assert dashboard["data"]["tinyserve.json"] == dashboard_file.read_text()
    adapter = one(monitoring, "ConfigMap", "prometheus-adapter")
    assert adapter["data"]["config.yaml"] == (K8S / "monitoring" / "prometheus-adapter.yaml").read_text()
    source = one(monitoring, "ConfigMap", "tinyserve-grafana-datasource")
    (datasource,) = yaml.safe_load(source["data"]["tinyserve-datasource.yaml"])["datasources"]
    text = dashboard_file.read_text()
    uids = set(re.findall(r'"uid":\s*"([^"]+)"', text)) - {json.loads(text)["uid"]}
    assert uids == {datasource["uid"]}, "the dashboard's panels name another data source"
    assert all(o["metadata"]["namespace"] == "monitoring" for o in monitoring)

    app = rendered(OVERLAYS["default"])
    container = server_container(app)
    notes = one(app, "Deployment", "tinyserve")["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
    # Prometheus holds no API key: it scrapes the metrics port, which needs none.
    assert int(notes["prometheus.io/port"]) == container_port(container, "metrics")
    assert not settings_of(app).metrics_without_auth  # on the API port /metrics stays behind the key
    namespace = one(app, "Namespace")["metadata"]["name"]
    (job,) = yaml.safe_load((K8S / "monitoring" / "prometheus-scrape.yaml").read_text())["scrape_configs"]
    assert job["kubernetes_sd_configs"][0]["namespaces"]["names"] == [namespace]
    podmonitor = one(rendered(MONITORING["operator"]), "PodMonitor")["spec"]
    assert podmonitor["namespaceSelector"]["matchNames"] == [namespace]
    assert selects_the_pods(podmonitor["selector"]["matchLabels"], app)
    (endpoint,) = podmonitor["podMetricsEndpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics"


def test_the_configmap_and_the_image_agree_on_the_weights() -> None:
    """The default overlay serves the weights deploy/Dockerfile bakes in, under the name clients send."""
    settings = settings_of(rendered(OVERLAYS["default"]))
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert f"COPY weights/default/ {settings.model}/" in dockerfile
    assert settings.model_name == "default"
    pvc = settings_of(rendered(OVERLAYS["weights-pvc"]))
    mounts = {m["mountPath"] for m in server_container(rendered(OVERLAYS["weights-pvc"]))["volumeMounts"]}
    assert any(Path(m) in pvc.model.parents for m in mounts), (pvc.model, mounts)
