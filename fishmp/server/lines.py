"""A single line (fish /v1/tts, OpenAI /v1/audio/speech) as a job on the shared pool, at interactive priority.

A line is one job of one speaker, in a directory of its own under `<data dir>/lines/` that goes once the answer
is sent. Its segments: the text whole, or, streaming, its chunks (cut at sentence ends, at most `chunk_length`
characters each) as consecutive segments that the worker decodes as rows of one batch where it has lanes. A
streamed line (`stream=True`) gets each segment's audio in pieces while its row decodes (`segment_audio` events,
fishmp.engines.streaming) and `pieces(i)` yields them in order; leaving cancels the line and frees its rows.
The voice's speaker id comes from the reference content (refstore.Voice), so a voice sent with every line is
encoded and prefilled once per worker (concurrent lines of any voices share a batch session: mixed voices).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import numpy as np

from ..engines.base import TextTooLongError
from ..engines.fish_common import split_text
from ..job import JobError, job_from_dict
from ..job.params import MAX_NEW_TOKENS_LIMIT
from .errors import ApiError
from .refstore import Voice
from .state import INTERACTIVE_PRIORITY, ServerState, Submission

INPUT_FAILURES = {"bad_reference": "reference audio cannot be used", "text_too_long": "text too long",
                  "bad_params": "bad sampling parameters"}
MIN_CHUNK, MAX_CHUNK = 50, 1000  # streamed chunk lengths outside this are clamped


class ClientGone(Exception):
    """The client disconnected: its line was cancelled."""


def check_text(state: ServerState, text: str, what: str = "text") -> None:
    limit = state.serve.max_text_chars
    if len(text) > limit:
        raise ApiError(400, "text too long", f"{what} has {len(text)} characters; this server takes at most {limit} "
                       "per request (FISH_SERVE_MAX_TEXT_CHARS)")


def check_max_new_tokens(value: int | None) -> None:
    if value is not None and value > MAX_NEW_TOKENS_LIMIT:
        raise ApiError(400, "max_new_tokens too large", f"max_new_tokens {value} is above this server's cap "
                       f"{MAX_NEW_TOKENS_LIMIT} (about {MAX_NEW_TOKENS_LIMIT / 21.5:.0f} s of audio)")


def chunks(text: str, chunk_length: int) -> list[str]:
    limit = min(MAX_CHUNK, max(MIN_CHUNK, chunk_length))
    try:
        return split_text(text, lambda t: len(t) <= limit)
    except TextTooLongError:  # one word longer than a chunk: keep the text whole
        return [text]


class LineRun:
    """A submitted line; `segment(i)` waits for chunk i's wav path."""

    def __init__(self, state: ServerState, voice: Voice, texts: list[str], params: dict[str, Any],
                 segment: dict[str, Any] | None = None, stream: bool = False) -> None:
        """`stream`: the segments' audio comes in pieces as they decode (`pieces`), not only as wavs."""
        self.state = state
        self.dir = os.path.join(state.data_dir, "lines", uuid.uuid4().hex)
        self.ids = [f"{i + 1:04d}" for i in range(len(texts))]
        data = {"speakers": {voice.speaker_id: {"reference_audio": voice.path, "reference_text": voice.text}},
                "segments": [{"id": sid, "speaker": voice.speaker_id, "text": t, "params": params, **(segment or {})}
                             for sid, t in zip(self.ids, texts, strict=True)]}
        try:
            job = job_from_dict(data, state.data_dir, self.dir)
        except JobError as exc:
            raise ApiError(400, "invalid request", exc.problems) from None
        self.results: dict[str, dict] = {}
        self.audio: dict[str, list[np.ndarray]] = {}  # streamed pieces not yet taken, per segment
        self.got: set[str] = set()  # segments some audio was streamed of
        self.changed = asyncio.Event()
        self.sub = Submission(state, job, self.dir, priority=INTERACTIVE_PRIORITY, resume=False,
                              on_event=self._on_event, stream=stream)
        state.sweeper.active_lines[self.dir] = voice.path  # until cleaned up: its directory and voice are in use
        self.suspect = False

    def _on_event(self, ev: dict) -> None:  # on the event loop (Submission)
        self.changed.set()
        if ev["event"] == "segment_audio":
            self.audio.setdefault(ev["id"], []).append(ev["samples"])
            self.got.add(ev["id"])
        if ev["event"] in ("segment_done", "segment_failed"):
            self.results[ev["id"]] = ev
            self.suspect = self.suspect or bool(ev.get("suspect"))

    async def segment(self, index: int, request: Any = None) -> str:
        """The wav of segment `index` once done. ApiError when it failed or the job ended without it; ClientGone
        (the line cancelled) when `request` says its client disconnected."""
        sid = self.ids[index]
        while sid not in self.results:
            if self.sub.over():
                raise self._ended_without(sid)
            await self.sub.wait_changed(0.5)
            if request is not None and sid not in self.results and await request.is_disconnected():
                self.sub.cancel()
                raise ClientGone
        return self._outcome(sid)

    async def pieces(self, index: int, gone: Callable[[], Awaitable[bool]] | None = None
                     ) -> AsyncIterator[np.ndarray]:
        """Segment `index`'s audio (float32, the model's rate) piece by piece as it decodes, until it is done.
        ApiError when it failed or the job ended without it; ClientGone (the line cancelled) when `gone()` says the
        client left. A segment that was not streamed (a cached one) comes whole, read from its wav."""
        sid = self.ids[index]
        while True:
            self.changed.clear()
            while self.audio.get(sid):
                yield self.audio[sid].pop(0)
            if sid in self.results:
                path = self._outcome(sid)
                if sid not in self.got:
                    from .formats import read_wav

                    yield (await asyncio.to_thread(read_wav, path)).astype(np.float32) / 32768.0
                return
            if self.sub.over():
                raise self._ended_without(sid)
            try:
                await asyncio.wait_for(self.changed.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            if gone is not None and sid not in self.results and await gone():
                self.sub.cancel()
                raise ClientGone

    def _outcome(self, sid: str) -> str:
        ev = self.results[sid]
        if ev["event"] == "segment_failed":
            kind = ev.get("kind", "")
            status = 400 if kind in INPUT_FAILURES else 500
            raise ApiError(status, INPUT_FAILURES.get(kind, "synthesis failed"), f"{kind}: {ev.get('error')}")
        return ev["path"]

    def _ended_without(self, sid: str) -> ApiError:
        exc = self.sub.error()
        if self.state.stopping or (self.sub.finished or {}).get("interrupted"):
            return ApiError(503, "shutting down", "the server stopped before this line was done: retry")
        return ApiError(500, "synthesis failed", f"segment {sid} was not made: {exc or 'the job ended'}")

    def close(self) -> None:
        """Cancel what is left and remove the line's directory once the pool has let go of it (in the background)."""
        if len(self.results) < len(self.ids):  # a done job ends by itself; cancelling it would only log a warning
            self.sub.cancel()

        async def cleanup() -> None:
            await self.sub.ended()
            shutil.rmtree(self.dir, ignore_errors=True)
            self.state.sweeper.active_lines.pop(self.dir, None)  # a wav written after this is swept (sweep.py)

        self.state.background(cleanup())


def clean_lines(data_dir: str) -> None:
    """At start: lines left by a server that was killed (their clients are gone)."""
    shutil.rmtree(os.path.join(data_dir, "lines"), ignore_errors=True)
