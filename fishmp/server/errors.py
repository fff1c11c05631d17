"""Every error the server answers is JSON: `{"error": what went wrong, "detail": the item and what is allowed}` with a
4xx (bad input), 5xx (the server's fault) or 503 (shutting down). Raised as `ApiError` anywhere in a handler."""

from __future__ import annotations

import logging
import os
import re
from typing import Any
from urllib.parse import quote

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

log = logging.getLogger("fishmp")


class ApiError(Exception):
    def __init__(self, status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(error)
        self.status, self.error, self.detail, self.headers = status, error, detail, headers or {}


def error_response(status: int, error: str, detail: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": error, "detail": detail}, status_code=status, headers=headers)


async def on_api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc.status, exc.error, scrub(exc.detail, getattr(request.app.state, "server", None)),
                          exc.headers)


_PID = re.compile(r"\bpid \d+")


def scrub(detail: Any, state: Any) -> Any:
    """An error's detail for a client: the item and what went wrong, not the server's layout. The data dir and
    --root are named, not spelled out; process ids are left out."""
    if isinstance(detail, list):
        return [scrub(d, state) for d in detail]
    if not isinstance(detail, str) or state is None:
        return detail
    for path, name in ((getattr(state, "data_dir", None), "<data dir>"), (getattr(state, "root", None), "<root>")):
        if path:
            detail = detail.replace(os.path.realpath(path), name).replace(path, name)
    return _PID.sub("another process", detail)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405 as JSON too."""
    assert isinstance(exc, HTTPException)
    what = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    detail = f"{request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
    return error_response(exc.status_code, what, detail, dict(exc.headers or {}))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.error("[Serve] %s %s failed", request.method, safe_path(request.url.path), exc_info=exc)
    return error_response(500, "internal error", f"{type(exc).__name__} (the server's log has the details)")


def safe_path(path: str) -> str:
    """A request path for a log line: control characters and non-ASCII percent-escaped (no forged lines, no
    terminal escapes)."""
    return quote(path[:2000], safe="/:@!$&'()*+,;=-._~")


class CatchAll:
    """The innermost middleware: a handler's unexpected exception becomes one log line with its traceback and a 500
    JSON answer, and is not raised further (Starlette's outermost handler would re-raise it to uvicorn, which logs it
    a second time and drops the connection under the client). After an answer has started (a stream), the exception
    ends the answer without its last chunk, so the client sees it cut, and the connection is closed."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watched)
        except Exception as exc:  # noqa: BLE001 - the point of this middleware
            if started:
                log.error("[Serve] %s %s: the answer was cut short: %s: %s", scope["method"],
                          safe_path(scope["path"]), type(exc).__name__, exc)
                return  # uvicorn closes a connection whose answer did not complete, without the chunked end
            log.error("[Serve] %s %s failed", scope["method"], safe_path(scope["path"]), exc_info=exc)
            body = JSONResponse({"error": "internal error",
                                 "detail": f"{type(exc).__name__} (the server's log has the details)"},
                                status_code=500)
            await body(scope, receive, send)


def bad_request(error: str, detail: Any = None) -> ApiError:
    return ApiError(400, error, detail)
