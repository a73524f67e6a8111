"""`python -m server`: flags → settings → engine (weights loaded) → uvicorn on an already-bound socket.

Order matters: the socket is bound first (a port in use fails in milliseconds), the weights are loaded
next, and only then does the socket listen, so a server that cannot serve never accepts a connection.
Startup failures print one line on stderr and exit non-zero.

Shutdown: the first SIGTERM/SIGINT stops admitting work (new requests get 503, /ready says
"draining"), lets running requests finish for --shutdown-grace-seconds, ends the rest with an error
event, then closes the server and exits 0. A second signal exits at once (status 1).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
import threading
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import Any

from server.settings import Settings, parse_settings

log = logging.getLogger("server")

UVICORN_SHUTDOWN_SECONDS = 5.0
"""After our own drain, how long uvicorn waits for connections to flush their last bytes."""


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # uvicorn's own start-up chatter is replaced by our one line; its errors still show.
    logging.getLogger("uvicorn.error").setLevel(max(logging.WARNING, logging.getLogger().level))


def bind_socket(host: str, port: int) -> socket.socket:
    """Bind (but do not listen): connections are refused until the server is ready to answer them."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def _human(count: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if count >= size:
            return f"{count / size:.1f}{unit}"
    return str(count)


def _url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _run(settings: Settings, sockets: list[socket.socket], engine: Any) -> int:
    import uvicorn
    from sse_starlette.sse import AppStatus

    from server.api.app import create_app, drain
    from server.api.protocol import ConnectionLimits

    # Our drain ends the streams itself; sse-starlette must not cancel them on the first signal.
    AppStatus.disable_automatic_graceful_drain()

    class Server(uvicorn.Server):
        """uvicorn with our shutdown: drain the engine before closing, and no re-raised signal (exit 0)."""

        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.loop: asyncio.AbstractEventLoop | None = None
            self.draining = False
            self.forced = False
            self.drain_task: asyncio.Task[None] | None = None

        @contextlib.contextmanager
        def capture_signals(self) -> Iterator[None]:
            if threading.current_thread() is not threading.main_thread():
                yield
                return
            self.loop = asyncio.get_running_loop()
            previous = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
            try:
                yield
            finally:
                for sig, handler in previous.items():
                    signal.signal(sig, handler)

        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            if self.draining or self.should_exit or self.loop is None:
                self.forced = True
                self.should_exit = self.force_exit = True
                AppStatus.should_exit = True  # cancel the open streams now
                return
            self.draining = True
            # A signal handler may interrupt the loop anywhere: only schedule work from here.
            self.loop.call_soon_threadsafe(self._begin_drain)

        def _begin_drain(self) -> None:
            assert self.loop is not None
            self.drain_task = self.loop.create_task(self._drain())

        async def _drain(self) -> None:
            try:
                await drain(app.state.server, settings.shutdown_grace_seconds)
            finally:
                self.should_exit = True

        async def startup(self, sockets: list[socket.socket] | None = None) -> None:
            await super().startup(sockets)
            if self.started:
                log.info(
                    "serving %s (%s parameters, %s, %s, %s, KV cache %d tokens, %s, %s) at %s%s",
                    app.state.server.model_name, _human(engine.num_parameters), engine.dtype, engine.weights,
                    engine.device, engine.kv_capacity_tokens, engine.decode_path, engine.speculation,
                    _url(sockets[0]),
                    "".join(f"; /metrics at {_url(s)}/metrics" for s in sockets[1:]),
                )  # fmt: skip

    app = create_app(settings, engine)
    limits = ConnectionLimits(
        max_header_bytes=settings.max_header_bytes,
        header_timeout=settings.header_timeout,
        max_connections=settings.max_connections,
    )
    config = uvicorn.Config(
        app,
        log_config=None,
        access_log=False,
        lifespan="on",
        ws="none",
        timeout_graceful_shutdown=UVICORN_SHUTDOWN_SECONDS,
        **limits.uvicorn_options(),
    )
    server = Server(config)
    # What start-up made (torch, inductor's compiled graphs, the app: ~600k objects) lives as long as
    # the process. Out of the collector's sight, a full collection no longer walks it while holding the
    # GIL (0.3 s idle, seconds on a loaded box, every request stalled meanwhile).
    gc.collect()
    gc.freeze()
    server.run(sockets=sockets)
    if server.forced:
        with contextlib.suppress(Exception):
            engine.shutdown()
        return 1
    return 0 if server.started else 3


def main(argv: Sequence[str] | None = None) -> int:
    settings = parse_settings(argv)
    configure_logging(settings.log_level)
    if settings.metrics_port == settings.port:
        print(f"error: --metrics-port {settings.metrics_port} is the API's --port", file=sys.stderr)
        return 1
    sockets: list[socket.socket] = []
    for port in (settings.port, settings.metrics_port):
        if port is None:
            continue
        try:
            sockets.append(bind_socket(settings.host, port))
        except OSError as exc:
            print(f"error: cannot bind {settings.host}:{port}: {exc.strerror or exc}", file=sys.stderr)
            for sock in sockets:
                sock.close()
            return 1
    try:
        from server.engine.async_engine import AsyncEngine

        engine = AsyncEngine(settings.engine_config())
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # checkpoint, tokenizer, config and device errors all end here
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    log.debug("settings: %s", settings.public())
    return _run(settings, sockets, engine)


if __name__ == "__main__":
    sys.exit(main())
