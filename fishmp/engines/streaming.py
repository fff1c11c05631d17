"""Streaming rows: when a row marked for streaming hands its frames to the codec, and how a piece's audio is cut.

A streamed row's codes go to the codec every few frames (FISH_STREAM_FIRST_FRAMES for the first piece, so the
first audio comes early; FISH_STREAM_FRAMES after), each piece decoded together with up to
FISH_STREAM_CONTEXT_FRAMES frames before it and the context's samples cut off. The codec is causal (causal
convolutions, causally masked transformers: see fishmp.engines.codec), so a piece's samples depend only on frames
up to its own; with the context covering the decoder's reach back, the pieces put together match the whole line's
decode (tiny checkpoint: 99.8 dB SNR with 4 frames of context, 105 dB with 16; 39 dB with none, where each seam
restarts the decoder cold). Hence no overlap-add is needed at the seams: they are the same samples.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StreamPlan:
    first: int = 8  # frames of a line's first piece
    every: int = 32  # frames of each later piece
    context: int = 16  # frames of left context decoded with a piece

    @classmethod
    def from_settings(cls, settings: Any) -> StreamPlan:
        if settings is None:
            return cls()
        return cls(int(getattr(settings, "stream_first_frames", cls.first)),
                   int(getattr(settings, "stream_frames", cls.every)),
                   int(getattr(settings, "stream_context_frames", cls.context)))

    def wanted(self, sent: int, earlier: int) -> int:
        """Frames a row needs beyond `sent` (of its current text chunk) before its next piece; `earlier` = frames
        of its text chunks before this one (a line's first piece is small, every other one larger)."""
        return self.first if sent == 0 and earlier == 0 else self.every


def frames_so_far(first: Any, history: Any, n: int) -> Any:
    """A live row's current chunk as (1 + codebooks, n) frames: its prefill frame, then n - 1 decoded ones."""
    import torch

    return torch.cat([first[:, None], history[:, : n - 1]], dim=1)


def trimmed(future: Future, skip: int) -> Future:
    """A future of `future`'s audio without its first `skip` samples (the left context's)."""
    out: Future = Future()

    def cut(done: Future) -> None:
        error = done.exception()
        if error is not None:
            out.set_exception(error)
        else:
            out.set_result(done.result()[skip:])

    future.add_done_callback(cut)
    return out


def submit_piece(codec: Any, row: Any, codes: Any, upto: int, context: int, frame: int) -> None:
    """A streaming row's codes [row.sent, upto) of its current chunk to the codec, with up to `context` frames before
    them, as its next piece (the context's samples cut off)."""
    start = max(0, row.sent - context)
    (future,) = codec.submit([codes[:, start:upto].clone()])
    row.pieces.append(trimmed(future, (row.sent - start) * frame))
    row.sent = upto


def hand_out(row: Any, out: list) -> None:
    """The row's pieces whose audio is ready, in order and once each, appended to `out` as (key, index, audio)."""
    while row.handed < len(row.pieces) and row.pieces[row.handed].done():
        out.append((row.key, row.handed, row.pieces[row.handed].result()))
        row.handed += 1


class StreamingRows:
    """FishBatchSession's streaming rows and dropped rows (its state: fishmp.engines.batched), kept here so that the
    session's file holds its decoding."""

    _rows: list[Any]
    _draining: list[Any]
    _starting: set[int]
    _steps: int
    _h_live: Any  # numpy bool per row
    _h_start: Any
    _live: Any  # device tensors
    _first: Any
    _history: Any
    _codec: Any  # fishmp.engines.codec.CodecQueue
    _piece_args: tuple[int, int]
    stream_plan: StreamPlan
    streamed: list[tuple[str, int, Any]]

    def _stream_live(self, done: set[int]) -> None:
        """Hand each live streaming row's new frames to the codec once there are enough of them."""
        for index, row in enumerate(self._rows):
            if row is None or not row.stream or row.pending or index in done or not self._h_live[index]:
                continue
            n = int(self._steps - self._h_start[index]) + 1  # frames so far (the prefill's + decoded); all kept
            if n - row.sent >= self.stream_plan.wanted(row.sent, row.frames):
                codes = frames_so_far(self._first[index], self._history[index], n)[1:]
                submit_piece(self._codec, row, codes, n, *self._piece_args)
        for row in (r for r in [*self._rows, *self._draining] if r is not None and r.stream):
            hand_out(row, self.streamed)

    def drop(self, key: str) -> None:
        """Forget row `key` now (its client left): its slot is free at once, its audio never comes."""
        import torch

        for index, row in enumerate(self._rows):
            if row is not None and row.key == key:
                self._rows[index], self._h_live[index] = None, False
                self._starting.discard(index)
                with torch.inference_mode():
                    self._live[index] = False
        self._draining = [row for row in self._draining if row.key != key]
