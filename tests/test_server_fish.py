"""`fishmp serve` as the clients that exist call it (issue 23): fish-speech's /v1/tts in JSON (pyvideotrans), msgpack
(fish's own client) and multipart, its formats and streaming, the references API, OpenAI's speech route, the API key,
every limit, the queue bound, a client that disconnects, and 32 concurrent lines in 4 voices. One real server process
(synthetic engine, 2 workers x 4 lanes) for the module, a real HTTP client (requests; http.client for raw bodies)."""

from __future__ import annotations

import concurrent.futures
import http.client
import io
import json
import os
import time
import wave

import ormsgpack
import pytest
import requests
import soundfile as sf
from serve_helpers import KEY, Server, b64, data_url, dominant_hz, synthetic_env, wav_bytes

pytestmark = pytest.mark.timeout(300)
MAX_TEXT, MAX_BODY_MB, MAX_QUEUED = 300, 1, 40


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-fish")
    srv = Server(tmp, synthetic_env(tmp, FISH_BATCH_SIZE="4", FISH_SERVE_MAX_TEXT_CHARS=str(MAX_TEXT),
                                    FISH_SERVE_MAX_BODY_MB=str(MAX_BODY_MB), FISH_SERVE_MAX_QUEUED=str(MAX_QUEUED),
                                    FISH_SHUTDOWN_GRACE_S="1"), api_key=KEY).wait_ready(workers=2)
    yield srv
    assert srv.stop() == 0, srv.log()


VOICE = wav_bytes(1.0, 140.0, seed=1)


def tts(server: Server, text: str = "Hello there, this is a line.", **fields) -> requests.Response:
    body = {"text": text, "references": [{"audio": b64(VOICE), "text": "I am the reference."}], **fields}
    return server.post("/v1/tts", json=body)


