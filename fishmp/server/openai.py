"""OpenAI's `POST /v1/audio/speech` and `GET /v1/models`, with the voice-cloning fields the Fish serving engines
accept there (vllm-omni, sglang-omni) and VideoLingo sends.

The voice, first found wins: `ref_audio` (base64 or a data URL; needs `ref_text`), `references[0]` (`audio` as
base64 or a data URL, or `audio_path`: a file on this server, only inside --root), then `voice` as a stored
reference id (a string, or {"id": ...}). `model` is accepted and not checked (the server has one model);
`instructions` is ignored. Streaming (streaming.py): `pcm` always comes as the rows decode, `wav` too with
`stream_format: "audio"`; `stream_format: "sse"` (pcm or wav) sends `speech.audio.delta` / `speech.audio.done`
events. `speed` (0.25-4.0) and fishmp's `max_seconds` (whole file only) are applied (prosody.py).
`response_format` defaults to mp3, as OpenAI's does; aac is not available.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import prosody
from .bodies import JSON, read_object
from .errors import ApiError
from .lines import LineRun, check_max_new_tokens, check_text
from .paths import inside_root, read_regular_file
from .refstore import decode_audio_string
from .schema import SpeechRequest, validation_detail
from .state import ServerState
from .streaming import STREAM_TYPES, audio_body, sse_body
from .tts import answer, sampling, voice_for


def _voice_id(voice: Any) -> str | None:
    if isinstance(voice, dict):
        voice = voice.get("id")
    return voice if isinstance(voice, str) and voice else None


async def _reference(state: ServerState, req: SpeechRequest) -> tuple[str | None, list[tuple[bytes, str]], str]:
    """(stored reference id, [(audio, transcript)], which field) of the request's voice."""
    if req.ref_audio is not None:
        if not req.ref_text:
            raise ApiError(400, "ref_text missing", "ref_audio needs ref_text, the transcript of the reference audio")
        return None, [(await _decode(req.ref_audio, "ref_audio"), req.ref_text)], "ref_audio"
    if req.references:
        ref = req.references[0]
        if not ref.text:
            raise ApiError(400, "reference text missing", "references[0] needs text, the transcript of its audio")
        if ref.audio is not None:
            return None, [(await _decode(ref.audio, "references[0].audio"), ref.text)], "references"
        if ref.audio_path is not None:
            path = inside_root(state.root, ref.audio_path, "references[0].audio_path")
            limit = int(state.serve.max_body_mb * 2**20)
            audio = await asyncio.to_thread(read_regular_file, path, "references[0].audio_path", limit)
            return None, [(audio, ref.text)], "references"
        raise ApiError(400, "reference audio missing", "references[0] needs audio (base64 or a data URL) or audio_path")
    ref_id = _voice_id(req.voice)
    if ref_id is None:
        raise ApiError(400, "no reference", "give ref_audio + ref_text, references, or voice (a stored reference id): "
                       "fishmp clones voices, it has no default voice")
    return ref_id, [], "voice"


async def _decode(value: str, what: str) -> bytes:
    try:  # beside the event loop: several MB of base64
        return await asyncio.to_thread(decode_audio_string, value, what)
    except ValueError as exc:
        raise ApiError(400, "reference audio cannot be used", str(exc)) from None


async def speech(request: Request) -> Response:
    state: ServerState = request.app.state.server
    state.check_accepting()
    body = await read_object(request, (JSON,))
    if not isinstance(body, dict):
        raise ApiError(400, "invalid request", "the body must be a JSON object with input")
    try:
        req = SpeechRequest.model_validate(body)
    except ValidationError as exc:
        raise ApiError(400, "invalid request", validation_detail(exc)) from None
    tone = prosody.openai(body, req.speed, set(SpeechRequest.model_fields))  # speed, max_seconds (prosody.py)
    streamed = req.stream_format == "sse" or (req.response_format == "pcm" and tone.max_seconds is None) or \
        (req.stream_format == "audio" and req.response_format == "wav")
    if req.stream_format == "sse" and req.response_format not in STREAM_TYPES:
        raise ApiError(400, "stream_format needs pcm or wav", f"stream_format \"sse\" sends pcm or wav pieces, not "
                       f"{req.response_format}: set response_format to pcm (or wav)")
    if streamed and tone.max_seconds is not None and req.stream_format is not None:
        raise ApiError(400, "max_seconds needs the whole line", "max_seconds cannot be used with stream_format")
    if req.response_format == "aac":
        raise ApiError(400, "unsupported format", "aac is not available; use wav, pcm, flac, mp3 or opus")
    check_text(state, req.input, "input")
    check_max_new_tokens(req.max_new_tokens)
    ref_id, refs, what = await _reference(state, req)
    voice = await voice_for(state, ref_id, refs, what)
    if streamed:  # pcm (and wav with stream_format "audio") as the rows decode; sse: base64 events (streaming.py)
        run = LineRun(state, voice, [req.input], sampling(req), stream=True)
        if req.stream_format == "sse":
            return sse_body(run, req.response_format, tone, len(req.input))
        return audio_body(run, req.response_format, tone)
    return await answer(state, request, voice, req.input, sampling(req), req.response_format, tone=tone)


async def models(request: Request) -> Response:
    state: ServerState = request.app.state.server
    name = os.path.basename(os.path.normpath(state.settings.checkpoint_dir)) if state.settings.engine == "fish" \
        else state.settings.engine
    return JSONResponse({"object": "list", "data": [{"id": name, "object": "model", "owned_by": "fishmp",
                                                     "created": 0}]})
