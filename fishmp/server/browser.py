"""What a browser may do with this server: the defences against web pages the user opens (docs/security.md).

A keyless server on 127.0.0.1 is reachable from every page a browser shows. Three checks keep those pages out while
clients that are not browsers (pyvideotrans, the SDKs, curl: they send no `Origin`) go on working:

- `trusted_hosts`: the Host names a request may address (Starlette's TrustedHostMiddleware enforces them), so a page
  on a rebound DNS name (`evil.example` -> 127.0.0.1) gets 400, not the jobs. Loopback names, --host, and
  FISH_SERVE_ALLOWED_HOSTS; any name when the server listens beyond loopback (it has a key then).
- `OriginCheck`: a state-changing request (any method but GET, HEAD, OPTIONS; and every WebSocket handshake: a
  page may open a WebSocket to any site, cross-site WebSocket hijacking) that a browser sends from another
  origin is a 403: its `Origin` (or `Sec-Fetch-Site` when it sends no Origin) must be this server's own origin or one
  of FISH_SERVE_ALLOWED_ORIGINS. A cross-site form or `text/plain` POST needs no CORS preflight, so without this a
  page could delete a voice or accept a take. No CORS headers are ever sent: other origins cannot read answers.
- `SecurityHeaders`: every answer says `X-Content-Type-Options: nosniff`, and may not be framed by another site
  (`X-Frame-Options: DENY`, CSP `frame-ancestors 'none'`: no clickjacking of the review page's buttons).
"""

from __future__ import annotations

import ipaddress
import json
from typing import Any
from urllib.parse import urlsplit

from starlette._utils import parse_host_header

from .guards import send_json

SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "[::1]", "localhost.localdomain")
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"content-security-policy", b"frame-ancestors 'none'"), (b"referrer-policy", b"same-origin")]


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def trusted_hosts(host: str, configured: tuple[str, ...], loopback: bool) -> list[str]:
    """TrustedHostMiddleware's allowed_hosts for a server listening on `host`."""
    if not loopback or "*" in configured:
        return ["*"]  # reachable by other machines, by names we cannot know: the API key guards it
    bound = f"[{host.strip('[]')}]" if ":" in host else host
    return sorted({*LOOPBACK_HOSTS, bound.lower(), *configured})


def _origin(value: str) -> str | None:
    """`scheme://host[:port]` lower-cased, default ports dropped; None when not an origin (e.g. "null")."""
    try:
        parts = urlsplit(value.strip())
        port = parts.port
    except ValueError:
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    default = {"http": 80, "https": 443}[parts.scheme]
    return f"{parts.scheme}://{host}" + (f":{port}" if port and port != default else "")


def _own_origin(scope: dict, headers: dict[bytes, bytes]) -> str | None:
    parsed = parse_host_header(headers.get(b"host", b"").decode("latin-1") or None)
    if parsed is None:
        return None
    scheme = {"ws": "http", "wss": "https"}.get(scope.get("scheme", "http"), scope.get("scheme", "http"))
    return _origin(f"{scheme}://{parsed.host}" + (f":{parsed.port}" if parsed.port else ""))


class OriginCheck:
    """403 for a state-changing request a browser sends from a page of another origin (see the module's text)."""

    def __init__(self, app: Any, allowed_origins: tuple[str, ...] = ()) -> None:
        self.app = app
        self.allowed = {o for o in (_origin(a) for a in allowed_origins) if o}
        self.allow_any = "*" in allowed_origins

    def refusal(self, scope: dict) -> str | None:
        """Why this request is refused, or None."""
        if scope["type"] not in ("http", "websocket") or self.allow_any:
            return None
        # A WebSocket's handshake is a GET, but what follows changes state and the browser lets any page open one
        # (no CORS): cross-site WebSocket hijacking. It is checked like a state-changing request.
        if scope["type"] == "http" and scope["method"] in SAFE_METHODS:
            return None
        headers = dict(scope["headers"])
        raw = headers.get(b"origin")
        if raw is None:  # not sent by non-browser clients; old browsers send Sec-Fetch-Site at least
            site = headers.get(b"sec-fetch-site", b"").decode("latin-1").lower()
            return f"Sec-Fetch-Site: {site}" if site in ("cross-site", "same-site") else None
        origin = _origin(raw.decode("latin-1"))
        if origin is not None and (origin == _own_origin(scope, headers) or origin in self.allowed):
            return None
        return f"Origin: {raw.decode('latin-1')[:100]}"

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        why = self.refusal(scope)
        if why is None:
            return await self.app(scope, receive, send)
        body = json.dumps({"error": "cross-origin request refused",
                           "detail": f"{why}: a page of another site may not change this server's state; allow its "
                                     "origin with FISH_SERVE_ALLOWED_ORIGINS"}).encode()
        await send_json(send, 403, body, scope=scope)


class SecurityHeaders:
    """Adds SECURITY_HEADERS to every answer (the outermost middleware: errors and refusals get them too)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message: dict) -> None:
            if message["type"] == "http.response.start":
                present = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in present]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, with_headers)
