"""OpenAI's error shape, and the handlers that put every failure into it.

Clients (the openai SDK included) read `{"error": {"message", "type", "param", "code"}}`; whatever
goes wrong (validation, an unknown route, the engine refusing work) leaves the server in that shape
with the right status, never as FastAPI's default 422 or a bare 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.outputs import EngineError, EngineOverloaded, EngineStopped
from server.engine.params import ParamError

log = logging.getLogger("server.api")

RETRY_AFTER_SECONDS = 1
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable_error",
}


class APIError(Exception):
    """An error that becomes one OpenAI-shaped response."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        # Messages and params may echo client text; a lone surrogate in it would make the response
        # body unencodable (a 500 instead of this error), so it is shown escaped.
        self.message = _printable(message)
        self.param = None if param is None else _printable(param)
        self.code = code
        self.type = type or _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _printable(text: str) -> str:
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def from_engine_exception(exc: BaseException) -> APIError:
    """The API error for an exception out of `engine.submit` or an engine stream."""
    if isinstance(exc, ParamError):
        return APIError(400, str(exc), param=exc.param, code="invalid_value")
    if isinstance(exc, EngineOverloaded):
        return APIError(
            503,
            str(exc) or "the server is overloaded; retry later",
            code="overloaded",
            headers={"Retry-After": str(RETRY_AFTER_SECONDS)},
        )
    if isinstance(exc, EngineStopped):
        return APIError(503, str(exc) or "the server is shutting down", code="shutting_down")
    if isinstance(exc, EngineError):
        return APIError(500, f"generation failed: {exc}", code="engine_error")
    return APIError(500, "internal server error", code="internal_error")


def _param_of(loc: tuple[Any, ...]) -> str | None:
    """The top-level body field an error is about, as OpenAI's `param` names it."""
    if loc and loc[0] in ("body", "query", "path"):
        loc = loc[1:]
    return loc[0] if loc and isinstance(loc[0], str) else None


def _validation_message(err: dict[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    if kind == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return (
            f"the request body is not valid JSON ({detail})"
            if detail
            else "the request body is not valid JSON"
        )
    fields = (
        [str(p) for p in loc[1:] if isinstance(p, str | int)]
        if loc and loc[0] == "body"
        else list(map(str, loc))
    )
    where = ".".join(fields)
    if kind == "extra_forbidden":
        return f"unrecognized request argument: {where}"
    if kind == "missing":
        return f"missing required parameter: {where}" if where else "the request body is required"
    if not where and kind in ("model_attributes_type", "dict_type", "model_type"):
        return "the request body must be a JSON object (Content-Type: application/json)"
    return f"{where}: {err.get('msg', 'invalid value')}" if where else str(err.get("msg", "invalid request"))


def validation_error(exc: RequestValidationError) -> APIError:
    errors = list(exc.errors())
    # `json_invalid` and `missing` are the most telling; otherwise the first error reported.
    err = next((e for e in errors if e.get("type") == "json_invalid"), errors[0] if errors else {})
    param = None if err.get("type") == "json_invalid" else _param_of(tuple(err.get("loc", ())))
    return APIError(400, _validation_message(err), param=param, code="invalid_value")


def install(app: FastAPI) -> None:
    """Route every exception type the app can raise into the OpenAI error shape."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return validation_error(exc).response()

    @app.exception_handler(ParamError)
    async def _param(request: Request, exc: ParamError) -> JSONResponse:
        return from_engine_exception(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
            error = APIError(404, message, code="unknown_url")
        elif exc.status_code == 405:
            error = APIError(
                405,
                f"method {request.method} is not allowed on {request.url.path}",
                code="method_not_allowed",
            )
        else:
            error = APIError(exc.status_code, str(exc.detail))
        merged = dict(exc.headers or {})
        merged.update(error.headers or {})
        error.headers = merged or None
        return error.response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, EngineOverloaded | EngineStopped | EngineError):
            return from_engine_exception(exc).response()
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return APIError(500, "internal server error", code="internal_error").response()
