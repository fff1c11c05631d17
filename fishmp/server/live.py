"""The Fish Audio SDK's real-time API: WebSocket `/v1/tts/live` (`tts.stream_websocket`), msgpack frames both ways.

Client: `{"event": "start", "request": {...}}` first (the fish request: voice by `reference_id` or one of
`references`, `format`, `prosody`, sampling fields; its `text` is where the text begins), then any number of
`{"event": "text", "text"}` pieces, `{"event": "flush"}` (speak what is buffered now) and `{"event": "stop"}` (speak
the rest, then finish). Server: `{"event": "audio", "audio": bytes}` in text order, then `{"event": "finish",
"reason": "stop"}`; or `{"event": "finish", "reason": "error", "message"}` and the socket closes (1008 for a bad
request, 1011 for a failed line).

Text is cut into lines at sentence ends (livetext.py): each complete sentence starts decoding at once (a job of
its own at interactive priority, so the next sentence decodes while this one streams), and its audio is sent as
its rows decode (pcm, and wav: one header first; mp3 / opus: each line as one file once it is done), in
messages of at most 32 KiB of audio (the SDK's client refuses messages over 64 KiB).

Bounds: a frame may be at most FISH_SERVE_MAX_BODY_MB (uvicorn's ws_max_size, and checked here), the buffered text
at most FISH_SERVE_MAX_TEXT_CHARS, the lines outstanding count against FISH_SERVE_MAX_QUEUED; a socket that sends
nothing for FISH_SERVE_WS_IDLE_S while nothing is being spoken is closed (1001). A disconnect cancels its lines.
The Host, API key and Origin checks of every route run before the handshake (app.py, guards.py, browser.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import numpy as np
import ormsgpack
from pydantic import ValidationError
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from . import formats, prosody
from .errors import ApiError
from .lines import LineRun, check_max_new_tokens, check_text
from .livetext import TextBuffer
from .schema import TTSRequest, validation_detail
from .state import ServerState
from .streaming import pcm_pieces
from .tts import sampling, voice_for

log = logging.getLogger("fishmp")
# Audio per message: httpx-ws (the SDK's WebSocket client) closes the socket on a message over 64 KiB by default.
AUDIO_FRAME_BYTES = 32 * 1024


class _Refused(Exception):
    def __init__(self, message: str, code: int = 1008) -> None:
        super().__init__(message)
        self.code = code


def _unpack(message: dict, limit: int) -> dict:
    raw = message.get("bytes")
    if raw is None:
        raw = (message.get("text") or "").encode()
    if len(raw) > limit:
        raise _Refused(f"a frame of {len(raw)} bytes; this server takes at most {limit} (FISH_SERVE_MAX_BODY_MB)")
    try:
        data = ormsgpack.unpackb(raw)
    except (ormsgpack.MsgpackDecodeError, ValueError):
        raise _Refused("a frame that is not msgpack: send {\"event\": ...} packed with msgpack") from None
    if not isinstance(data, dict) or not isinstance(data.get("event"), str):
        raise _Refused("a frame without an event: send {\"event\": \"start\" | \"text\" | \"flush\" | \"stop\", ...}")
    return data


class _Session:
    def __init__(self, ws: WebSocket, state: ServerState) -> None:
        self.ws, self.state = ws, state
        self.limit = int(state.serve.max_body_mb * 2**20)
        self.lines: asyncio.Queue[LineRun | None] = asyncio.Queue()
        self.runs: list[LineRun] = []
        self.speaking = 0  # lines submitted and not yet fully sent

    async def receive(self, idle: bool) -> dict | None:
        timeout = self.state.serve.ws_idle_s if idle else None
        try:
            message = await asyncio.wait_for(self.ws.receive(), timeout)
        except asyncio.TimeoutError:
            raise _Refused(f"nothing received for {timeout:g} s (FISH_SERVE_WS_IDLE_S)", 1001) from None
        if message["type"] == "websocket.disconnect":
            return None
        return _unpack(message, self.limit)

    async def start(self) -> None:
        data = await self.receive(idle=True)
        if data is None:
            raise WebSocketDisconnect
        if data["event"] != "start" or not isinstance(data.get("request"), dict):
            raise _Refused("the first frame must be {\"event\": \"start\", \"request\": {...}}")
        body = {"text": "", **data["request"]}
        try:
            req = await asyncio.to_thread(TTSRequest.model_validate, body)
        except ValidationError as exc:
            raise _Refused(f"invalid request: {validation_detail(exc)}") from None
        try:
            self.tone = prosody.fish(body, set(TTSRequest.model_fields))
            check_max_new_tokens(req.max_new_tokens)
            if problem := formats.unavailable(req.format):
                raise ApiError(400, "unsupported format", problem)
            self.voice = await voice_for(self.state, req.reference_id, [(r.audio, r.text) for r in req.references])
        except ApiError as exc:
            raise _Refused(f"{exc.error}: {exc.detail}") from None
        self.fmt, self.params = req.format, sampling(req)
        self.text = TextBuffer(self.state.serve.max_text_chars)
        await self.say(self.text.add(req.text))

    async def say(self, lines: list[str]) -> None:
        for line in lines:
            try:
                check_text(self.state, line)
                run = LineRun(self.state, self.voice, [line], self.params, stream=True)
            except ApiError as exc:
                raise _Refused(f"{exc.error}: {exc.detail}", 1011 if exc.status >= 500 else 1008) from None
            self.runs.append(run)
            self.speaking += 1
            await self.lines.put(run)

    async def read(self) -> None:
        """Frames until `stop` (or a disconnect: then every line is cancelled)."""
        while True:
            data = await self.receive(idle=self.speaking == 0)
            if data is None:
                raise WebSocketDisconnect
            event = data["event"]
            if event == "text":
                text = data.get("text")
                if not isinstance(text, str):
                    raise _Refused("a text frame needs text, a string")
                try:
                    await self.say(self.text.add(text))
                except ValueError as exc:
                    raise _Refused(str(exc)) from None
            elif event == "flush":
                await self.say(self.text.flush())
            elif event == "stop":
                await self.say(self.text.flush())
                await self.lines.put(None)
                return
            else:
                raise _Refused(f"unknown event {event[:40]!r}: send text, flush or stop")

    async def write(self) -> None:
        """Each line's audio in order, as it decodes."""
        header = self.fmt == "wav"
        while (run := await self.lines.get()) is not None:
            try:
                if header:
                    await self._send(formats.wav_stream_header(self.tone.sample_rate or formats.SAMPLE_RATE))
                    header = False
                if self.fmt in ("wav", "pcm"):
                    async for pcm in pcm_pieces(run, self.tone):
                        await self._send(pcm)
                else:
                    whole = b"".join([pcm async for pcm in pcm_pieces(run, self.tone)])
                    samples = np.frombuffer(whole, dtype="<i2")
                    await self._send(await asyncio.to_thread(
                        formats.encode, samples, self.fmt, self.tone.sample_rate or formats.SAMPLE_RATE))
            except ApiError as exc:
                raise _Refused(f"{exc.error}: {exc.detail}", 1011) from None
            finally:
                run.close()
                self.speaking -= 1
        await self.ws.send_bytes(ormsgpack.packb({"event": "finish", "reason": "stop"}))

    async def _send(self, audio: bytes) -> None:
        for i in range(0, len(audio), AUDIO_FRAME_BYTES):
            await self.ws.send_bytes(ormsgpack.packb({"event": "audio", "audio": audio[i: i + AUDIO_FRAME_BYTES]}))

    def cancel(self) -> None:
        for run in self.runs:
            run.close()  # a line already done is only cleaned up


async def live(ws: WebSocket) -> None:
    state: ServerState = ws.app.state.server
    if state.stopping:
        await ws.close(code=1013)
        return
    await ws.accept()
    session = _Session(ws, state)
    tasks: list[asyncio.Task] = []
    try:
        await session.start()
        tasks = [asyncio.ensure_future(session.read()), asyncio.ensure_future(session.write())]
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # raises what ended it
        await tasks[1]  # the reader stopped: the writer sends the rest, then `finish`
        await ws.close()
    except _Refused as exc:
        log.info("[Serve] /v1/tts/live closed: %s", exc)
        with contextlib.suppress(Exception):
            await ws.send_bytes(ormsgpack.packb({"event": "finish", "reason": "error", "message": str(exc)}))
            await ws.close(code=exc.code)
    except (WebSocketDisconnect, RuntimeError, OSError) as exc:
        log.info("[Serve] /v1/tts/live: the client disconnected (%s); its lines were cancelled", type(exc).__name__,
                 exc_info=not isinstance(exc, WebSocketDisconnect))
    finally:
        for task in tasks:
            task.cancel()
        session.cancel()


ROUTES = [WebSocketRoute("/v1/tts/live", live)]
