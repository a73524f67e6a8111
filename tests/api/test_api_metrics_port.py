"""--metrics-port: /metrics alone, without the API key, on a second port; the API port unchanged.

This is what lets deploy/k8s's NetworkPolicy admit Prometheus to the metrics and clients to the API.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from bench.harness import RunningServer, free_port
from server.__main__ import main as server_main

KEY = "sk-metrics-port-test"


@pytest.fixture(scope="module")
def server(start_server: Callable[..., RunningServer]) -> tuple[RunningServer, str]:
    port = free_port()
    return start_server("--api-key", KEY, "--metrics-port", str(port)), f"http://127.0.0.1:{port}"


def test_metrics_port_serves_metrics_without_the_key_and_nothing_else(
    server: tuple[RunningServer, str],
) -> None:
    api, metrics_url = server
    with httpx.Client(base_url=metrics_url, timeout=10, trust_env=False) as client:
        r = client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        assert "tinyserve_num_requests_waiting " in r.text
        for path in ("/v1/models", "/health", "/ready", "/stats", "/", "/metrics/"):
            r = client.get(path, headers={"Authorization": f"Bearer {KEY}"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found", (path, r.text)
        body = {"model": api.model, "prompt": "x", "max_tokens": 1}
        assert client.post("/v1/completions", json=body).status_code == 404
        assert client.post("/metrics").status_code == 405
    with api.client() as client:  # the API port: /metrics still behind the key, the API as before
        assert client.get("/metrics").status_code == 401
        good = {"Authorization": f"Bearer {KEY}"}
        assert client.get("/metrics", headers=good).status_code == 200
        assert client.post("/v1/completions", json=body, headers=good).status_code == 200


def test_metrics_port_in_use_or_equal_to_the_api_port_fails_before_loading(
    tiny_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        args = ["--model", str(tiny_checkpoint), "--host", "127.0.0.1", "--port", str(free_port())]
        assert server_main([*args, "--metrics-port", str(taken)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot bind") and str(taken) in err and "\n" not in err
    port = str(free_port())
    assert server_main(["--model", str(tiny_checkpoint), "--port", port, "--metrics-port", port]) == 1
    assert capsys.readouterr().err.strip() == f"error: --metrics-port {port} is the API's --port"
    with pytest.raises(SystemExit):
        server_main(["--model", str(tiny_checkpoint), "--metrics-port", "0"])
