"""Streaming that streams (issue 33), against a real `fishmp serve` on loopback with the tiny checkpoint and the real
clients: fish `/v1/tts` `streaming: true`, OpenAI's SSE (parsed by the OpenAI client's own SSE decoder), the Fish
Audio SDK's `stream_websocket` and `voices.list()` unmodified, the WebSocket's refusals, and a disconnect.

Tolerance (docs/server.md#streaming): the streamed PCM of a seeded line against the same line's whole wav: the same
length (the tiny model never stops: max_new_tokens - 1 frames) and >= 30 dB SNR (measured ~100 dB: the codec is
causal and each piece is decoded with 16 frames of left context)."""

from __future__ import annotations

import base64
import io
import json
import os
import time

import numpy as np
import pytest
import soundfile as sf
from serve_helpers import Server, wav_bytes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
VOICE = wav_bytes(2.0, 140.0, seed=5, rate=44100)
KEY = "stream-key"
FRAMES = 60  # max_new_tokens: the tiny model never stops, so a line is FRAMES - 1 frames (2.7 s)
LINE = "A streamed line comes out in pieces while it decodes."


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("serve-stream")
    env = {"FISH_ENGINE": "fish", "FISH_CHECKPOINT_DIR": tiny_checkpoint, "FISH_CPU_WORKERS": "1",
           "FISH_MULTIPROCESS_MODE": "true", "FISH_BATCH_SIZE": "2", "FISH_TAKE_CHECK": "false",
           "FISH_PRECISION": "float32", "FISH_CACHE_DIR": str(tmp / "cache"), "FISH_SHUTDOWN_GRACE_S": "5",
           "FISH_SERVE_MAX_REFERENCE_S": "500", "FISH_SERVE_WS_IDLE_S": "2", "FISH_SERVE_MAX_TEXT_CHARS": "300"}
    srv = Server(tmp, env, api_key=KEY).wait_ready(timeout=300)
    r = srv.post("/v1/references/add", data={"id": "narrator", "text": "A reference."},
                 files={"audio": ("ref.wav", VOICE, "audio/wav")})
    assert r.status_code == 200, r.text
    yield srv
    assert srv.stop() == 0, srv.log()


def body(**fields: object) -> dict:
    return {"text": LINE, "max_new_tokens": FRAMES, "seed": 7, "reference_id": "narrator", **fields}


def whole(server: Server) -> np.ndarray:
    r = server.post("/v1/tts", json=body())
    assert r.status_code == 200, r.text
    return sf.read(io.BytesIO(r.content), dtype="int16")[0].astype(np.float64)


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    n = min(len(ref), len(got))
    err = ref[:n] - got[:n]
    return float(10 * np.log10((ref ** 2).sum() / max(float((err ** 2).sum()), 1e-9)))


def test_fish_streaming_sends_pcm_as_it_decodes_and_matches_the_whole_line(server: Server) -> None:
    ref = whole(server)
    t0 = time.monotonic()
    arrivals: list[tuple[float, int]] = []
    with server.session.post(server.url("/v1/tts"), json=body(streaming=True, format="pcm"), stream=True,
                             timeout=300) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "application/octet-stream"
        data = b""
        for part in r.iter_content(chunk_size=None):
            data += part
            arrivals.append((time.monotonic() - t0, len(data)))
    total = arrivals[-1][0]
    got = np.frombuffer(data, "<i2").astype(np.float64)
    assert len(got) == len(ref) == (FRAMES - 1) * 2048  # same length (within one frame: exactly here)
    assert snr_db(ref, got) >= 30.0
    first_t, first_n = arrivals[0]
    assert len(arrivals) >= 3 and first_n <= len(data) // 2  # pieces, the first small
    assert first_t < total / 2, arrivals  # the first audio before half the line's time
    print(f"\nstreamed pcm: first audio {first_t:.2f} s, whole line {total:.2f} s, SNR {snr_db(ref, got):.1f} dB")


def test_openai_sse_parsed_by_the_openai_client(server: Server) -> None:
    pytest.importorskip("openai", reason="openai is not installed (the dev extra has it)")
    from openai import OpenAI
    from openai._streaming import SSEDecoder

    ref = whole(server)
    client = OpenAI(api_key=KEY, base_url=server.url("/v1"))
    extra = {"voice": "narrator", "seed": 7, "max_new_tokens": FRAMES}
    with client.audio.speech.with_streaming_response.create(model="s1", voice="narrator", input=LINE,
                                                            response_format="pcm", stream_format="sse",
                                                            extra_body=extra) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(sse.data) for sse in SSEDecoder().iter_bytes(response.iter_bytes())]
    deltas = [e for e in events if e["type"] == "speech.audio.delta"]
    assert len(deltas) >= 2 and events[-1]["type"] == "speech.audio.done" and "usage" in events[-1]
    got = np.frombuffer(b"".join(base64.b64decode(e["audio"]) for e in deltas), "<i2").astype(np.float64)
    assert len(got) == len(ref) and snr_db(ref, got) >= 30.0
    r = server.post("/v1/audio/speech", json={"input": LINE, "voice": "narrator", "stream_format": "sse"})
    assert r.status_code == 400 and "pcm" in r.json()["detail"]  # mp3 (the default) cannot be sent in pieces


