"""Voices prepared beside the decode loop: a worker's references encoded ahead, on a thread of their own.

A row can start only once its voice (SpeakerPrompt: the reference's prompt tokens) is ready, and encoding a reference
with the codec takes far longer than a decode step. Done on the decode thread (as before), every new voice stopped
every running row for that long; a client that sends a new reference with every line (pyvideotrans's clone role)
then halved a worker's throughput. Here the lane loop asks for the voices of the segments waiting in its backlog as
soon as they arrive (`want`); this stage prepares them in order on its own thread (on CUDA also its own stream,
through the engine's `beside`), one after the other, several waiting at once, while the running rows keep stepping;
the loop adds a row once its voice is `ready`. Preparing twice is avoided: one entry per SpeakerRef, kept until the
lane loop takes it (`take`), so that tasks of one voice share one encode (the worker's own prompt cache then answers).

Failures stay the voice's: `take` raises what preparing raised (BadReferenceError for an unusable reference: that
speaker's segments fail, the other rows are untouched) and forgets it, so a later task of that speaker tries again
(a reference file fixed meanwhile is then used). Pure bookkeeping around a callable: no torch here.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .protocol import SegmentTask


class VoiceStage:
    """Prepares voices (`prepare(ref)` -> prompt) on one thread beside the caller's, in the order they are wanted.

    `beside(fn)` runs each preparation in the engine's context for side work (torch threads, a CUDA stream);
    default: fn(). `busy` says whether a preparation is running now (tests count decode steps taken meanwhile)."""

    def __init__(self, prepare: Callable[[Any], Any], beside: Callable[[Callable[[], Any]], Any] | None = None,
                 name: str = "fishmp-voices") -> None:
        self._prepare = prepare
        self._beside = beside or (lambda fn: fn())
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._futures: OrderedDict[Any, Future] = OrderedDict()  # wanted and not taken yet, in order
        self._running = threading.Event()
        self.prepared = 0  # preparations run (tests, benchmarks)

    @property
    def busy(self) -> bool:
        return self._running.is_set()

    def want(self, refs: Iterable[Any]) -> None:
        """Queue the preparation of each voice not yet wanted (a ref already wanted or ready is not queued again)."""
        for ref in refs:
            if ref not in self._futures and self._pool is not None:
                self._futures[ref] = self._pool.submit(self._run, ref)

    def ready(self, ref: Any) -> bool:
        """The voice was wanted and its preparation has ended (well or not): `take` will not block."""
        future = self._futures.get(ref)
        return future is not None and future.done()

    def take(self, ref: Any) -> Any:
        """The prepared voice (wanting it first if it was not, and waiting for it); raises what preparing raised.
        The entry is dropped either way: the caller keeps what it needs (the worker's prompt cache)."""
        self.want([ref])
        future = self._futures[ref]
        try:
            return future.result()
        finally:
            self._futures.pop(ref, None)

    def want_waiting(self, backlog: Iterable[Any], cached: Callable[[Any], Any]) -> None:
        """Want the voices of the segments waiting in a worker's backlog that its prompt cache (`cached`) lacks."""
        self.want(t.speaker for t in backlog if isinstance(t, SegmentTask) and cached(t.speaker) is None)

    def keep_only(self, backlog: Iterable[Any]) -> None:
        """Forget the voices no segment in the backlog needs any more (their tasks failed or were handed back)."""
        needed = {t.speaker for t in backlog if isinstance(t, SegmentTask)}
        self.forget([ref for ref in self._futures if ref not in needed])

    def forget(self, refs: Iterable[Any]) -> None:
        """Drop voices no task waits for any more (their tasks failed or went back): a queued preparation is
        cancelled, a finished one discarded."""
        for ref in refs:
            future = self._futures.pop(ref, None)
            if future is not None:
                future.cancel()

    def pending(self) -> list[Any]:
        """The voices wanted and not taken, in order."""
        return list(self._futures)

    def close(self) -> None:
        """Stop after the preparation running now; queued ones are cancelled."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        self._futures.clear()

    def _run(self, ref: Any) -> Any:
        self._running.set()
        try:
            self.prepared += 1
            return self._beside(lambda: self._prepare(ref))
        finally:
            self._running.clear()
