"""Streamed answers: a line's audio sent as its rows decode (fishmp.engines.streaming makes the pieces).

- `pcm_pieces`: a line's segments (its text chunks, in order), each piece as 16-bit mono PCM bytes at the prosody's
  rate. Speed, volume and sample rate are applied piece by piece (a changed speed stretches each piece alone).
- `audio_body`: fish `/v1/tts` `streaming: true` (wav: upstream's 44-byte header with length 0 first; pcm: bare PCM)
  and OpenAI `/v1/audio/speech` with `pcm` / `wav` (`stream_format` "audio" or absent).
- `sse_body`: OpenAI's `stream_format: "sse"`: `data: {"type": "speech.audio.delta", "audio": <base64>}` events, then
  `data: {"type": "speech.audio.done", "usage": {...}}`.
A disconnect cancels the generator (Starlette), whose `finally` cancels the line's rows and removes its files. An
error after the first byte cuts the answer off (no chunked end; SSE: an `error` event first), so a client sees it.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
from starlette.responses import Response, StreamingResponse

from . import formats, prosody
from .errors import ApiError
from .lines import LineRun

log = logging.getLogger("fishmp")
STREAM_TYPES = ("wav", "pcm")  # formats sent in pieces (content types as for the whole file: formats.py)


def to_int16(samples: np.ndarray) -> np.ndarray:
    """float32 in [-1, 1] -> int16 as the worker's wav writer (libsndfile) scales it, so streamed and stored agree."""
    return np.rint(np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0) * 32767).astype(np.int16)


async def pcm_pieces(run: LineRun, tone: prosody.Prosody) -> AsyncIterator[bytes]:
    for i in range(len(run.ids)):
        async for piece in run.pieces(i):
            pcm = prosody.apply(to_int16(piece), formats.SAMPLE_RATE, tone)[0] if tone.changes_audio \
                else to_int16(piece)
            if len(pcm):
                yield pcm.astype("<i2").tobytes()


def _rate(tone: prosody.Prosody) -> int:
    return tone.sample_rate or formats.SAMPLE_RATE


def audio_body(run: LineRun, fmt: str, tone: prosody.Prosody, headers: dict[str, str] | None = None) -> Response:
    async def body() -> AsyncIterator[bytes]:
        try:
            if fmt == "wav":
                yield formats.wav_stream_header(_rate(tone))
            async for pcm in pcm_pieces(run, tone):
                yield pcm
        except ApiError as exc:  # the header is out: the answer is cut (no chunked end), so the client sees it
            log.error("[Serve] streaming line ended early: %s: %s", exc.error, exc.detail)
            raise
        finally:
            run.close()

    return StreamingResponse(body(), media_type=formats.CONTENT_TYPES[fmt],
                             headers={"Content-Disposition": formats.disposition(fmt), **tone.headers(), **(headers or {})})


def sse_body(run: LineRun, fmt: str, tone: prosody.Prosody, text_chars: int) -> Response:
    def event(data: dict[str, Any]) -> bytes:
        return f"data: {json.dumps(data)}\n\n".encode()

    async def body() -> AsyncIterator[bytes]:
        samples = 0
        try:
            if fmt == "wav":
                yield event({"type": "speech.audio.delta", "audio": base64.b64encode(
                    formats.wav_stream_header(_rate(tone))).decode()})
            async for pcm in pcm_pieces(run, tone):
                samples += len(pcm) // 2
                yield event({"type": "speech.audio.delta", "audio": base64.b64encode(pcm).decode()})
            yield event({"type": "speech.audio.done", "usage": {
                "input_tokens": text_chars, "output_tokens": samples, "total_tokens": text_chars + samples}})
        except ApiError as exc:
            log.error("[Serve] streaming line ended early: %s: %s", exc.error, exc.detail)
            yield event({"type": "error", "error": {"message": f"{exc.error}: {exc.detail}"}})
            raise
        finally:
            run.close()

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", **tone.headers()})
