"""`python -m fishmp serve`: one warm fishmp.Pool behind the HTTP APIs, until SIGTERM / Ctrl-C.

Start: the settings (FISH_SERVE_* and the options), the refusal to listen beyond loopback without an API key (of
MIN_REMOTE_KEY_CHARS at least), the data dir locked (datalock.py: a second server on it exits 2), the socket bound
(a port in use is one line, exit 2, before any worker starts), the Pool started from the usual FISH_* settings, then
uvicorn on that socket (connections.py: deadlines and a bound on connections). Stop (SIGTERM or Ctrl-C): no new
connections; new requests on open ones get
503; the pool's running work gets FISH_SHUTDOWN_GRACE_S (a second Ctrl-C stops at once), the answers waiting on it
are sent (503 for lines that did not finish), event streams end after their job's `finished`, workers exit, and the
process exits 0. uvicorn re-raises the signal it caught once it is done; the handlers installed here receive it,
so the exit code stays 0.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
from typing import Any

import uvicorn

from ..config import ServeSettings, Settings
from .browser import is_loopback
from .connections import guarded_protocol
from .datalock import DataDirBusy, lock_data_dir

log = logging.getLogger("fishmp")
__all__ = ["is_loopback", "serve", "serve_settings", "listen"]
MIN_REMOTE_KEY_CHARS = 16  # a key other machines can guess at: 16 characters of a random token at least


def listen(host: str, port: int) -> socket.socket:
    """A listening socket (not inherited by the spawned workers); OSError when the address cannot be had."""
    family, _, _, _, address = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def serve_settings(args: Any) -> tuple[ServeSettings, str | None]:
    """The server's settings with the command line's options over FISH_SERVE_*, and --root resolved."""
    given = {"host": args.host, "port": args.port, "api_key": args.api_key, "data_dir": args.data_dir}
    serve = ServeSettings.from_env(**{k: v for k, v in given.items() if v is not None})
    root = os.path.realpath(args.root) if args.root else None
    return serve, root


def serve(args: Any, settings: Settings) -> int:
    serve, root = serve_settings(args)
    if root is not None and not os.path.isdir(root):
        print(f"fishmp: --root {args.root}: not a directory", file=sys.stderr)
        return 2
    if not is_loopback(serve.host) and not serve.api_key:
        print(f"fishmp: refusing to listen on {serve.host} (beyond this machine) without an API key: set FISH_API_KEY "
              "(or --api-key), or use --host 127.0.0.1", file=sys.stderr)
        return 2
    if not is_loopback(serve.host) and len(serve.api_key or "") < MIN_REMOTE_KEY_CHARS:
        print(f"fishmp: refusing to listen on {serve.host} with an API key of {len(serve.api_key or '')} characters: "
              f"a key that guards a server other machines reach needs at least {MIN_REMOTE_KEY_CHARS} (e.g. "
              "python -c 'import secrets; print(secrets.token_urlsafe(24))')", file=sys.stderr)
        return 2
    try:
        os.makedirs(serve.data_dir, exist_ok=True)
        lock = lock_data_dir(serve.data_dir)
    except OSError as exc:
        print(f"fishmp: cannot use data dir {serve.data_dir}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except DataDirBusy as exc:
        print(f"fishmp: {exc}", file=sys.stderr)
        return 2
    try:
        return _serve_locked(serve, root, settings, args)
    finally:
        lock.release()


def _serve_locked(serve: ServeSettings, root: str | None, settings: Settings, args: Any) -> int:
    from ..api import Pool
    from .app import create_app
    from .state import ServerState

    try:
        sock = listen(serve.host, serve.port)
    except OSError as exc:
        print(f"fishmp: cannot listen on {serve.host}:{serve.port} (data dir {serve.data_dir}): {exc.strerror or exc}",
              file=sys.stderr)
        return 2
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers[:] = log.handlers
        logging.getLogger(name).setLevel(logging.WARNING)
        logging.getLogger(name).propagate = False
    try:
        pool = Pool(settings)
        state = ServerState(settings, serve, root, pool=pool)
        app = create_app(state)
        config = uvicorn.Config(app, log_config=None, access_log=False, lifespan="on",
                                timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 10,
                                timeout_keep_alive=30, limit_concurrency=serve.max_connections,
                                ws="wsproto", ws_max_size=int(serve.max_body_mb * 2**20),  # /v1/tts/live (live.py)
                                http=guarded_protocol(serve.header_timeout_s, serve.body_timeout_s,
                                                      serve.max_connections))
        server = _Server(config, state)
        previous = {s: signal.signal(s, lambda signum, frame: None) for s in (signal.SIGINT, signal.SIGTERM)}
        where = f"http://{serve.host}:{sock.getsockname()[1]}"
        log.info("[Serve] listening on %s (data dir %s%s%s); SIGTERM or Ctrl-C stops it", where,
                 os.path.abspath(serve.data_dir), ", API key required" if serve.api_key else "",
                 f", paths allowed inside {root}" if root else "")
        try:
            asyncio.run(server.serve(sockets=[sock]))
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            pool.close(settings.shutdown_grace_s)
    finally:
        sock.close()
    if not server.started:
        log.error("[Serve] the server did not start")
        return 1
    log.info("[Serve] stopped")
    return 0


class _Server(uvicorn.Server):
    """uvicorn's server; a stop signal also stops the pool's running work (FISH_SHUTDOWN_GRACE_S)."""

    def __init__(self, config: uvicorn.Config, state: Any) -> None:
        super().__init__(config)
        self.fishmp_state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        state = self.fishmp_state
        if not state.stopping:
            log.warning("[Serve] %s: stopping (running work gets %gs, FISH_SHUTDOWN_GRACE_S)",
                        signal.Signals(sig).name, state.settings.shutdown_grace_s)
        state.stopping = True
        state.pool.request_stop(sig)  # safe in a signal handler; a second call stops at once
        super().handle_exit(sig, frame)