def error_of(r: requests.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error", "detail"} and body["error"], body
    return body


def audio_seconds(wav: bytes) -> float:
    info = sf.info(io.BytesIO(wav))
    return info.frames / info.samplerate


# -- fish-compatible ------------------------------------------------------------------------------------------------
def test_health_without_key_and_everything_else_needs_it(server) -> None:
    health = requests.get(server.url("/v1/health"), timeout=30)
    assert health.status_code == 200 and health.json() == {"status": "ok", "workers_ready": 2}
    assert requests.post(server.url("/v1/health"), timeout=30).json()["status"] == "ok"
    for method, path in [("POST", "/v1/tts"), ("GET", "/v1/references/list"), ("GET", "/metrics"), ("GET", "/v1/jobs"),
                         ("POST", "/v1/audio/speech"), ("GET", "/v1/models")]:
        bare = requests.request(method, server.url(path), timeout=30)
        assert error_of(bare, 401)["error"] == "unauthorized" and bare.headers["WWW-Authenticate"] == "Bearer"
        wrong = requests.request(method, server.url(path), headers={"Authorization": "Bearer nope"}, timeout=30)
        assert wrong.status_code == 401
    assert server.get("/v1/references/list").status_code == 200
    lower = requests.get(server.url("/v1/references/list"), headers={"Authorization": f"bearer {KEY}"}, timeout=30)
    assert lower.status_code == 200  # the scheme in any case, as HTTP says


def test_json_as_pyvideotrans_sends_it(server) -> None:
    r = tts(server)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/wav"
    assert r.headers["content-disposition"] == "attachment; filename=audio.wav"
    with wave.open(io.BytesIO(r.content)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 44100) and w.getnframes() > 0
    assert "x-fishmp-suspect" not in r.headers


def test_msgpack_as_fish_client_sends_it(server) -> None:
    body = {"text": "Msgpack line.", "references": [{"audio": VOICE, "text": "I am the reference."}],
            "reference_id": None, "format": "wav", "max_new_tokens": 1024, "chunk_length": 300, "top_p": 0.8,
            "repetition_penalty": 1.1, "temperature": 0.8, "streaming": False, "use_memory_cache": "off", "seed": 3,
            "latency": "normal", "normalize": True}
    r = server.post("/v1/tts", data=ormsgpack.packb(body), headers={"content-type": "application/msgpack"})
    assert r.status_code == 200, r.text
    assert audio_seconds(r.content) > 0.3
    seeded = server.post("/v1/tts", data=ormsgpack.packb(body), headers={"content-type": "application/msgpack"})
    assert seeded.content == r.content  # the same voice, text and seed: the same audio


def test_multipart(server) -> None:
    r = server.post("/v1/tts", data={"text": "A multipart line.", "reference_text": "I am the reference.",
                                     "top_p": "0.7", "format": "flac"},
                    files={"references": ("ref.wav", VOICE, "audio/wav")})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "audio/flac" and audio_seconds(r.content) > 0.3


@pytest.mark.parametrize("fmt, content_type", [("pcm", "application/octet-stream"), ("mp3", "audio/mpeg"),
                                                ("opus", "audio/ogg"), ("flac", "audio/flac")])
def test_formats(server, fmt, content_type) -> None:
    wav = tts(server, "One line in two formats.").content
    r = tts(server, "One line in two formats.", format=fmt)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == content_type
    assert r.headers["content-disposition"] == f"attachment; filename=audio.{fmt}"
    if fmt == "pcm":
        assert r.content == wav[44:]  # the wav's 16-bit samples, raw
    else:
        assert abs(audio_seconds(r.content) - audio_seconds(wav)) < 0.1


def test_streaming_sends_the_header_then_pcm_in_text_order(server) -> None:
    text = " ".join(f"This is sentence number {i} of the streamed line, long enough to be a chunk." for i in range(4))
    with server.session.post(server.url("/v1/tts"), json={"text": text, "streaming": True, "chunk_length": 100,
                                                          "references": [{"audio": b64(VOICE), "text": "Ref."}]},
                             stream=True, timeout=120) as r:
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav"
        pieces = list(r.iter_content(chunk_size=None))
    body = b"".join(pieces)
    header = body[:44]
    assert header[:4] == b"RIFF" and header[8:12] == b"WAVE" and int.from_bytes(header[40:44], "little") == 0
    with wave.open(io.BytesIO(header)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 44100)
    whole = tts(server, text).content
    pcm = body[44:]
    # 4 chunks of 0.06 s per character (synthetic): the same audio length as the line whole, within a frame a chunk
    assert len(pcm) % 2 == 0 and abs(len(pcm) - (len(whole) - 44)) < 4 * 2 * 2048


def test_references_add_list_use_update_delete(server) -> None:
    voice = wav_bytes(1.2, 180.0, seed=7)
    add = server.post("/v1/references/add", data={"id": "narrator_1", "text": "I narrate."},
                      files={"audio": ("n.wav", voice, "audio/wav")})
    assert add.status_code == 200, add.text
    assert add.json() == {"success": True, "message": "Reference voice 'narrator_1' added successfully",
                          "reference_id": "narrator_1"}
    again = server.post("/v1/references/add", data={"id": "narrator_1", "text": "x"}, files={"audio": ("n.wav", voice)})
    assert error_of(again, 409)["error"] == "reference exists"
    assert "narrator_1" in server.get("/v1/references/list").json()["reference_ids"]
    by_id = server.post("/v1/tts", json={"text": "Said by a stored voice.", "reference_id": "narrator_1"})
    inline = server.post("/v1/tts", json={"text": "Said by a stored voice.",
                                          "references": [{"audio": b64(voice), "text": "I narrate."}]})
    assert by_id.status_code == 200 and abs(dominant_hz(by_id.content) - dominant_hz(inline.content)) < 1.0
    renamed = server.post("/v1/references/update", json={"old_reference_id": "narrator_1",
                                                         "new_reference_id": "narrator-2"})
    assert renamed.status_code == 200 and renamed.json()["new_reference_id"] == "narrator-2"
    assert error_of(server.post("/v1/tts", json={"text": "x", "reference_id": "narrator_1"}), 404)
    gone = server.delete("/v1/references/delete", json={"reference_id": "narrator-2"})
    assert gone.status_code == 200 and "narrator-2" not in server.get("/v1/references/list").json()["reference_ids"]
    assert error_of(server.delete("/v1/references/delete", json={"reference_id": "narrator-2"}), 404)


@pytest.mark.parametrize("bad_id", ["../../etc/passwd", "a/b", "x" * 65, "", "dot.dot", "sp ace"])
def test_a_reference_id_is_a_name_never_a_path(server, bad_id) -> None:
    add = server.post("/v1/references/add", data={"id": bad_id, "text": "t"}, files={"audio": ("a.wav", VOICE)})
    assert add.status_code == 400, add.text
    use = server.post("/v1/tts", json={"text": "x", "reference_id": bad_id})
    assert use.status_code in (400, 404) and "reference_id" in json.dumps(use.json())
    assert not list(server.tmp.glob("**/passwd*"))


# -- OpenAI ------------------------------------------------------------------------------------------------------
def test_openai_speech_with_the_engines_cloning_fields(server) -> None:
    for body in ({"model": "tts-1", "input": "An OpenAI line.", "ref_audio": data_url(VOICE), "ref_text": "Ref.",
                  "response_format": "wav"},
                 {"input": "An OpenAI line.", "ref_audio": b64(VOICE), "ref_text": "Ref.", "response_format": "wav"},
                 {"input": "An OpenAI line.", "response_format": "wav",
                  "references": [{"audio": data_url(VOICE), "text": "Ref."}]}):  # VideoLingo's shape
        r = server.post("/v1/audio/speech", json=body)
        assert r.status_code == 200 and r.headers["content-type"] == "audio/wav", r.text
    mp3 = server.post("/v1/audio/speech", json={"input": "Default format.", "ref_audio": data_url(VOICE),
                                                "ref_text": "Ref."})
    assert mp3.status_code == 200 and mp3.headers["content-type"] == "audio/mpeg"
    server.post("/v1/references/add", data={"id": "oa", "text": "Ref."}, files={"audio": ("a.wav", VOICE)})
    for voice in ("oa", {"id": "oa"}):
        assert server.post("/v1/audio/speech", json={"input": "By voice.", "voice": voice}).status_code == 200
    assert "speed" in error_of(server.post("/v1/audio/speech", json={"input": "x", "voice": "oa", "speed": 5.0}),
                               400)["error"]  # 0.25-4.0 are applied (tests/test_fit_serve.py)
    assert "ref_text" in error_of(server.post("/v1/audio/speech", json={"input": "x", "ref_audio": data_url(VOICE)}),
                                  400)["error"]
    assert error_of(server.post("/v1/audio/speech", json={"input": "x", "voice": "alloy"}), 404)
    assert error_of(server.post("/v1/audio/speech", json={"input": "x", "references": [
        {"audio_path": "/etc/hostname", "text": "t"}]}), 400)["error"] == "file paths not allowed"
    models = server.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["object"] == "model"


# -- limits and bad input ---------------------------------------------------------------------------------------------
def test_bad_requests_get_a_json_error_naming_the_problem(server) -> None:
    assert "300" in error_of(tts(server, "x" * (MAX_TEXT + 1)), 400)["detail"]
    assert "8192" in error_of(tts(server, max_new_tokens=100000), 400)["detail"]
    assert "top_p" in json.dumps(error_of(tts(server, top_p=1.5), 400))
    assert "WAV" in error_of(tts(server, streaming=True, format="mp3"), 400)["detail"]
    assert "no reference" == error_of(server.post("/v1/tts", json={"text": "x"}), 400)["error"]
    assert error_of(server.post("/v1/tts", json={"text": "x", "reference_id": "nobody"}), 404)
    assert error_of(server.post("/v1/tts", data="{not json", headers={"content-type": "application/json"}),
                    400)["error"] == "invalid JSON"
    r = server.post("/v1/tts", data="text=x", headers={"content-type": "text/plain"})
    assert error_of(r, 415) and "application/msgpack" in r.headers["accept"]
    assert error_of(server.get("/v1/nope"), 404)["error"] == "not found"
    two = {"text": "x", "references": [{"audio": b64(VOICE), "text": "a"}, {"audio": b64(VOICE), "text": "b"}]}
    assert error_of(server.post("/v1/tts", json=two), 400)["error"] == "too many references"
    by_path = {"speakers": {"a": {"reference_audio": "/etc/hostname", "reference_text": "t"}},
               "segments": [{"speaker": "a", "text": "x"}]}
    assert error_of(server.post("/v1/jobs", json=by_path), 400)["error"] == "file paths not allowed"  # no --root


@pytest.mark.parametrize("audio, says", [
    (wav_bytes(1.0, rate=16000)[:44] + b"\x00" * 32000, "silent"),
    (wav_bytes(0.2), "0.20 s long"),
    (b"this is not audio at all, " * 20, "cannot read"),
])
def test_bad_reference_audio_is_a_400_naming_it(server, audio, says) -> None:
    body = error_of(server.post("/v1/tts", json={"text": "x", "references": [{"audio": b64(audio), "text": "t"}]}), 400)
    assert says in body["detail"] and "references[0].audio" in body["detail"], body


def test_body_over_the_limit_is_refused_from_content_length_before_it_is_read(server) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    conn.putrequest("POST", "/v1/tts")
    conn.putheader("Authorization", f"Bearer {KEY}")
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(60 * 2**20))
    conn.endheaders()  # not one byte of the body is sent
    r = conn.getresponse()
    body = json.loads(r.read())
    assert r.status == 413 and r.getheader("connection") == "close" and "Content-Length" in body["detail"]
    conn.close()