def test_the_fish_audio_sdk_streams_over_the_websocket_and_lists_voices(server: Server) -> None:
    pytest.importorskip("fishaudio", reason="fish-audio-sdk is not installed (the dev extra has it)")
    from fishaudio import FishAudio
    from fishaudio.types import TTSConfig

    client = FishAudio(api_key=KEY, base_url=server.url(""))
    voices = client.voices.list()
    assert voices.total == 1 and voices.items[0].id == "narrator" and voices.items[0].description == "A reference."

    def text():
        yield "Hello there, "
        yield "this is a streamed sentence. And "
        yield "a second one"

    config = TTSConfig(format="pcm", max_new_tokens=FRAMES // 2, top_p=0.7, temperature=0.7)
    pieces = list(client.tts.stream_websocket(text(), reference_id="narrator", config=config))
    audio = b"".join(pieces)
    assert len(pieces) >= 3  # two lines (cut at the sentence end), each in pieces
    assert len(audio) == 2 * (FRAMES // 2 - 1) * 2048 * 2


def _ws(server: Server, headers: dict[str, str], frames: list[bytes] | None = None, host: str | None = None):
    """Open /v1/tts/live with httpx-ws (the SDK's WebSocket client); (handshake status or 101, messages)."""
    import httpx
    import ormsgpack
    from httpx_ws import WebSocketDisconnect, WebSocketUpgradeError, connect_ws

    url = server.url("/v1/tts/live")
    if host:
        headers = {**headers, "Host": host}
    got = []
    with httpx.Client(timeout=60) as http:
        try:
            with connect_ws(url, http, headers=headers) as ws:
                for frame in frames or []:
                    ws.send_bytes(frame)
                try:
                    while True:
                        got.append(ormsgpack.unpackb(ws.receive_bytes(timeout=30)))
                except (WebSocketDisconnect, Exception):  # noqa: BLE001 - the server closed it
                    return 101, got
        except WebSocketUpgradeError as exc:
            return exc.response.status_code, got


def test_the_websocket_passes_the_checks_of_every_route(server: Server) -> None:
    import ormsgpack

    auth = {"Authorization": f"Bearer {KEY}"}
    start = ormsgpack.packb({"event": "start", "request": {"text": "", "reference_id": "narrator", "format": "pcm"}})
    assert _ws(server, {})[0] == 401  # no key
    assert _ws(server, {"Authorization": "Bearer wrong"})[0] == 401
    assert _ws(server, {**auth, "Origin": "https://evil.example"})[0] == 403  # cross-site WebSocket hijacking
    assert _ws(server, auth, host="evil.example")[0] == 400  # DNS rebinding
    status, got = _ws(server, {**auth, "Origin": f"http://127.0.0.1:{server.port}"}, [start])  # its own page: ok
    assert status == 101 and got[-1]["event"] == "finish" and "FISH_SERVE_WS_IDLE_S" in got[-1]["message"]
    big = ormsgpack.packb({"event": "text", "text": "x" * 400})  # 400 characters, no sentence end (limit 300)
    status, got = _ws(server, auth, [start, big])
    assert got[-1] == {"event": "finish", "reason": "error", "message": got[-1]["message"]}
    assert "FISH_SERVE_MAX_TEXT_CHARS" in got[-1]["message"]
    status, got = _ws(server, auth, [b"\xc1"])  # a byte msgpack never uses
    assert got[-1]["reason"] == "error" and "msgpack" in got[-1]["message"]
    status, got = _ws(server, auth, [ormsgpack.packb({"event": "text", "text": "no start first."})])
    assert got[-1]["reason"] == "error" and "start" in got[-1]["message"]


def test_a_disconnect_mid_stream_cancels_the_line_and_leaves_nothing(server: Server) -> None:
    lines = server.data_dir / "lines"
    with server.session.post(server.url("/v1/tts"), json=body(streaming=True, max_new_tokens=1000, seed=3),
                             stream=True, timeout=300) as r:
        assert r.status_code == 200
        pieces = r.iter_content(chunk_size=None)
        assert len(next(pieces) + next(pieces)) > 44  # the header and the first audio, then the client goes
        mine = set(os.listdir(lines))  # the line's directory, while it runs
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        busy = server.get("/metrics").text
        running = [ln for ln in busy.splitlines() if ln.startswith("fishmp_segments_running")]
        if (not lines.exists() or not os.listdir(lines)) and all(ln.endswith(" 0.0") for ln in running):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"the line was not cancelled and cleaned up: {os.listdir(lines)} {running}")
    assert "cancelled" in server.log() or "disconnect" in server.log()
    assert server.post("/v1/tts", json=body(max_new_tokens=8)).status_code == 200  # the worker is fine
    time.sleep(1)
    assert not mine & set(os.listdir(lines))  # the dropped row wrote nothing late (no wav after the clean-up)
