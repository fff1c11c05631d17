"""fish-speech's `POST /v1/tts`, as its api_server answers it (0.1.0 and main's request shapes).

Body: JSON, msgpack, or a form (multipart: the fields as text, each reference audio as a file part named
`references` with its transcript in a `reference_text` field, in order). Parsed by schema.TTSRequest, upstream's
model. The voice: `reference_id` (a stored voice; it wins over `references`, as upstream) or exactly one reference.
What has no meaning here is accepted and ignored, as upstream does: `normalize`, `latency`, `use_memory_cache`
(references are always cached, by content), `chunk_length` unless streaming. `max_new_tokens` 0 (upstream: "no
limit") means fishmp's default, 1024 frames (47.6 s).

Answer: the whole file with upstream's content type and `Content-Disposition: attachment; filename=audio.<fmt>`,
plus `X-Fishmp-Suspect: true` when no take passed the take check (the best take is sent). Streaming (wav, or pcm):
the WAV header at once, then 16-bit PCM as the rows decode (streaming.py: pieces of a few frames, not whole
chunks), in order; a chunk that fails (or a stop of the server) cuts the answer off without the chunked encoding's
end, so a client sees an error, not a short 200.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import Response

from . import formats, prosody
from .bodies import MULTIPART, URLENCODED, as_list, read_fields
from .errors import ApiError
from .lines import ClientGone, LineRun, check_max_new_tokens, check_text, chunks
from .refstore import Voice
from .schema import TTSRequest, validation_detail
from .state import ServerState
from .streaming import STREAM_TYPES, audio_body

log = logging.getLogger("fishmp")
FLOAT_FIELDS = ("top_p", "repetition_penalty", "temperature")  # strict floats: a form's text must be converted


def _from_form(form: dict[str, Any]) -> dict[str, Any]:
    data = {k: v for k, v in form.items() if k not in ("references", "reference_text")}
    for key in FLOAT_FIELDS:
        if isinstance(data.get(key), str):
            try:
                data[key] = float(data[key])
            except ValueError:
                pass  # the model names it
    audios, texts = as_list(form.get("references")), as_list(form.get("reference_text"))
    if len(audios) != len(texts):
        raise ApiError(400, "invalid form", f"{len(audios)} reference files but {len(texts)} reference_text fields: "
                       "give one transcript per reference, in order")
    data["references"] = [{"audio": a, "text": t} for a, t in zip(audios, texts, strict=True)]
    return data


async def parse_request(request: Request, state: ServerState) -> TTSRequest:
    kind, body = await read_fields(request, int(state.serve.max_body_mb * 2**20))
    if kind in (MULTIPART, URLENCODED):
        body = _from_form(body)
    if not isinstance(body, dict):
        raise ApiError(400, "invalid request", f"the body must be an object with text, not {type(body).__name__}")
    try:  # beside the event loop: base64 references of several MB are decoded here
        req = await asyncio.to_thread(TTSRequest.model_validate, body)
    except ValidationError as exc:
        raise ApiError(400, "invalid request", validation_detail(exc)) from None
    request.state.prosody = prosody.fish(body, set(TTSRequest.model_fields))  # speed, volume...: prosody.py
    return req


async def voice_for(state: ServerState, reference_id: str | None, refs: list[tuple[bytes, str]],
                    what: str = "references") -> Voice:
    """The voice of a line: a stored reference_id (404 if unknown), or exactly one reference (400 otherwise)."""
    if reference_id is not None:
        try:
            return state.refs.get(reference_id)
        except ValueError as exc:
            raise ApiError(400, "invalid reference_id", str(exc)) from None
        except LookupError as exc:
            raise ApiError(404, "unknown reference_id", str(exc)) from None
    if not refs:
        raise ApiError(400, "no reference", f"give {what} (reference audio + its transcript) or a reference_id: "
                       "fishmp clones voices, it has no default voice")
    if len(refs) > 1:
        raise ApiError(400, "too many references", f"{len(refs)} references; fishmp uses one per voice: send one "
                       "(or store the voice once: POST /v1/references/add)")
    audio, text = refs[0]
    try:
        path = await asyncio.to_thread(state.refs.store_audio, audio, f"{what}[0].audio")
    except ValueError as exc:
        raise ApiError(400, "reference audio cannot be used", str(exc)) from None
    return Voice(path, text)


def sampling(req: Any) -> dict[str, Any]:
    params = {"temperature": req.temperature, "top_p": req.top_p, "repetition_penalty": req.repetition_penalty,
              "max_new_tokens": req.max_new_tokens or None, "seed": req.seed}
    return {k: v for k, v in params.items() if v is not None}


async def answer(state: ServerState, request: Request, voice: Voice, text: str, params: dict[str, Any], fmt: str,
                 stream_chunk_length: int | None = None, tone: prosody.Prosody | None = None) -> Response:
    """Run the line and answer with its audio in `fmt` (streamed as WAV when `stream_chunk_length` is set), at the
    speed, volume and sample rate of `tone` (prosody.py)."""
    tone = tone or prosody.Prosody()
    if problem := formats.unavailable(fmt):
        raise ApiError(400, "unsupported format", problem)
    if stream_chunk_length is not None:
        if tone.max_seconds is not None:
            raise ApiError(400, "max_seconds needs the whole line", "max_seconds cannot be used with streaming")
        return _stream(state, voice, chunks(text, stream_chunk_length), params, fmt, tone)
    run = LineRun(state, voice, [text], params, tone.segment_fields())
    try:
        path = await run.segment(0, request)
        body = await asyncio.to_thread(_file_body, path, fmt, tone)
    except ClientGone:
        log.info("[Serve] client disconnected: its line was cancelled")
        return Response(status_code=499)
    finally:
        run.close()
    headers = {"Content-Disposition": formats.disposition(fmt), **tone.headers()}
    if run.suspect:
        headers["X-Fishmp-Suspect"] = "true"
    return Response(body, media_type=formats.CONTENT_TYPES[fmt], headers=headers)


def _file_body(path: str, fmt: str, tone: prosody.Prosody) -> bytes:
    if fmt == "wav" and not tone.changes_audio:  # fishmp's wavs are already 16-bit mono at the model's rate
        with open(path, "rb") as f:
            return f.read()
    samples, rate = prosody.apply(formats.read_wav(path), formats.SAMPLE_RATE, tone)
    return formats.encode(samples, fmt, rate)


def _stream(state: ServerState, voice: Voice, texts: list[str], params: dict[str, Any], fmt: str,
            tone: prosody.Prosody) -> Response:
    return audio_body(LineRun(state, voice, texts, params, stream=True), fmt, tone)


async def tts(request: Request) -> Response:
    state: ServerState = request.app.state.server
    state.check_accepting()
    req = await parse_request(request, state)
    check_text(state, req.text)
    check_max_new_tokens(req.max_new_tokens)
    if req.streaming and req.format not in STREAM_TYPES:
        raise ApiError(400, "streaming needs wav", "Streaming only supports WAV format (and pcm, raw 16-bit mono)")
    voice = await voice_for(state, req.reference_id, [(r.audio, r.text) for r in req.references])
    return await answer(state, request, voice, req.text, sampling(req), req.format,
                        req.chunk_length if req.streaming else None, request.state.prosody)
