"""Optional API key: `Authorization: Bearer KEY` on every route but an explicit allow-list.

A pure ASGI middleware (not BaseHTTPMiddleware) so streaming responses and client disconnects pass
through untouched. The scheme is case-insensitive (RFC 7235: `bearer KEY` works); the key is compared
in constant time, so response timing does not leak it. A request with two Authorization headers is
refused (400) rather than judged by whichever a proxy or parser happens to read first.
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
        self.key = api_key.encode()
        self.open_paths = OPEN_PATHS | ({"/metrics"} if metrics_without_auth else set())

    def is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(OPEN_PREFIXES)

    def error(self, values: list[bytes]) -> APIError | None:
        """Why these Authorization header values do not grant access; None when they do."""
        if len(values) > 1:
            return APIError(
                400, f"{len(values)} Authorization headers: send exactly one",
                param="Authorization", code="invalid_authorization",
            )  # fmt: skip
        scheme, _, credentials = (values[0] if values else b"").strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(credentials.strip(), self.key):
            return None
        return APIError(
            401, f"{'invalid' if values else 'missing'} API key: send 'Authorization: Bearer <key>'",
            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"},
        )  # fmt: skip

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        error = self.error([v for k, v in scope["headers"] if k == b"authorization"])
        if error is not None:
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)