def test_a_chunked_body_is_cut_off_at_the_limit(server) -> None:
    sent = [0]

    def chunks():
        piece = b" " * 65536
        while sent[0] < 3 * MAX_BODY_MB * 2**20:
            sent[0] += len(piece)
            yield piece

    r = server.post("/v1/tts", data=chunks(), headers={"content-type": "application/json"})  # chunked: no length
    assert r.status_code == 413 and "grew past the limit" in r.json()["detail"] and r.headers["connection"] == "close"
    assert tts(server).status_code == 200  # and the server is fine


def test_queue_bound_gives_429_with_retry_after(server) -> None:
    film = {"speakers": {"a": {"reference_audio": data_url(VOICE), "reference_text": "Ref."}},
            "segments": [{"id": f"f{i}", "speaker": "a", "text": f"Film line {i}. @@slow=0.5@@"}
                         for i in range(MAX_QUEUED)]}
    job = server.post("/v1/jobs", json=film)
    assert job.status_code == 202, job.text
    r = tts(server)
    body = error_of(r, 429)
    assert int(r.headers["retry-after"]) >= 1 and "FISH_SERVE_MAX_QUEUED" in body["detail"]
    assert server.delete(f"/v1/jobs/{job.json()['id']}").status_code == 202
    deadline = time.monotonic() + 60
    while server.get(f"/v1/jobs/{job.json()['id']}").json()["status"] != "cancelled":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert tts(server).status_code == 200


