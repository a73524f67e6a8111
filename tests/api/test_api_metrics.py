"""/metrics, X-Request-Id and the access log, against the real server (and two in-process apps).

Every check compares a scrape taken before with one taken after, so the shared server's other
traffic does not matter as long as nothing else runs at the same time (tests run one at a time).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from bench.harness import RunningServer, Scrape, scrape
from server.api.app import create_app
from server.engine.async_engine import AsyncEngine
from server.settings import parse_settings
from tests.support import sse_events, wait_idle

KEY = "sk-metrics-test"
LONG = {"max_tokens": 400, "ignore_eos": True, "stream": True}
ACCESS = re.compile(r"server\.access: (.*)$")
PAIR = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def access_lines(log: str) -> list[dict[str, str]]:
    """The logfmt access lines of a server log, as dicts (quoted values keep their quotes)."""
    return [dict(PAIR.findall(m.group(1))) for line in log.splitlines() if (m := ACCESS.search(line))]


def delta(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    return after.get(name, **labels) - before.get(name, **labels)


def settle(server: RunningServer, ready: Callable[[Scrape], bool], timeout: float = 5.0) -> Scrape:
    """Scrape until `ready` holds (counters move when a request's end has been processed) or time out."""
    deadline = time.monotonic() + timeout
    while True:
        now = scrape(server.url)
        if ready(now) or time.monotonic() > deadline:
            return now
        time.sleep(0.05)


@pytest.fixture
def idle(server: RunningServer, http: httpx.Client) -> RunningServer:
    wait_idle(http)
    return server


def test_metrics_move_as_requests_finish(idle: RunningServer, http: httpx.Client) -> None:
    server = idle
    before = scrape(server.url)
    one = {"model": server.model, "max_tokens": 6, "ignore_eos": True, "temperature": 0}
    a = http.post("/v1/completions", json={**one, "prompt": "count me"}).json()
    b = http.post("/v1/completions", json={**one, "prompt": "twice", "n": 2}).json()
    chat = {**one, "messages": [{"role": "user", "content": "hi"}], "stream": True}
    chat["stream_options"] = {"include_usage": True}
    with http.stream("POST", "/v1/chat/completions", json=chat) as r:
        c = [e for e in sse_events(r) if e != "[DONE]" and e.get("usage")][-1]
    after = scrape(server.url)

    usages = [a["usage"], b["usage"], c["usage"]]
    assert delta(before, after, "tinyserve_prompt_tokens_total") == sum(u["prompt_tokens"] for u in usages)
    generated = sum(u["completion_tokens"] for u in usages)
    assert generated == 6 + 12 + 6
    assert delta(before, after, "tinyserve_generation_tokens_total") == generated
    for name in ("time_to_first_token", "e2e_request_latency", "request_queue_time", "request_prefill_time"):
        assert delta(before, after, f"tinyserve_{name}_seconds_count") == 3, name  # one per engine request
    assert delta(before, after, "tinyserve_inter_token_latency_seconds_count") >= 5 + 5 + 5
    assert delta(before, after, "tinyserve_request_success_total", finished_reason="length") == 4  # choices
    assert delta(before, after, "tinyserve_request_success_total", finished_reason="stop") == 0
    assert delta(before, after, "tinyserve_decode_batch_size_count") >= 5
    assert delta(before, after, "tinyserve_engine_step_duration_seconds_count") >= 6
    ok = {"status": "200"}
    assert delta(before, after, "tinyserve_http_responses_total", route="/v1/completions", **ok) == 2
    assert delta(before, after, "tinyserve_http_responses_total", route="/v1/chat/completions", **ok) == 1
    assert delta(before, after, "tinyserve_requests_started_total") == 3
    assert delta(before, after, "tinyserve_requests_finished_total") == 3
    for name in ("time_to_first_token", "inter_token_latency"):  # 1 ms buckets resolve a tiny model on a CPU
        les = {labels["le"] for n, labels, _ in after.samples if n == f"tinyserve_{name}_seconds_bucket"}
        assert "0.001" in les, les
    assert after.get("tinyserve_inter_token_latency_seconds_bucket", le="+Inf") == after.get(
        "tinyserve_inter_token_latency_seconds_count"
    )


def test_aborts_and_failures_balance_the_started_count(idle: RunningServer, http: httpx.Client) -> None:
    server = idle
    before = scrape(server.url)
    body = {"model": server.model, "prompt": "drop me", **LONG}
    with http.stream("POST", "/v1/completions", json=body) as r:
        events = sse_events(r)
        next(events), next(events)
        during = scrape(server.url)  # gauges are read at scrape time
    assert during.get("tinyserve_num_requests_running") >= 1
    assert 0 < during.get("tinyserve_kv_cache_usage_perc") <= 1
    assert http.post("/v1/completions", json={**body, "max_tokens": 10**6}).status_code == 400  # not started
    after = settle(server, lambda s: delta(before, s, "tinyserve_requests_aborted_total") >= 1)
    assert delta(before, after, "tinyserve_requests_started_total") == 1
    assert delta(before, after, "tinyserve_requests_aborted_total") == 1
    assert delta(before, after, "tinyserve_request_success_total", finished_reason="abort") == 1
    assert delta(before, after, "tinyserve_http_responses_total", route="/v1/completions", status="400") == 1
    wait_idle(http)
    idle_now = scrape(server.url)
    assert (
        idle_now.get("tinyserve_num_requests_running") == 0 == idle_now.get("tinyserve_kv_cache_usage_perc")
    )
    ended = sum(idle_now.get(f"tinyserve_requests_{o}_total") for o in ("finished", "aborted", "failed"))
    assert idle_now.get("tinyserve_requests_started_total") == ended


def test_status_labels_are_route_templates(idle: RunningServer, http: httpx.Client) -> None:
    server = idle
    before = scrape(server.url)
    assert http.get("/no/such/path-12345").status_code == 404
    assert http.get("/v1/models/not-a-model-67890").status_code == 404
    assert http.post("/health").status_code == 405
    after = scrape(server.url)
    assert delta(before, after, "tinyserve_http_responses_total", route="unmatched", status="404") == 1
    template = "/v1/models/{model:path}"
    assert delta(before, after, "tinyserve_http_responses_total", route=template, status="404") == 1
    assert delta(before, after, "tinyserve_http_responses_total", route="/health", status="405") == 1
    routes = {
        labels["route"] for name, labels, _ in after.samples if name == "tinyserve_http_responses_total"
    }
    assert not any("12345" in r or "67890" in r for r in routes), routes


def test_request_id_is_echoed_validated_and_used_in_response_ids(
    idle: RunningServer, http: httpx.Client
) -> None:
    server = idle
    body = {"model": server.model, "prompt": "id", "max_tokens": 2}
    r = http.post("/v1/completions", json=body, headers={"X-Request-Id": "trace-42.a:b_c"})
    assert r.headers["x-request-id"] == "trace-42.a:b_c" and r.json()["id"] == "cmpl-trace-42.a:b_c"
    with http.stream(
        "POST", "/v1/completions", json={**body, "stream": True}, headers={"X-Request-Id": "s-1"}
    ) as r:
        assert r.headers["x-request-id"] == "s-1"
        assert next(sse_events(r))["id"] == "cmpl-s-1"
    for bad in ("x" * 65, "has space", "new\u00e9line", ""):
        r = http.post("/v1/completions", json=body, headers={"X-Request-Id": bad.encode("utf-8")})
        made = r.headers["x-request-id"]
        assert made != bad and r.json()["id"] == made and re.fullmatch(r"cmpl-[0-9a-f]{32}", made)
    r = http.get("/nope", headers={"X-Request-Id": "err-7"})  # errors carry it too
    assert r.status_code == 404 and r.headers["x-request-id"] == "err-7"
    assert re.fullmatch(r"[0-9a-f]{32}", http.get("/health").headers["x-request-id"])


def test_one_access_line_per_request(idle: RunningServer, http: httpx.Client) -> None:
    server = idle
    secret = "a-prompt-that-must-not-be-logged-5150"
    ids = {f"acc-{i}" for i in range(5)}
    http.post("/v1/completions", json={"model": server.model, "prompt": secret, "max_tokens": 3},
              headers={"X-Request-Id": "acc-0"})  # fmt: skip
    chat = {"model": server.model, "messages": [{"role": "user", "content": secret}], "max_tokens": 3}
    with http.stream("POST", "/v1/chat/completions", json={**chat, "stream": True},
                     headers={"X-Request-Id": "acc-1"}) as r:  # fmt: skip
        list(r.iter_lines())
    http.post("/v1/completions", json={"model": server.model}, headers={"X-Request-Id": "acc-2"})  # 400
    http.get("/v1/models", headers={"X-Request-Id": "acc-3"})
    http.get("/missing", headers={"X-Request-Id": "acc-4"})
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        lines = [a for a in access_lines(server.log()) if a.get("request_id") in ids]
        if len(lines) >= len(ids):
            break
        time.sleep(0.05)
    by_id = {a["request_id"]: a for a in lines}
    assert len(lines) == len(by_id) == len(ids), lines  # exactly one each
    for rid in ("acc-0", "acc-1"):
        line = by_id[rid]
        assert line["status"] == "200" and line["outcome"] == "finished", line
        assert int(line["prompt_tokens"]) > 0 and int(line["completion_tokens"]) > 0
        assert float(line["ttft_ms"]) >= 0 and float(line["total_ms"]) >= float(line["ttft_ms"])
    assert by_id["acc-0"]["route"] == "/v1/completions" and by_id["acc-1"]["route"] == "/v1/chat/completions"
    assert by_id["acc-2"]["status"] == "400" and "outcome" not in by_id["acc-2"]
    assert by_id["acc-3"]["route"] == "/v1/models" and by_id["acc-4"]["route"] == "unmatched"
    assert secret not in server.log()


@pytest.fixture
def two_apps(tiny_checkpoint: Path) -> Iterator[list[TestClient]]:
    """Two in-process apps over two real engines: their metrics must never mix."""

    def app(*flags: str) -> Any:
        settings = parse_settings(["--model", str(tiny_checkpoint), "--api-key", KEY, *flags], env={})
        return create_app(settings, AsyncEngine(settings.engine_config()))

    with TestClient(app()) as first, TestClient(app("--metrics-without-auth")) as second:
        yield [first, second]


def test_metrics_need_the_key_unless_told_otherwise(two_apps: list[TestClient]) -> None:
    locked, open_ = two_apps
    assert locked.get("/metrics").status_code == 401
    assert locked.get("/metrics", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    r = open_.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")


def test_each_app_has_its_own_registry_and_gauges_read_stats_at_scrape(two_apps: list[TestClient]) -> None:
    first, second = two_apps
    auth = {"Authorization": f"Bearer {KEY}"}
    for _ in range(3):
        first.get("/health")
    model = first.get("/v1/models", headers=auth).json()["data"][0]["id"]
    body = {"model": model, "prompt": "def f():", "max_tokens": 4, "ignore_eos": True}
    assert first.post("/v1/completions", json=body, headers=auth).status_code == 200
    texts = [first.get("/metrics", headers=auth).text, second.get("/metrics", headers=auth).text]
    assert 'tinyserve_http_responses_total{route="/health",status="200"} 3.0' in texts[0]
    assert 'route="/health"' not in texts[1]
    assert "tinyserve_generation_tokens_total 4.0" in texts[0]
    assert "tinyserve_generation_tokens_total 4.0" not in texts[1]
    for client, text in zip(two_apps, texts, strict=True):
        stats = client.get("/stats", headers=auth).json()  # idle now: gauges equal the engine's figures
        assert f"tinyserve_num_requests_running {float(stats['running'])}" in text
        assert f"tinyserve_num_requests_waiting {float(stats['waiting'])}" in text
        assert "tinyserve_kv_cache_usage_perc 0.0" in text
    assert not any("_created" in text for text in texts)
