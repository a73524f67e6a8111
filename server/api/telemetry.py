"""The HTTP edge's telemetry: request ids, one access line per request, HTTP counters, and /metrics.

`TelemetryMiddleware` is the outermost middleware (pure ASGI, so streams and disconnects pass through
untouched): it sees every response, the 401s of the auth check and the 413s of the body limit
included, and writes the request's one access line when the response has ended, streams included.
Routes add what only they know (tokens, timings, outcome) to the request's `RequestRecord`.

The access line is logfmt (`key=value`, values quoted as JSON strings when they need it) on the
`server.access` logger. Prompts and outputs appear only under --log-prompts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request, Response
from starlette.datastructures import MutableHeaders
from starlette.routing import BaseRoute, Match, Router
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.metrics import Metrics

access_log = logging.getLogger("server.access")
router = APIRouter()

REQUEST_ID_HEADER = "x-request-id"
REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,64}")
"""A client's X-Request-Id is kept if it matches (bounded, safe in logs and ids); otherwise we make one."""
UNMATCHED = "unmatched"
"""The route label of every path no route matches: raw paths would make the label unbounded."""
_STATE_KEY = "telemetry"
_BARE = re.compile(r"[A-Za-z0-9_.:/@+{}-]+")


def request_id_from(value: bytes | None) -> str | None:
    """The client's request id if it is acceptable, else None."""
    if value is None:
        return None
    text = value.decode("latin-1")
    return text if REQUEST_ID.fullmatch(text) else None


@dataclass
class RequestRecord:
    """One request's telemetry, filled in by the middleware and the route that served it."""

    request_id: str | None
    """The client's (validated) X-Request-Id; None until someone needs an id and one is made."""
    start: float = field(default_factory=time.monotonic)
    status: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    """What the route adds to the access line, in order (outcome, tokens, timings, ...)."""

    def id(self, prefix: str = "") -> str:
        """The request id, made now if the client sent none (as `prefix-<hex>`, the response's id)."""
        if self.request_id is None:
            self.request_id = f"{prefix}-{uuid.uuid4().hex}" if prefix else uuid.uuid4().hex
        return self.request_id

    def response_id(self, prefix: str) -> str:
        """The id of a completion object: `prefix-<request id>`, unless the id was made with that prefix."""
        if self.request_id is None:
            return self.id(prefix)
        return f"{prefix}-{self.request_id}"


def record_of(request: Request) -> RequestRecord:
    return request.scope["state"][_STATE_KEY]


def route_template(scope: Scope, routes: list[BaseRoute]) -> str:
    """The matched route's path template ("/v1/models/{model:path}"), or UNMATCHED.

    The router leaves its match in the scope; requests answered before routing (401, 413) are matched
    here, against the same routes.
    """
    route = scope.get("route")
    if route is None:
        route = next((r for r in routes if r.matches(scope)[0] is not Match.NONE), None)
    path = getattr(route, "path", None)
    return path if isinstance(path, str) and path else UNMATCHED


def logfmt(fields: dict[str, Any]) -> str:
    """`key=value ...`; None values are left out, floats get 3 decimals, the rest is quoted if needed."""
    parts = []
    for key, value in fields.items():
        if value is None:
            continue
        if isinstance(value, float):
            text = f"{value:.3f}"
        elif isinstance(value, str | int):
            text = str(value)
        else:
            text = json.dumps(value, ensure_ascii=False)
        # Quoted as ASCII JSON: no newline or other line separator from a prompt can split the line.
        parts.append(f"{key}={text if _BARE.fullmatch(text) else json.dumps(text)}")
    return " ".join(parts)


class TelemetryMiddleware:
    """Request id in, X-Request-Id out, then one access line and one HTTP counter per request."""

    def __init__(self, app: ASGIApp, metrics: Metrics, router: Router) -> None:
        self.app = app
        self.metrics = metrics
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        header = next((v for k, v in scope["headers"] if k == REQUEST_ID_HEADER.encode()), None)
        record = RequestRecord(request_id_from(header))
        scope.setdefault("state", {})[_STATE_KEY] = record

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                record.status = message["status"]
                message.setdefault("headers", [])
                MutableHeaders(scope=message)[REQUEST_ID_HEADER] = record.id()
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except asyncio.CancelledError:
            record.status = record.status or 499  # the server cancelled us: nobody got an answer
            raise
        except Exception:
            record.status = record.status or 500  # ServerErrorMiddleware, outside us, answers 500
            raise
        finally:
            self._finish(scope, record)

    def _finish(self, scope: Scope, record: RequestRecord) -> None:
        route = route_template(scope, self.router.routes)
        status = record.status or 499  # no response started: the client left first
        self.metrics.http_response(route, status)
        line = {
            "request_id": record.id(),
            "method": scope["method"],
            "route": route,
            "status": status,
            **record.fields,
            "total_ms": 1000 * (time.monotonic() - record.start),
        }
        access_log.log(logging.WARNING if status >= 500 else logging.INFO, "%s", logfmt(line))


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """Prometheus' text format (behind the API key unless --metrics-without-auth)."""
    body, content_type = request.app.state.server.metrics.exposition()
    return Response(body, media_type=content_type)
