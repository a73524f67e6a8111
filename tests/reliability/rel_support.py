"""Small tools for the reliability tests: a raw asyncio HTTP/1.1 client and a load generator.

The raw client costs a fraction of httpx per request, so a test can drive hundreds of concurrent
connections from one core, cut a response after any number of bytes, or stop reading altogether.
It only ever talks to 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.harness import RunningServer

HOST = "127.0.0.1"


def port_of(url: str) -> int:
    parts = urlsplit(url)
    assert parts.hostname == HOST, f"loopback targets only, got {url}"
    assert parts.port is not None
    return parts.port


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    elapsed: float = 0.0
    """Seconds from the request's last byte sent to the status line received."""
    events: list[Any] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


def build_request(
    method: str,
    path: str,
    port: int,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    content_type: str | None = "application/json",
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}:{port}", "Connection: close"]
    if body is not None:
        if content_type is not None:
            lines.append(f"Content-Type: {content_type}")
        lines.append(f"Content-Length: {len(body)}")
    for k, v in (headers or {}).items():
        lines.append(f"{k}: {v}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def json_body(payload: Any) -> bytes:
    return json.dumps(payload, ensure_ascii=False).encode()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return status, headers


async def iter_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    """The body's bytes as they arrive (chunked or Content-Length or until close)."""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readuntil(b"\r\n")
            size = int(size_line.split(b";")[0].strip(), 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        remaining = int(headers["content-length"])
        while remaining:
            data = await reader.read(min(remaining, 65536))
            if not data:
                raise ConnectionError("connection closed before the body ended")
            remaining -= len(data)
            yield data
    else:
        while data := await reader.read(65536):
            yield data


async def iter_sse(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[Any]:
    """The `data:` payloads of an SSE body, parsed; `[DONE]` as the string."""
    buffer = b""
    async for chunk in iter_body(reader, headers):
        buffer += chunk
        while b"\n\n" in buffer:
            event, buffer = buffer.split(b"\n\n", 1)
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    data = line[6:].decode()
                    yield data if data == "[DONE]" else json.loads(data)


async def open_connection(
    port: int, rcvbuf: int | None = None
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if rcvbuf is None:
        return await asyncio.open_connection(HOST, port)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: it sets the window
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, (HOST, port))
    return await asyncio.open_connection(sock=sock, limit=1 << 16)


async def request(
    port: int,
    method: str,
    path: str,
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    content_type: str | None = "application/json",
    timeout: float = 60.0,
) -> RawResponse:
    """One complete request; SSE bodies are parsed into `events`."""

    async def go() -> RawResponse:
        reader, writer = await open_connection(port)
        try:
            writer.write(build_request(method, path, port, body, headers, content_type))
            await writer.drain()
            sent = time.perf_counter()
            status, resp_headers = await read_head(reader)
            elapsed = time.perf_counter() - sent
            out = RawResponse(status, resp_headers, elapsed=elapsed)
            if resp_headers.get("content-type", "").startswith("text/event-stream"):
                out.events = [e async for e in iter_sse(reader, resp_headers)]
            else:
                out.body = b"".join([c async for c in iter_body(reader, resp_headers)])
            return out
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)


def stream_text(events: list[Any], chat: bool = False) -> dict[int, str]:
    """Each choice's concatenated text from parsed SSE chunks."""
    texts: dict[int, str] = {}
    for event in events:
        if not isinstance(event, dict):
            continue
        for choice in event.get("choices", []):
            piece = (choice.get("delta") or {}).get("content", "") if chat else choice.get("text", "")
            texts[choice["index"]] = texts.get(choice["index"], "") + (piece or "")
    return texts


# Shutdown under load: streams in flight when SIGTERM comes (test_rel_shutdown, tests/deploy).


def start_streams(
    server: RunningServer, tokens: int, results: list[Any], count: int, timeout: float
) -> threading.Thread:
    """`count` streams of `tokens` tokens each (completions and chat, alternately), read to the end in a
    background thread; each result is (index, response or None if the connection was cut,
    time.monotonic() once the response had been read to its end)."""
    port = port_of(server.url)

    async def all_streams() -> None:
        async def one(i: int) -> None:
            path = "/v1/chat/completions" if i % 2 else "/v1/completions"
            body: dict[str, Any] = {
                "model": server.model,
                "max_tokens": tokens,
                "ignore_eos": True,
                "stream": True,
            }
            if i % 2:
                body["messages"] = [{"role": "user", "content": f"drain {i}"}]
            else:
                body["prompt"] = f"drain {i}"
            r: RawResponse | None
            try:
                r = await request(port, "POST", path, json_body(body), timeout=timeout)
            except (asyncio.IncompleteReadError, ConnectionError):
                r = None  # the connection was cut
            results.append((i, r, time.monotonic()))

        await asyncio.gather(*(one(i) for i in range(count)))

    thread = threading.Thread(target=lambda: asyncio.run(all_streams()), daemon=True)
    thread.start()
    return thread


def wait_for_load(server: RunningServer, count: int) -> None:
    deadline = time.monotonic() + 60
    with server.client() as client:
        while time.monotonic() < deadline:
            s = client.get("/stats").json()
            if s["running"] + s["waiting"] >= count and s["running"] >= 1:
                return
            time.sleep(0.02)
    raise AssertionError("the streams never started")


def wait_until_not_ready(url: str) -> None:
    """The signal is handled on the event loop: /ready turns 503 soon after it, not at once."""
    deadline = time.monotonic() + 30
    while httpx.get(f"{url}/ready", timeout=10).status_code != 503:
        assert time.monotonic() < deadline, "/ready never turned 503 after SIGTERM"
        time.sleep(0.01)


def completed(r: RawResponse | None) -> bool:
    """A stream that ended cleanly: [DONE] last and no error event."""
    return (
        r is not None
        and bool(r.events)
        and r.events[-1] == "[DONE]"
        and not any(isinstance(e, dict) and "error" in e for e in r.events)
    )


async def _heavy_load(port: int, model: str, seconds: float, big_prompt_clients: int, streams: int) -> None:
    """Streams that keep the running batch full, and clients posting megabyte prompts back to back."""
    deadline = time.monotonic() + seconds
    counts: dict[str, Any] = {"streams": 0, "big_prompts": 0, "big_statuses": set(), "big_seconds": []}
    big = json_body(
        {"model": model, "prompt": "héllo wörld 😀 你好 def f(x): return x\n" * 25_000, "max_tokens": 4}
    )
    stream = json_body({"model": model, "prompt": "load", "n": 4, "max_tokens": 400, "ignore_eos": True,
                        "stream": True})  # fmt: skip

    async def streamer() -> None:
        while time.monotonic() < deadline:
            await asyncio.wait_for(request(port, "POST", "/v1/completions", stream), seconds + 60)
            counts["streams"] += 1

    async def big_poster() -> None:
        while time.monotonic() < deadline:
            r = await asyncio.wait_for(request(port, "POST", "/v1/completions", big), seconds + 60)
            counts["big_prompts"] += 1
            counts["big_statuses"].add(r.status)
            counts["big_seconds"].append(r.elapsed)

    tasks = [streamer() for _ in range(streams)] + [big_poster() for _ in range(big_prompt_clients)]
    await asyncio.gather(*tasks)
    print(json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in counts.items()}), flush=True)


# A load generator in its own process: python -m tests.reliability.rel_support PORT MODEL SECONDS BIG
if __name__ == "__main__":
    _port, _model, _seconds, _big = int(sys.argv[1]), sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    asyncio.run(_heavy_load(_port, _model, _seconds, big_prompt_clients=_big, streams=16))
