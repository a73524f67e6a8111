"""The browser chat page: `/` and `/static/*`, read from the installed package (no build step).

Only the files shipped in `server/static` are served, looked up by exact name, so no request path can
reach another file. The page gets a strict Content-Security-Policy: even if model text were ever put into
the DOM as HTML, no inline script or event handler in it could run.
"""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter, Request
from fastapi.responses import Response

from server.api.errors import APIError
from server.api.state import state_of

router = APIRouter(include_in_schema=False)

STATIC = resources.files("server") / "static"
MEDIA_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".png": "image/png",
    ".svg": "image/svg+xml",
}
# 'self' only: the page talks to the server that served it; the favicon is an inline data: URL.
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    # Revalidate each load, so a server upgrade is never paired with a stale script.
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}


def _file(name: str) -> Response:
    suffix = name[name.rfind(".") :] if "." in name else ""
    if "/" in name or "\\" in name or name.startswith(".") or suffix not in MEDIA_TYPES:
        raise APIError(404, f"no static file '{name}'", code="not_found")
    path = STATIC / name
    if not path.is_file():
        raise APIError(404, f"no static file '{name}'", code="not_found")
    headers = dict(HEADERS)
    if suffix == ".html":
        headers["Content-Security-Policy"] = CSP
    return Response(path.read_bytes(), media_type=MEDIA_TYPES[suffix], headers=headers)


# Plain `def`: FastAPI runs these in its thread pool, so the file read never blocks the event loop.
@router.get("/")
def index() -> Response:
    return _file("index.html")


@router.get("/static/{name}")
def static(name: str) -> Response:
    return _file(name)


@router.get("/ui/config")
async def config(request: Request) -> dict[str, str]:
    """What the page needs to know about this server: the mode it opens in (behind the key, as the API)."""
    mode, reason = state_of(request).ui_mode()
    return {"mode": mode, "mode_reason": reason}