def test_a_client_that_disconnects_cancels_its_line(server) -> None:
    body = {"text": "A line nobody waits for. @@slow=20@@", "references": [{"audio": b64(VOICE), "text": "Ref."}]}
    with pytest.raises(requests.exceptions.ReadTimeout):
        server.post("/v1/tts", json=body, timeout=2)
    deadline = time.monotonic() + 30
    while "client disconnected: its line was cancelled" not in server.log():
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.2)
    lines = server.data_dir / "lines"
    while lines.exists() and os.listdir(lines):  # its directory goes once the pool let go of it
        assert time.monotonic() < deadline + 30
        time.sleep(0.2)
    t0 = time.monotonic()
    assert tts(server).status_code == 200 and time.monotonic() - t0 < 15  # the workers were not kept busy for 20 s


# -- load -------------------------------------------------------------------------------------------------------------
def test_32_concurrent_lines_in_4_voices(server) -> None:
    voices = [wav_bytes(1.0, 100.0 + 37 * k, seed=100 + k) for k in range(4)]
    cache = server.tmp / "cache"
    before = set(os.listdir(cache)) if cache.exists() else set()

    def line(i: int) -> tuple[int, requests.Response]:
        k = i % 4
        return k, server.post("/v1/tts", json={"text": f"Concurrent line number {i}.", "seed": 1,
                                               "references": [{"audio": b64(voices[k]), "text": f"Voice {k}."}]})

    with concurrent.futures.ThreadPoolExecutor(32) as ex:
        results = list(ex.map(line, range(32)))
    assert all(r.status_code == 200 for _, r in results), [r.text for _, r in results if r.status_code != 200]
    pitch: dict[int, set[float]] = {}
    for k, r in results:
        pitch.setdefault(k, set()).add(round(dominant_hz(r.content)))
    assert all(len(p) == 1 for p in pitch.values()), pitch  # each voice sounds like itself, never like another
    assert len({next(iter(p)) for p in pitch.values()}) == 4, pitch
    new = set(os.listdir(cache)) - before
    assert len([n for n in new if n.endswith(".npy")]) == 4  # each reference encoded once, not 8 times
    text = server.get("/metrics").text
    assert 'fishmp_http_requests_total{method="POST",route="/v1/tts",status="200"}' in text
    for name in ("fishmp_segments_queued", "fishmp_segments_running", 'fishmp_workers{state="ready"} 2.0',
                 "fishmp_frames_total", "fishmp_frames_per_second", "fishmp_http_request_seconds_bucket"):
        assert name in text, name
