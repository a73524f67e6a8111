"""The FastAPI application: middleware, routes, and the engine's lifecycle (start, drain, stop).

The engine is built (weights loaded) by the caller before the app exists, so a bad checkpoint fails
before any port opens; the lifespan only starts its step thread and, at the end, drains it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from server.api import errors
from server.api.auth import APIKeyMiddleware
from server.api.limits import BodyLimitMiddleware
from server.api.metrics_port import MetricsPortMiddleware
from server.api.openai import router
from server.api.request import TIMING_HEADERS
from server.api.state import EngineClient, ServerState
from server.api.telemetry import REQUEST_ID_HEADER, TelemetryMiddleware
from server.api.telemetry import router as telemetry_router
from server.api.ui import router as ui_router
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("server.api")

EXPOSED_HEADERS = [REQUEST_ID_HEADER, *TIMING_HEADERS.values(), "retry-after"]


async def drain(state: ServerState, grace_seconds: float) -> None:
    """Stop admitting, give running requests `grace_seconds` to finish, then end the rest with an error.

    Idempotent: the SIGTERM handler calls it first, the lifespan's shutdown again.
    """
    if state.drained:
        return
    state.draining = True
    state.engine.stop_admitting()
    log.info("shutting down: no new requests; waiting up to %gs for running ones", grace_seconds)
    if not await state.engine.drain(grace_seconds):
        stats = state.engine.stats()
        log.warning(
            "grace period over: ending %d running and %d waiting requests", stats.running, stats.waiting
        )
        state.engine.abort_all("the server is shutting down")
    state.drained = True


def create_app(settings: Settings, engine: EngineClient) -> FastAPI:
    """The ASGI app serving `engine` (an AsyncEngine, loaded but not started)."""
    state = ServerState(settings=settings, engine=engine, metrics=Metrics(engine.stats))
    engine.add_step_listener(state.metrics.observe_step)
    engine.add_compile_listener(state.metrics.observe_grammar_compile)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            await drain(state, settings.shutdown_grace_seconds)
            engine.shutdown()

    # Outermost first: CORS answers preflights and decorates errors; auth precedes reading any body.
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["Authorization", "Content-Type"],
                expose_headers=EXPOSED_HEADERS,
                max_age=600,
            )
        )
    if settings.metrics_port is not None:  # before the key: the metrics port needs none
        gate = Middleware(MetricsPortMiddleware, port=settings.metrics_port, metrics=state.metrics)
        middleware.append(gate)
    if settings.api_key:
        middleware.append(
            Middleware(
                APIKeyMiddleware, api_key=settings.api_key, metrics_without_auth=settings.metrics_without_auth
            )
        )
    middleware.append(
        Middleware(
            BodyLimitMiddleware, max_body_bytes=settings.max_body_bytes, body_timeout=settings.body_timeout
        )
    )

    app = FastAPI(title="tinyserve", version="0.1.0", lifespan=lifespan, middleware=middleware)
    app.state.server = state
    errors.install(app)
    app.include_router(router)
    app.include_router(telemetry_router)
    # Outermost of all ours: it must see the 401s, 413s and CORS answers too.
    app.add_middleware(TelemetryMiddleware, metrics=state.metrics, router=app.router)
    app.include_router(ui_router)
    return app
