"""What every handler shares: the settings, the one Pool, the stores, the queue bound, and `Submission`, a job on the
pool whose events reach the event loop.

Threads: the pool calls `on_event` from its own thread (one day a delivery thread per job); a callback here never
blocks and never touches server state: it hands the event to the event loop with `call_soon_threadsafe`, and
everything else (counting, the job store, metrics) runs on the loop, one event at a time.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..config import ServeSettings, Settings
from .errors import ApiError
from .refcap import reference_cap_s
from .refstore import References
from .sweep import Sweeper

INTERACTIVE_PRIORITY = 1000.0  # a single line (/v1/tts, /v1/audio/speech) next to a film job (priority 1)
RATE_WINDOW_S = 60.0
EVENTS_LATE_S = 5.0  # how long after a job's result its last events may still arrive


class QueueGate:
    """At most `limit` segments accepted and unfinished at once (FISH_SERVE_MAX_QUEUED); the next request is a 429
    whose Retry-After is the excess at the recent finishing rate (1 to 300 s, 5 before anything finished)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.outstanding = limit, 0
        self._finished: collections.deque[float] = collections.deque()

    def admit(self, n: int) -> None:
        self.check(n)
        self.outstanding += n

    def check(self, n: int) -> None:
        """The 400 / 429 that admitting `n` segments now would raise (nothing admitted)."""
        if n > self.limit:
            raise ApiError(400, "too many segments", f"{n} segments in one request; this server queues at most "
                           f"{self.limit} (FISH_SERVE_MAX_QUEUED)")
        if self.outstanding + n > self.limit:
            wait = self.retry_after(self.outstanding + n - self.limit)
            raise ApiError(429, "queue full", f"{self.outstanding} segments are queued or running, the bound is "
                           f"{self.limit} (FISH_SERVE_MAX_QUEUED); retry in {wait} s", {"Retry-After": str(wait)})

    def release(self, n: int = 1, finished: bool = True) -> None:
        self.outstanding = max(0, self.outstanding - n)
        if finished:
            now = time.monotonic()
            self._finished.extend([now] * n)
            while self._finished and self._finished[0] < now - RATE_WINDOW_S:
                self._finished.popleft()

    def retry_after(self, excess: int) -> int:
        if not self._finished:
            return 5
        rate = len(self._finished) / max(1.0, time.monotonic() - self._finished[0])
        return int(min(300, max(1, math.ceil(excess / rate))))


@dataclass
class ServerState:
    settings: Settings
    serve: ServeSettings
    root: str | None  # --root: job and request paths may point inside it, nowhere else
    pool: Any = None  # fishmp.Pool, made before the server listens
    loop: asyncio.AbstractEventLoop | None = None
    stopping: bool = False  # SIGTERM / Ctrl-C seen: new work is refused (503)
    refs: References = field(init=False)
    gate: QueueGate = field(init=False)
    metrics: Any = None  # metrics.Metrics
    jobs: Any = None  # jobstore.JobStore
    review: Any = None  # retakes.Review
    tasks: set = field(default_factory=set)  # background clean-ups, kept referenced until they end
    sweeper: Sweeper = field(init=False)  # unused voices and abandoned lines (sweep.py)

    def __post_init__(self) -> None:
        self.refs = References(self.serve.data_dir, reference_cap_s(self.settings, self.serve.max_reference_s))
        self.sweeper = Sweeper(self.data_dir)
        self.gate = QueueGate(self.serve.max_queued)

    @property
    def data_dir(self) -> str:
        return os.path.abspath(self.serve.data_dir)

    def check_accepting(self) -> None:
        if self.stopping:
            raise ApiError(503, "shutting down", "the server is stopping (SIGTERM / Ctrl-C): retry on its successor")

    def background(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class Submission:
    """One job on the shared pool, its events delivered on the event loop to `on_event`, its segments counted
    against the queue bound until each finishes."""

    def __init__(self, state: ServerState, job: Any, output_dir: str, *, priority: float, resume: bool,
                 on_event: Callable[[dict], None], force: bool = False, stream: bool = False) -> None:
        """`force`: past the queue bound too (a restarted server resuming its jobs); `stream`: the segments'
        audio also comes as `segment_audio` events while they decode (fishmp.Pool.submit)."""
        state.check_accepting()
        self.state, self.on_event = state, on_event
        self.loop = state.loop or asyncio.get_running_loop()
        self.changed = asyncio.Event()
        self.finished: dict | None = None
        self._done_at: float | None = None
        self.unfinished = len(job.segments)
        if force:
            state.gate.outstanding += self.unfinished
        else:
            state.gate.admit(self.unfinished)
        try:
            extra = {"stream": True} if stream else {}
            self.handle = state.pool.submit(job, output_dir=output_dir, on_event=self._from_pool, resume=resume,
                                            priority=priority, **extra)
        except Exception as exc:  # noqa: BLE001 - a closed pool: the server is going down
            state.gate.release(self.unfinished, finished=False)
            raise ApiError(503, "no pool", str(exc)) from None

    def _from_pool(self, ev: dict) -> None:  # the pool's thread: hand over, never block
        try:
            self.loop.call_soon_threadsafe(self._deliver, ev)
        except RuntimeError:  # the event loop is closed: the server has stopped, the job's files say the rest
            pass

    def _deliver(self, ev: dict) -> None:
        kind = ev["event"]
        if kind in ("segment_done", "segment_failed") and self.unfinished > 0:
            self.unfinished -= 1
            self.state.gate.release(1)
        if kind == "finished":
            self.finished = ev
            self._settle()
        if self.state.metrics is not None:
            self.state.metrics.on_event(ev)
        self.on_event(ev)
        self.changed.set()

    def _settle(self) -> None:
        if self.unfinished:
            self.state.gate.release(self.unfinished, finished=False)
            self.unfinished = 0

    def error(self) -> BaseException | None:
        """What the job raised instead of finishing (an output directory in use, a closed pool), once done."""
        if not self.handle.done():
            return None
        try:
            self.handle.result(timeout=0)
        except BaseException as exc:  # noqa: BLE001
            return exc
        return None

    async def wait_changed(self, timeout: float) -> None:
        self.changed.clear()
        try:
            await asyncio.wait_for(self.changed.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        if self.finished is None and self.error() is not None:
            self._settle()  # it could not start (no events will come): free its place

    def over(self) -> bool:
        """No more events will come: `finished` came, or the job raised instead of finishing, or it has been done
        for EVENTS_LATE_S without its last events (they may be delivered off the pool's thread, after the result)."""
        if self.finished is not None or self.error() is not None:
            return True
        if not self.handle.done():
            return False
        if self._done_at is None:
            self._done_at = time.monotonic()
        return time.monotonic() - self._done_at > EVENTS_LATE_S

    async def ended(self, poll_s: float = 0.05) -> None:
        """Until the pool is done with the job (its output directory released) and its events are in."""
        while not self.over():
            await asyncio.sleep(poll_s if self.finished is not None or self.handle.done() else 0.25)
        self._settle()

    def cancel(self) -> None:
        if not self.handle.done():
            self.handle.cancel()
