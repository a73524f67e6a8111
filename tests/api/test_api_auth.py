"""API key (constant-time bearer check, explicit open routes) and CORS (off by default)."""

from __future__ import annotations

from collections.abc import Callable

import httpx
import openai
import pytest

from bench.harness import RunningServer

KEY = "sk-test-1234567890"
ORIGIN = "http://chat.example"


@pytest.fixture(scope="module")
def locked(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server("--api-key", KEY, "--cors-origins", ORIGIN, "--metrics-without-auth")


def _is_401(r: httpx.Response) -> None:
    assert r.status_code == 401, r.text
    error = r.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == "invalid_api_key"
    assert set(error) == {"message", "type", "param", "code"}


def test_routes_need_the_key(locked: RunningServer) -> None:
    body = {"model": locked.model, "prompt": "x", "max_tokens": 2}
    with locked.client() as client:
        for headers in (
            {},
            {"Authorization": "Bearer wrong"},
            {"Authorization": KEY},
            {"Authorization": f"Bearer {KEY}x"},
        ):
            _is_401(client.post("/v1/completions", json=body, headers=headers))
        for path in ("/v1/models", "/stats", "/docs"):
            _is_401(client.get(path))
        _is_401(client.post("/v1/completions", content=b"x" * (20 << 20)))  # refused before the body is read
        good = {"Authorization": f"Bearer {KEY}"}
        assert client.post("/v1/completions", json=body, headers=good).status_code == 200
        assert client.get("/v1/models", headers=good).status_code == 200
        assert client.get("/health").status_code == 200  # liveness and readiness stay open (probes)
        assert client.get("/ready").json()["status"] == "ready"
        assert client.get("/metrics").status_code != 401  # open by --metrics-without-auth


def test_sdk_with_and_without_the_key(locked: RunningServer) -> None:
    client = openai.OpenAI(base_url=f"{locked.url}/v1", api_key=KEY, max_retries=0)
    assert client.completions.create(model=locked.model, prompt="hi", max_tokens=2).choices
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{locked.url}/v1", api_key="nope", max_retries=0).models.list()


def test_cors_allows_the_configured_origin_and_the_authorization_header(locked: RunningServer) -> None:
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with locked.client() as client:
        r = client.options("/v1/chat/completions", headers=preflight)
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        assert "authorization" in r.headers["access-control-allow-headers"].lower()
        r = client.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert r.headers.get("access-control-allow-origin") != "http://evil.example"
        r = client.get("/v1/models", headers={"Origin": ORIGIN})  # a 401 still carries CORS headers
        assert r.status_code == 401 and r.headers["access-control-allow-origin"] == ORIGIN


def test_no_cors_and_no_key_by_default(http: httpx.Client) -> None:
    r = http.get("/v1/models", headers={"Origin": ORIGIN})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_the_scheme_is_case_insensitive(locked: RunningServer) -> None:
    with locked.client() as client:
        for scheme in ("bearer", "BEARER", "Bearer", "bEaReR"):
            for value in (f"{scheme} {KEY}", f"{scheme}   {KEY}"):
                r = client.get("/v1/models", headers={"Authorization": value})
                assert r.status_code == 200, (value, r.text)
        for value in (f"Basic {KEY}", f"bearer{KEY}", f"bearer {KEY.upper()}", "bearer", f"{KEY} bearer"):
            _is_401(client.get("/v1/models", headers={"Authorization": value}))


def test_two_authorization_headers_are_refused(locked: RunningServer) -> None:
    good, bad = f"Bearer {KEY}", "Bearer wrong"
    with locked.client() as client:
        for pair in ((good, good), (good, bad), (bad, good), (good, "")):
            r = client.get("/v1/models", headers=[("Authorization", pair[0]), ("Authorization", pair[1])])
            assert r.status_code == 400, (pair, r.text)
            error = r.json()["error"]
            assert error["param"] == "Authorization" and error["code"] == "invalid_authorization"
        assert (
            client.get("/health", headers=[("Authorization", good), ("Authorization", bad)]).status_code
            == 200
        )
