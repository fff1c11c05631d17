"""A job's events to its `on_event` callback, off the job loop's thread.

The loop (service.py) only puts events on the job's queue; one daemon thread per job that has a callback takes them
off in order and calls it. So a slow callback delays only its own job's events: never the loop (whose deadlines
would kill healthy workers while it waited), never another job's. A callback that raises costs only itself: it is
dropped with one warning, its job goes on, and the error is kept for the job's result (`JobResult.callback_error`).

Guarantees: a job's events arrive in the order they were emitted, on one thread; `finished` is the last and is
delivered before `JobHandle.result()` returns (the handle is released by `close(then)`, which runs `then` on the
delivery thread once every event before it was delivered).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("fishmp")

_here = threading.local()  # .delivery: the EventDelivery whose thread this is


def current() -> EventDelivery | None:
    """The delivery whose callback is running on this thread, or None outside any on_event callback."""
    return getattr(_here, "delivery", None)


class _Close:
    def __init__(self, then: Callable[[], None]) -> None:
        self.then = then


class EventDelivery:
    """One job's event queue and the thread that feeds its callback (started with the first event)."""

    def __init__(self, callback: Callable[[dict], None], name: str) -> None:
        """`name`: how warnings name the job (its output directory)."""
        self._callback: Callable[[dict], None] | None = callback
        self.name = name
        self.error: str | None = None  # the callback's exception, once it raised (it gets nothing more)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._start_lock = threading.Lock()

    def put(self, event: dict) -> None:
        self._ensure_thread()
        self._queue.put(event)

    def close(self, then: Callable[[], None]) -> None:
        """After every event queued so far, run `then` (on the delivery thread) and end the thread."""
        self._ensure_thread()
        self._queue.put(_Close(then))

    def _ensure_thread(self) -> None:
        with self._start_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fishmp-events", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        _here.delivery = self
        while True:
            item = self._queue.get()
            if isinstance(item, _Close):
                item.then()
                return
            if self._callback is None:
                continue
            try:
                self._callback(item)
            except BaseException as exc:  # noqa: BLE001 - SystemExit too: this thread must reach the close item
                self.error = f"{type(exc).__name__}: {exc} (at a {item.get('event')} event)"
                self._callback = None
                log.warning("[Main] job %s: its on_event callback raised %s; it gets no more events, the job goes "
                            "on", self.name, self.error)
