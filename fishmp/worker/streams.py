"""The worker's side of streaming: a streamed row's pieces of audio go to the main process as AudioChunk messages.

A task with `stream` set (fishmp serve's streamed lines) becomes a streaming row where the session can stream
(FishBatchSession, fishmp.engines.streaming); its pieces are sent in order as the session makes them ready, from the
generation thread, before the row's Done (which the writer thread sends later), so they reach the request first. A
session that cannot stream (the synthetic engine's SequentialSession) gives the whole take as one piece when it ends.

What a stream cannot take back once audio has left: a row redone from the start (its batch failed, same seed: the
same audio) sends only the samples beyond those already sent; a take is never retaken (lanes.py); a piece with NaN
or inf samples is not sent, nor anything after it (the writer then fails the segment `nonfinite`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .protocol import AudioChunk, SegmentTask


class StreamRelay:
    def __init__(self, worker_id: str, send: Any, sample_rate: int) -> None:
        self.worker_id, self.send, self.sample_rate = worker_id, send, sample_rate
        self.sent: dict[str, int] = {}  # task id -> samples sent (all attempts)
        self.offset: dict[str, int] = {}  # task id -> samples the current attempt has produced
        self.index: dict[str, int] = {}  # task id -> chunks sent
        self.broken: set[str] = set()  # a piece was not audio: nothing more is sent

    def added(self, session: Any, task: SegmentTask) -> dict[str, Any]:
        """The keyword arguments for session.add: stream=True where the task streams and the session can."""
        if not getattr(task, "stream", False):
            return {}
        self.sent.setdefault(task.id, 0)
        self.offset[task.id] = 0  # an attempt starts over (a redo, a retake): its audio from the start
        return {"stream": True} if getattr(session, "streams", False) else {}

    def relay(self, session: Any) -> None:
        """Send the pieces the last step made ready."""
        for key, _, audio in getattr(session, "streamed", ()):
            self._piece(key, np.asarray(audio, dtype=np.float32))

    def finish(self, task: SegmentTask, samples: Any) -> None:
        """The take is over: whatever of it was not sent yet goes now (before its Done)."""
        if task.id in self.sent:
            done = self.offset.get(task.id, 0)
            self._piece(task.id, np.asarray(samples, dtype=np.float32)[done:])

    def forget(self, task_id: str) -> None:
        for table in (self.sent, self.offset, self.index):
            table.pop(task_id, None)
        self.broken.discard(task_id)

    def _piece(self, task_id: str, audio: np.ndarray) -> None:
        if task_id not in self.sent or task_id in self.broken:
            return
        start = self.offset[task_id]
        self.offset[task_id] = start + len(audio)
        new = audio[max(0, self.sent[task_id] - start):]  # a redo: what was sent before is not sent again
        if not len(new):
            return
        if not np.isfinite(new).all():
            self.broken.add(task_id)
            return
        self.sent[task_id] += len(new)
        index = self.index.get(task_id, 0)
        self.index[task_id] = index + 1
        self.send(AudioChunk(self.worker_id, task_id, index, new, self.sample_rate))
