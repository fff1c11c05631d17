"""The checks every request passes before a handler sees it, as plain ASGI middleware (no body buffering):

- `BodyLimit`: a body over FISH_SERVE_MAX_BODY_MB is a 413. Answered from Content-Length before any byte of the body
  is read (and the connection closed); a chunked body is counted as it arrives and cut off at the limit (what
  follows is read and dropped for a moment, so the client sees the 413).
- `BearerAuth`: with an API key, every route but /v1/health and the review page's files needs `Authorization: Bearer
  KEY` (compared in constant time), else 401. The page's HTML, CSS and JS hold no data: the browser loads them
  without a key, and the page sends the key with each API request it makes. A WebSocket's handshake (/v1/tts/live)
  too: it is answered 401 instead of being upgraded.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from typing import Any

Scope = dict[str, Any]
OPEN_PATHS = ("/v1/health", "/")
OPEN_PREFIXES = ("/jobs/", "/static/")  # the review page (pages.py); never under /v1/


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"request body over {limit} bytes")
        self.limit = limit


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


def too_large_body(limit: int, seen: str) -> bytes:
    return json.dumps({"error": "request body too large",
                       "detail": f"{seen}; this server takes at most {_mib(limit)} (FISH_SERVE_MAX_BODY_MB)"}).encode()


async def send_json(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = (),
                     scope: Scope | None = None) -> None:
    """An HTTP answer; for a WebSocket handshake (`scope`), the same answer instead of the upgrade where the server
    can send one (ASGI's websocket.http.response: uvicorn), else a close before accepting (the client sees 403)."""
    prefix = ""
    if scope is not None and scope["type"] == "websocket":
        if "websocket.http.response" not in scope.get("extensions", {}):
            await send({"type": "websocket.close", "code": 1008})
            return
        prefix = "websocket."
    await send({"type": f"{prefix}http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *headers]})
    await send({"type": f"{prefix}http.response.body", "body": body})


DRAIN_BYTES, DRAIN_S = 16 * 2**20, 2.0


async def _drain(receive: Any, message: dict) -> None:
    """Read and drop what follows of a body past the limit (at most DRAIN_BYTES, for DRAIN_S), nothing of it kept:
    a client still sending then reads the 413 instead of a connection reset (closing a socket with unread data
    resets it; web servers linger the same way). A body longer than that is cut off all the same."""
    deadline, dropped = time.monotonic() + DRAIN_S, 0
    while message.get("more_body") and dropped < DRAIN_BYTES and time.monotonic() < deadline:
        try:
            message = await asyncio.wait_for(receive(), deadline - time.monotonic())
        except asyncio.TimeoutError:
            return
        if message["type"] != "http.request":
            return
        dropped += len(message.get("body", b""))


class BodyLimit:
    def __init__(self, app: Any, limit_bytes: int) -> None:
        self.app, self.limit = app, limit_bytes

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.strip().isdigit() and int(length) > self.limit:
            body = too_large_body(self.limit, f"Content-Length is {int(length)} bytes")
            return await send_json(send, 413, body, [(b"connection", b"close")])
        seen = 0

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    await _drain(receive, message)
                    raise BodyTooLarge(self.limit)  # the app's handler answers 413 (app.py)
            return message

        await self.app(scope, counted, send)


class BearerAuth:
    def __init__(self, app: Any, api_key: str | None) -> None:
        self.app = app
        self.expected = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if self.expected is None or scope["type"] not in ("http", "websocket") or path in OPEN_PATHS \
                or path.startswith(OPEN_PREFIXES):
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = given.strip().partition(b" ")
        if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.expected):  # the scheme: any case
            return await self.app(scope, receive, send)
        what = "no Authorization header" if not given else "the key does not match"
        body = json.dumps({"error": "unauthorized", "detail": f"{what}: send Authorization: Bearer <FISH_API_KEY>"})
        await send_json(send, 401, body.encode(), [(b"www-authenticate", b"Bearer")], scope)
