"""Request body size and time limits, enforced before anything parses the body.

A declared Content-Length over the limit is refused unread; a chunked body is buffered only up to the
limit. The whole body must arrive within `body_timeout` seconds, or the request is answered 408 and
its connection closed: a client that declares more than it sends cannot hold a connection for ever.
The buffered body is then replayed to the app, and later `receive()` calls go to the server so the
app still learns of a client disconnect. (Header size and timing are `server/api/protocol.py`'s.)
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.api.errors import APIError


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_body_bytes: int, body_timeout: float) -> None:
        self.app = app
        self.limit = max_body_bytes
        self.timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = next((v for k, v in scope["headers"] if k == b"content-length"), None)
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            if not declared.isdigit():
                await APIError(400, "invalid Content-Length header").response()(scope, receive, send)
            else:
                await _too_large(self.limit).response()(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.timeout):
                body = await self._read(receive)
        except TimeoutError:
            body = APIError(
                408, f"the request body did not arrive within {self.timeout:g} s", code="request_timeout",
                headers={"Connection": "close"},
            )  # fmt: skip
        if isinstance(body, APIError):
            await body.response()(scope, receive, send)
            return
        if body is None:  # the client left before sending it all
            return
        chunks = body
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> list[bytes] | APIError | None:
        """The body's chunks; an error if it is too large; None if the client left first."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return _too_large(self.limit)
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks
