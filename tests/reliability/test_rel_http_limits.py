"""What a hostile client does below the routes: huge headers, headers or bodies that never finish, and
more connections than the server allows. Each gets an answer in OpenAI's error shape that the client
can read (431, 408, 503, 400), slow connections are closed, /health stays fast, and honest slow
clients within the limits are served. Raw sockets on 127.0.0.1; every loop bounded in count and time.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager

import httpx
import pytest

from bench.harness import RunningServer

KEY = "sk-limits-0123456789"
HEADER_TIMEOUT = 1.5
BODY_TIMEOUT = 2.5
MAX_CONNECTIONS = 40
MAX_HEADER = 8 << 10
MARGIN = 10.0
"""Seconds past a timeout within which its answer must come: wide, for a loaded machine."""


@pytest.fixture(scope="module")
def limited(start_server: Callable[..., RunningServer]) -> RunningServer:
    return start_server(
        "--api-key", KEY, "--header-timeout", str(HEADER_TIMEOUT), "--body-timeout", str(BODY_TIMEOUT),
        "--max-connections", str(MAX_CONNECTIONS), "--max-header-bytes", str(MAX_HEADER),
    )  # fmt: skip


def address(server: RunningServer) -> tuple[str, int]:
    host, port = server.url.removeprefix("http://").split(":")
    return host, int(port)


@contextmanager
def connection(server: RunningServer) -> Iterator[socket.socket]:
    with closing(socket.create_connection(address(server), timeout=MARGIN + BODY_TIMEOUT)) as sock:
        yield sock


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP response (status, headers, body) read to its Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(headers["content-length"]):
        chunk = sock.recv(65536)
        assert chunk, "connection closed inside the body"
        body += chunk
    return int(lines[0].split()[1]), headers, body


def openai_error(body: bytes, code: str) -> dict[str, str]:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == code, error
    return error


def assert_closed(sock: socket.socket) -> None:
    """The server closes the connection (recv sees EOF or a reset) within the margin."""
    sock.settimeout(MARGIN)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


def health_is_fast(server: RunningServer) -> None:
    start = time.monotonic()
    with httpx.Client(base_url=server.url, timeout=MARGIN, trust_env=False) as client:
        assert client.get("/health").status_code == 200
    assert time.monotonic() - start < MARGIN


@pytest.mark.parametrize(
    ("name", "size"), [("Authorization", 1 << 20), ("X-Padding", 100 << 10), ("X-Padding", MAX_HEADER + 1)]
)
def test_oversized_headers_get_a_readable_431(limited: RunningServer, name: str, size: int) -> None:
    value = ("Bearer " if name == "Authorization" else "") + "a" * size
    with limited.client() as client:
        r = client.get("/v1/models", headers={name: value})
    assert r.status_code == 431
    openai_error(r.content, "headers_too_large")
    # The same through a raw socket that sends it all before reading, as most clients do.
    with connection(limited) as sock:
        sock.sendall(f"GET /v1/models HTTP/1.1\r\nHost: x\r\n{name}: {value}\r\n\r\n".encode())
        status, _, body = read_response(sock)
        assert status == 431
        openai_error(body, "headers_too_large")
    # A long URL is a large request line: the same answer.
    with limited.client() as client:
        assert client.get("/v1/models?q=" + "x" * (MAX_HEADER + 1)).status_code == 431
        ok = client.get(
            "/v1/models", headers={"Authorization": f"Bearer {KEY}", "X-Padding": "b" * (MAX_HEADER // 2)}
        )
        assert ok.status_code == 200


def test_malformed_requests_get_a_400_in_openai_shape(limited: RunningServer) -> None:
    for junk in (b"NOT HTTP AT ALL\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n"):
        with connection(limited) as sock:
            sock.sendall(junk)
            status, _, body = read_response(sock)
            assert status == 400
            openai_error(body, "invalid_http_request")


def test_headers_that_never_finish_get_a_408_and_are_closed_while_health_stays_fast(
    limited: RunningServer,
) -> None:
    count = MAX_CONNECTIONS // 2
    socks = [
        socket.create_connection(address(limited), timeout=MARGIN + HEADER_TIMEOUT) for _ in range(count)
    ]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n" if i % 2 else b"G")
        health_is_fast(limited)
        for sock in socks:
            status, headers, body = read_response(sock)
            assert status == 408 and headers["connection"] == "close"
            openai_error(body, "request_timeout")
            assert_closed(sock)
    finally:
        for sock in socks:
            sock.close()
    health_is_fast(limited)


def test_a_body_that_never_finishes_gets_a_408(limited: RunningServer) -> None:
    with connection(limited) as sock:
        start = time.monotonic()
        sock.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"model\": "
        )  # fmt: skip
        status, _, body = read_response(sock)
        assert status == 408 and time.monotonic() - start >= BODY_TIMEOUT * 0.9
        openai_error(body, "request_timeout")
        assert_closed(sock)
    health_is_fast(limited)


def test_slow_but_honest_clients_are_served(limited: RunningServer) -> None:
    body = json.dumps({"model": limited.model, "prompt": "Hello", "max_tokens": 2}).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode()
    with connection(limited) as sock:
        for piece in (head[:10], head[10:40], head[40:]):  # headers in pieces, within the header timeout
            sock.sendall(piece)
            time.sleep(HEADER_TIMEOUT / 6)
        for i in range(0, len(body), len(body) // 4 + 1):  # the body in pieces, within the body timeout
            sock.sendall(body[i : i + len(body) // 4 + 1])
            time.sleep(BODY_TIMEOUT / 8)
        status, _, answer = read_response(sock)
        assert status == 200, answer
        assert json.loads(answer)["usage"]["completion_tokens"] == 2
        # The connection is kept alive: a second request on it is served too (its header timer restarts).
        time.sleep(HEADER_TIMEOUT / 2)
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(sock)[0] == 200


def test_connections_beyond_the_limit_get_a_503_until_the_slow_ones_are_gone(limited: RunningServer) -> None:
    count = MAX_CONNECTIONS + 5
    socks = [
        socket.create_connection(address(limited), timeout=MARGIN + HEADER_TIMEOUT) for _ in range(count)
    ]
    try:
        for sock in socks:
            sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers that never finish
        statuses = []
        for sock in socks:
            status, headers, body = read_response(sock)
            statuses.append(status)
            if status == 503:
                assert headers["retry-after"] == "1"
                openai_error(body, "too_many_connections")
        # Those past the limit are refused at once; the others time out (408), then all are closed.
        assert statuses.count(503) >= count - MAX_CONNECTIONS
        assert statuses.count(503) + statuses.count(408) == count
    finally:
        for sock in socks:
            sock.close()
    deadline = time.monotonic() + MARGIN
    while True:
        with httpx.Client(base_url=limited.url, timeout=MARGIN, trust_env=False) as client:
            if client.get("/health").status_code == 200:
                break
        assert time.monotonic() < deadline, "the server did not recover its connections"
        time.sleep(0.2)
