"""--metrics-port: a second listener that serves /metrics alone, without the API key.

Prometheus then needs no key, and a firewall or a Kubernetes NetworkPolicy can admit the monitoring
system to this port and clients to the API port, which a path on one port cannot tell apart. Requests
are told apart by the local port they arrived on; on the API port /metrics stays as it was.
"""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import APIError
from server.metrics import Metrics


class MetricsPortMiddleware:
    def __init__(self, app: ASGIApp, port: int, metrics: Metrics) -> None:
        self.app = app
        self.port = port
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        server = scope.get("server") or (None, None)
        if scope["type"] != "http" or server[1] != self.port:
            await self.app(scope, receive, send)
            return
        if scope["path"] != "/metrics":
            message = f"only /metrics is served on the metrics port {self.port}"
            await APIError(404, message, code="not_found").response()(scope, receive, send)
        elif scope["method"] not in ("GET", "HEAD"):
            await APIError(405, "method not allowed: use GET").response()(scope, receive, send)
        else:
            body, content_type = self.metrics.exposition()
            await Response(body, media_type=content_type)(scope, receive, send)
