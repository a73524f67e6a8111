"""The drain contract deploy/k8s relies on, through a real server run with the pod's flags.

When Kubernetes ends a pod (rolling update, scale-down, node drain) it runs the preStop sleep, then
sends SIGTERM and waits terminationGracePeriodSeconds in all before it kills. The manifests assume the
server then: turns /ready to 503 at once (within the readiness probe's window, long before the streams
end), keeps /health at 200 (liveness must not restart a draining pod), lets every in-flight stream
finish, and exits 0 within --shutdown-grace-seconds. tests/reliability/test_rel_shutdown.py checks the
same shutdown with its own flags (and new requests' 503s, queued streams, a second signal); here the
flags and every bound come from the rendered manifests (test_k8s_manifests.py checks the grace period
covers them).

The streams cannot end too early on a fast machine: the signal is sent once both run, and the test
asserts /ready had turned 503 before the first ended. Nor too late on a slow one: 1000 batched decode
steps fit in the 120 s grace period at 9 steps a second, far below any machine's pace.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from bench.harness import RunningServer
from tests.deploy.k8s_objects import (
    OVERLAYS,
    loopback_env,
    one,
    prestop_sleep_seconds,
    rendered,
    server_container,
)
from tests.reliability.rel_support import completed, start_streams, wait_for_load

STREAMS = 2
TOKENS = 1000


def test_sigterm_leaves_the_endpoints_at_once_and_drains_within_the_manifests_grace(
    start_server: Callable[..., RunningServer], long_checkpoint: Path
) -> None:
    objects = rendered(OVERLAYS["default"])
    env = loopback_env(objects)
    grace = float(env["TINYSERVE_SHUTDOWN_GRACE_SECONDS"])
    container = server_container(objects)
    readiness = container["readinessProbe"]
    noticed_within = readiness["periodSeconds"] * readiness["failureThreshold"]
    pod_budget = one(objects, "Deployment", "tinyserve")["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"
    ]
    kill_after = pod_budget - prestop_sleep_seconds(container)  # SIGTERM comes after the preStop sleep

    server = start_server("--threads", "1", env=env, model=long_checkpoint)  # loopback-sized threads
    results: list[Any] = []
    thread = start_streams(server, TOKENS, results, STREAMS, timeout=kill_after + 30)
    wait_for_load(server, STREAMS)
    sigterm_at = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)

    with httpx.Client(base_url=server.url, timeout=10, trust_env=False) as client:
        deadline = sigterm_at + noticed_within
        while (ready := client.get("/ready")).status_code != 503:
            assert time.monotonic() < deadline, (
                f"/ready still {ready.status_code} {noticed_within}s after SIGTERM"
            )
            time.sleep(0.01)
        not_ready_at = time.monotonic()
        assert ready.json()["status"] == "draining"
        assert client.get("/health").status_code == 200  # liveness holds while draining

    code = server.proc.wait(kill_after + 30)
    exited_at = time.monotonic()
    thread.join(30)
    assert code == 0
    assert len(results) == STREAMS
    for i, r, _ in results:
        assert completed(r), (i, r and r.events[-3:])
    first_stream = min(t for _, _, t in results)
    assert not_ready_at < first_stream, "the streams ended before the drain began: make them longer"
    assert exited_at - sigterm_at < min(grace, kill_after), (exited_at - sigterm_at, grace, kill_after)
    print(
        f"\nSIGTERM: /ready 503 after {1000 * (not_ready_at - sigterm_at):.0f} ms, streams done after "
        f"{max(t for _, _, t in results) - sigterm_at:.1f} s, exit 0 after {exited_at - sigterm_at:.1f} s "
        f"(grace {grace:.0f} s, pod killed after {kill_after:.0f} s)"
    )
