"""Connections a client cannot hold open for nothing (slowloris): uvicorn's own h11 protocol, with deadlines.

uvicorn bounds only an idle keep-alive connection (`timeout_keep_alive`) and refuses requests past
`limit_concurrency` with 503; a connection that sends nothing, half a request line, or headers without the body they
announce stays open for as long as the client likes, and enough of them use up the process's file descriptors.
`GuardedH11` adds, per connection:

- headers: a request's headers complete within FISH_SERVE_HEADER_TIMEOUT_S of the connection opening or of the
  request's first byte (an idle keep-alive connection is uvicorn's business), else the connection is closed;
- body: the body it announced arrives within FISH_SERVE_BODY_TIMEOUT_S of its headers, else closed (the handler
  sees a disconnect);
- count: past FISH_SERVE_MAX_CONNECTIONS open connections a new one is closed at once (the 503 of
  `limit_concurrency` needs a request first, and those are what a slow client never finishes).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("fishmp")


def guarded_protocol(header_timeout_s: float, body_timeout_s: float, max_connections: int) -> type[H11Protocol]:
    """An H11Protocol class with these limits, for uvicorn.Config(http=...)."""

    class GuardedH11(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None
        _waiting: str | None = None  # "headers" or "body": what the deadline is for

        def connection_made(self, transport: Any) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > max_connections:
                log.warning("[Serve] %d connections open (FISH_SERVE_MAX_CONNECTIONS): closing a new one",
                            len(self.connections) - 1)
                self.transport.close()
                return
            self._arm("headers", header_timeout_s)

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._waiting is None and self.conn.their_state is h11.IDLE:
                self._arm("headers", header_timeout_s)  # a new request begins on a kept-alive connection
            super().data_received(data)
            self._follow()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._follow()

        def _follow(self) -> None:
            """Move the deadline along with the request's state: headers in -> the body's; all in -> none."""
            state = self.conn.their_state
            if state is h11.SEND_BODY and self._waiting != "body":
                self._arm("body", body_timeout_s)
            elif state is not h11.IDLE and state is not h11.SEND_BODY:
                self._disarm()
            elif state is h11.IDLE and self._waiting == "body":
                self._disarm()

        def _arm(self, what: str, seconds: float) -> None:
            self._disarm()
            self._waiting = what
            self._deadline = self.loop.call_later(seconds, self._expired)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline, self._waiting = None, None

        def _expired(self) -> None:
            what, self._deadline, self._waiting = self._waiting, None, None
            if self.transport.is_closing():
                return
            seconds = header_timeout_s if what == "headers" else body_timeout_s
            client = f"{self.client[0]}:{self.client[1]}" if self.client else "a client"
            log.warning("[Serve] %s: closing the connection: the request's %s did not arrive within %gs "
                        "(FISH_SERVE_%s_TIMEOUT_S)", client, what, seconds, "HEADER" if what == "headers" else "BODY")
            self.transport.close()

    return GuardedH11
