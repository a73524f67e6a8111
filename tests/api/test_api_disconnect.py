"""A client that goes away mid-request aborts its engine work and frees its KV cache."""

from __future__ import annotations

import contextlib

import httpx

from bench.harness import RunningServer
from tests.support import sse_events, wait_idle

LONG = {"max_tokens": 480, "ignore_eos": True, "stream": True}


def _open(client: httpx.Client, server: RunningServer, i: int) -> httpx.Response:
    if i % 2:
        path, body = "/v1/completions", {"prompt": f"stream {i}"}
    else:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": f"chat {i}"}]}
    request = client.build_request("POST", path, json={"model": server.model, **body, **LONG})
    response = client.send(request, stream=True)
    assert response.status_code == 200
    return response


def test_dropped_streams_free_their_cache(server: RunningServer) -> None:
    with server.client() as probe:
        steps_before = wait_idle(probe)["steps"]
        clients = [server.client() for _ in range(4)]
        opened = []
        try:
            opened = [_open(client, server, i) for i, client in enumerate(clients)]
            # Keep the iterators referenced: a collected one closes its connection (a disconnect).
            readers = [sse_events(response) for response in opened]
            for events in readers:
                next(events), next(events)  # tokens are flowing: the request is running
            busy = probe.get("/stats").json()
            assert busy["running"] + busy["waiting"] == 4 and busy["kv_used_tokens"] > 0
        finally:
            for response in opened:
                response.close()  # drops the connection mid-stream
            for client in clients:
                client.close()
        stats = wait_idle(probe)
        assert (stats["running"], stats["waiting"], stats["kv_used_tokens"]) == (0, 0, 0), stats
        # Run to completion, the streams would have taken 480 steps; aborted, far fewer (a count of
        # steps, not seconds: it holds on a fast machine and on a loaded one).
        assert stats["steps"] - steps_before < 400
    log = server.log()
    assert log.count("status=200 outcome=aborted") >= 4  # the access lines of the dropped streams


def test_abandoned_non_streaming_request_is_aborted(server: RunningServer) -> None:
    body = {"model": server.model, "prompt": "wait for me", "n": 8, "max_tokens": 480, "ignore_eos": True}
    timeout = httpx.Timeout(30, read=0.2)
    with httpx.Client(base_url=server.url, timeout=timeout) as client, contextlib.suppress(httpx.ReadTimeout):
        client.post("/v1/completions", json=body)
    with server.client() as probe:
        stats = wait_idle(probe)
        assert (stats["running"], stats["waiting"], stats["kv_used_tokens"]) == (0, 0, 0), stats
    assert "route=/v1/completions status=499 outcome=aborted" in server.log()
