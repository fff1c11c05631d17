"""Every error the server answers is JSON: `{"error": what went wrong, "detail": the item and what is allowed}` with a
4xx (bad input), 5xx (the server's fault) or 503 (shutting down). Raised as `ApiError` anywhere in a handler."""

from __future__ import annotations

import logging
from typing import Any

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
    return error_response(exc.status, exc.error, exc.detail, exc.headers)


async def on_http_exception(request: Request, exc: Exception) -> Response:
    """Starlette's own 404 / 405 as JSON too."""
    assert isinstance(exc, HTTPException)
    what = {404: "not found", 405: "method not allowed"}.get(exc.status_code, str(exc.detail))
    detail = f"{request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
    return error_response(exc.status_code, what, detail, dict(exc.headers or {}))


async def on_unexpected(request: Request, exc: Exception) -> Response:
    log.error("[Serve] %s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error", f"{type(exc).__name__}: {exc}")


def bad_request(error: str, detail: Any = None) -> ApiError:
    return ApiError(400, error, detail)
