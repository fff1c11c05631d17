"""The ASGI app: routes, the checks every request passes, JSON errors, and the lifespan around the pool.

Requests pass, outermost first: SecurityHeaders (nosniff, no framing), RequestLog (a log line and the request
metrics), TrustedHostMiddleware (Host names: DNS rebinding), OriginCheck (cross-site browser requests), BearerAuth,
BodyLimit, CatchAll (an unexpected exception: one log line, a 500), then Starlette (errors to JSON, routing); see
browser.py and docs/security.md. A WebSocket's handshake (/v1/tts/live) passes the Host, Origin and key checks
too. The review page (pages.py: `/`, `/jobs/{id}`, `/static/`) comes after the API;
`create_app(state, extra_routes)` puts more routes after the API's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from . import jobs_api, live, models_api, pages, references_api, review_api
from .browser import OriginCheck, SecurityHeaders, is_loopback, trusted_hosts
from .errors import ApiError, CatchAll, error_response, on_api_error, on_http_exception, on_unexpected
from .guards import BearerAuth, BodyLimit, BodyTooLarge, too_large_body
from .jobstore import JobStore
from .lines import clean_lines
from .metrics import Metrics, RequestLog
from .openai import models, speech
from .retakes import Review
from .state import ServerState
from .tts import tts

log = logging.getLogger("fishmp")


async def health(request: Request) -> Response:
    """200 once a worker is ready (fish's shape plus workers_ready), 503 while they load."""
    state: ServerState = request.app.state.server
    workers = state.pool.stats()["workers"] if state.pool is not None else {}
    ready = workers.get("ready", 0)
    if state.stopping:
        return JSONResponse({"status": "stopping", "workers_ready": ready}, status_code=503)
    if not ready:  # loading, or none left (their restarts used up: the next request starts them again)
        status = "starting" if workers.get("starting") else "no workers"
        return JSONResponse({"status": status, "workers_ready": 0}, status_code=503)
    return JSONResponse({"status": "ok", "workers_ready": ready})


async def metrics(request: Request) -> Response:
    state: ServerState = request.app.state.server
    body, content_type = state.metrics.render()
    return Response(body, media_type=content_type)


async def on_body_too_large(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BodyTooLarge)
    response = Response(too_large_body(exc.limit, "the body grew past the limit as it came"), status_code=413,
                        media_type="application/json", headers={"Connection": "close"})
    return response


async def _drain(state: ServerState) -> None:
    """At shutdown (uvicorn has let the open answers finish): the pool's running work is stopped, and the jobs'
    last events are recorded before the event loop goes."""
    if not state.stopping:
        state.stopping = True
        state.pool.request_stop(signal.SIGTERM)
    pending = [sj.sub.ended() for sj in state.jobs.jobs.values() if sj.sub is not None]
    with contextlib.suppress(asyncio.TimeoutError):
        await asyncio.wait_for(asyncio.gather(*pending, *list(state.tasks)), state.settings.shutdown_grace_s + 5)
    await state.jobs.stop_streams()


def create_app(state: ServerState, extra_routes: list | None = None) -> Starlette:
    state.metrics = Metrics(lambda: state.pool.stats() if state.pool is not None else {},
                            lambda: state.gate.outstanding)
    state.jobs = JobStore(state)
    state.review = Review(state, state.jobs)
    routes: list[Any] = [
        Route("/v1/health", health, methods=["GET", "POST"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/tts", tts, methods=["POST"]),
        Route("/v1/audio/speech", speech, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        *live.ROUTES,  # the Fish Audio SDK's WebSocket /v1/tts/live
        *models_api.ROUTES,  # the Fish Audio SDK's voice list, GET /model
        *references_api.ROUTES,
        *review_api.ROUTES,  # before the job API's segment route, whose `{segment_id:path}` would take them
        *jobs_api.ROUTES,
        *(extra_routes or []),
        *pages.ROUTES,
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        state.loop = asyncio.get_running_loop()
        clean_lines(state.data_dir)
        state.pool.warm()  # the workers load now, not at the first request
        state.jobs.load()
        state.review.recover()
        resumed = state.jobs.resume_all()
        log.info("[Serve] %d stored jobs, %d resumed", len(state.jobs.jobs), resumed)
        await state.sweeper.once()
        sweeping = asyncio.ensure_future(state.sweeper.run())
        try:
            yield
        finally:
            sweeping.cancel()
            await _drain(state)

    app = Starlette(
        routes=routes, lifespan=lifespan,
        middleware=[Middleware(SecurityHeaders),
                    Middleware(RequestLog, metrics=state.metrics, routes=lambda: app.router.routes),
                    Middleware(TrustedHostMiddleware, allowed_hosts=trusted_hosts(
                        state.serve.host, state.serve.allowed_hosts, is_loopback(state.serve.host)), www_redirect=False),
                    Middleware(OriginCheck, allowed_origins=state.serve.allowed_origins),
                    Middleware(BearerAuth, api_key=state.serve.api_key),
                    Middleware(BodyLimit, limit_bytes=int(state.serve.max_body_mb * 2**20)),
                    Middleware(CatchAll)],
        exception_handlers={ApiError: on_api_error, HTTPException: on_http_exception, BodyTooLarge: on_body_too_large,
                            Exception: on_unexpected})
    app.state.server = state
    return app


__all__ = ["create_app", "error_response"]
