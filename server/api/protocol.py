"""uvicorn's HTTP/1.1 protocol (h11) with the limits a hostile client tests before any route runs.

- a request line and headers larger than --max-header-bytes: 431 (h11 stops one still arriving at
  that size, where uvicorn would answer a plain-text 400; one that arrived whole is measured here);
- headers that do not arrive within --header-timeout seconds of the request's first byte (or of
  the connection opening): 408, so a client trickling bytes cannot hold a connection for ever;
- more than --max-connections open connections: 503 with Retry-After, at once, for each extra one;
- any other malformed request: 400.
Each is answered in OpenAI's error shape, then the connection lingers: it keeps reading (and
dropping) what the client still sends until the client pauses or a few seconds pass, then closes.
Closing with unread bytes in the socket would reset the connection, and a client still sending a
1 MiB header would never read the answer. Body read timeouts are the ASGI layer's (`server/api/limits.py`).
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

import h11
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.api.errors import APIError

LINGER_SECONDS = 5.0
"""The longest a refused connection keeps reading (and dropping) the client's bytes before it closes."""
LINGER_IDLE_SECONDS = 0.5
"""A refused connection closes once the client has sent nothing for this long."""


@dataclass(frozen=True)
class ConnectionLimits:
    max_header_bytes: int
    header_timeout: float
    max_connections: int

    def uvicorn_options(self) -> dict[str, Any]:
        """The uvicorn.Config arguments that serve HTTP/1.1 with this protocol and these limits."""
        return {
            "http": functools.partial(LimitedH11Protocol, limits=self),
            "h11_max_incomplete_event_size": self.max_header_bytes,
        }


def _head_size(scope: Scope) -> int:
    """The request line and headers' size in bytes, as sent (give or take the HTTP version's spelling)."""
    line = len(scope["method"]) + len(scope["raw_path"]) + len(scope["query_string"]) + 12
    return line + sum(len(name) + len(value) + 4 for name, value in scope["headers"]) + 2


def _headers_too_large(limit: int) -> APIError:
    return APIError(431, f"the request line and headers exceed {limit} bytes", code="headers_too_large")


def _raw_response(error: APIError) -> bytes:
    """The error as raw HTTP/1.1 bytes: written outside h11, which may have no request to answer."""
    body = json.dumps(error.body()).encode()
    head = [f"HTTP/1.1 {error.status} {HTTPStatus(error.status).phrase}", "content-type: application/json"]
    head += [f"{k}: {v}" for k, v in (error.headers or {}).items()]
    head += [f"content-length: {len(body)}", "connection: close", "", ""]
    return "\r\n".join(head).encode("latin-1") + body


class LimitedH11Protocol(H11Protocol):
    """See the module docstring. Built by uvicorn through `functools.partial(..., limits=...)`."""

    def __init__(self, *args: Any, limits: ConnectionLimits, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.limits = limits
        self._header_timer: asyncio.TimerHandle | None = None
        self._refused = False
        self._linger_timer: asyncio.TimerHandle | None = None
        self._linger_until = 0.0
        app = self.app

        async def guarded(scope: Scope, receive: Receive, send: Send) -> None:
            # h11 checks the size of a head still arriving; one that arrived whole in a read is checked here.
            if _head_size(scope) > limits.max_header_bytes:
                await _headers_too_large(limits.max_header_bytes).response()(scope, receive, send)
                return
            await app(scope, receive, send)

        self.app = guarded

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.max_connections:
            self._refuse(
                APIError(
                    503,
                    "the server has too many open connections; retry shortly",
                    code="too_many_connections",
                    headers={"Retry-After": "1"},
                )
            )
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            self._linger()  # the rest of a refused request: read and dropped
            return
        if self._header_timer is None and self.conn.their_state is h11.IDLE:
            self._arm_header_timer()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_header_timer()

    def send_400_response(self, msg: str) -> None:
        """uvicorn calls this from inside its `except h11.RemoteProtocolError`, so that error is at hand."""
        exc = sys.exc_info()[1]
        if getattr(exc, "error_status_hint", 400) == 431:
            error = _headers_too_large(self.limits.max_header_bytes)
        else:
            error = APIError(400, f"invalid HTTP request: {exc or msg}", code="invalid_http_request")
        self._refuse(error)

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.limits.header_timeout, self._headers_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if not self._refused and not self.transport.is_closing():
            seconds = f"{self.limits.header_timeout:g}"
            self._refuse(
                APIError(408, f"the request headers took longer than {seconds} s", code="request_timeout")
            )

    def _refuse(self, error: APIError) -> None:
        """Answer `error`, stop reading requests, and close once the client is done (see `_linger`)."""
        self._refused = True
        self._disarm_header_timer()
        self._unset_keepalive_if_required()
        self.transport.write(_raw_response(error))
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self._linger_until = self.loop.time() + LINGER_SECONDS
        self._linger()

    def _linger(self) -> None:
        """(Re)start the countdown to close: LINGER_IDLE_SECONDS after the client's last bytes, at most
        LINGER_SECONDS after the answer."""
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        delay = min(LINGER_IDLE_SECONDS, self._linger_until - self.loop.time())
        self._linger_timer = self.loop.call_later(max(delay, 0.0), self.transport.close)
