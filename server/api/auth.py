"""Optional API key: `Authorization: Bearer KEY` on every route but an explicit allow-list.

A pure ASGI middleware (not BaseHTTPMiddleware) so streaming responses and client disconnects pass
through untouched. The key is compared in constant time, so response timing does not leak it.
"""

from __future__ import annotations

import hmac

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import APIError

OPEN_PATHS = frozenset({"/health", "/ready", "/"})
"""The probes stay open: a kubelet's or load balancer's health check cannot carry a secret."""
OPEN_PREFIXES = ("/static/",)


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_key: str, metrics_without_auth: bool = False) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()
        self.open_paths = OPEN_PATHS | ({"/metrics"} if metrics_without_auth else set())

    def is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(OPEN_PREFIXES)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        given = next((v for k, v in scope["headers"] if k == b"authorization"), b"")
        if not hmac.compare_digest(given, self.expected):
            message = "missing API key" if not given else "invalid API key"
            error = APIError(
                401,
                f"{message}: send 'Authorization: Bearer <key>'",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
