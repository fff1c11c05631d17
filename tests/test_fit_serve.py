"""Speed, volume, sample rate and slots on the HTTP APIs, with the real clients: the Fish Audio SDK (`fish-audio-sdk`,
unmodified, `base_url` at a real `fishmp serve` on loopback) and the OpenAI client get 1.25x lines; fields fishmp
cannot honour are named in a header; the job API serves the film's track. Synthetic engine, one server."""

from __future__ import annotations

import io
import json
import time
import zipfile

import numpy as np
import pytest
import soundfile as sf
from serve_helpers import Server, b64, synthetic_env, wav_bytes

pytestmark = pytest.mark.timeout(300)
VOICE = wav_bytes(1.0, 140.0, seed=3)
LINE = "Hello there, my friend."  # 1.38 s of synthetic tone


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-fit")
    srv = Server(tmp, synthetic_env(tmp, FISH_CPU_WORKERS="1")).wait_ready(workers=1)
    yield srv
    assert srv.stop() == 0, srv.log()


def seconds(audio: bytes) -> float:
    info = sf.info(io.BytesIO(audio))
    return info.frames / info.samplerate


def tts(server: Server, **fields: object):
    return server.post("/v1/tts", json={"text": LINE, "format": "wav",
                                        "references": [{"audio": b64(VOICE), "text": "Ref."}], **fields})


def test_the_fish_audio_sdk_gets_a_125x_line(server: Server) -> None:
    pytest.importorskip("fishaudio", reason="fish-audio-sdk is not installed (the dev extra has it)")
    from fishaudio import FishAudio
    from fishaudio.types import ReferenceAudio

    client = FishAudio(api_key="unused", base_url=server.url(""))
    refs = [ReferenceAudio(audio=VOICE, text="Ref.")]
    plain = client.tts.convert(text=LINE, references=refs, format="wav")
    fast = client.tts.convert(text=LINE, references=refs, format="wav", speed=1.25)
    assert seconds(plain) == pytest.approx(1.38, abs=1e-3)
    assert seconds(fast) == pytest.approx(1.38 / 1.25, abs=1e-3)


def test_the_openai_client_gets_a_125x_line(server: Server) -> None:
    pytest.importorskip("openai", reason="openai is not installed (the dev extra has it)")
    from openai import OpenAI

    client = OpenAI(api_key="unused", base_url=server.url("/v1"))
    extra = {"ref_audio": b64(VOICE), "ref_text": "Ref."}
    fast = client.audio.speech.create(model="tts-1", voice="alloy", input=LINE, response_format="wav", speed=1.25,
                                      extra_body=extra)
    assert seconds(fast.content) == pytest.approx(1.38 / 1.25, abs=1e-3)
    slow = client.audio.speech.create(model="tts-1", voice="alloy", input=LINE, response_format="wav", speed=0.5,
                                      extra_body=extra)
    assert seconds(slow.content) == pytest.approx(1.38 / 0.5, abs=1e-3)


def test_volume_sample_rate_max_seconds_and_what_is_ignored(server: Server) -> None:
    plain = tts(server)
    assert plain.status_code == 200 and "X-Fishmp-Ignored" not in plain.headers
    loud = tts(server, prosody={"volume": -6.0}, sample_rate=16000, mp3_bitrate=128, early_stop_threshold=1.0)
    assert loud.status_code == 200, loud.text
    assert loud.headers["X-Fishmp-Ignored"] == "mp3_bitrate, early_stop_threshold"
    a, ra = sf.read(io.BytesIO(plain.content))
    b, rb = sf.read(io.BytesIO(loud.content))
    assert (ra, rb) == (44100, 16000) and seconds(loud.content) == pytest.approx(1.38, abs=1e-3)
    assert np.sqrt(np.mean(b ** 2)) / np.sqrt(np.mean(a ** 2)) == pytest.approx(10 ** (-6 / 20), rel=0.02)
    slot = tts(server, max_seconds=1.2)  # fitted in the worker: 1.38 s at 1.15x
    assert slot.status_code == 200 and seconds(slot.content) == pytest.approx(1.2, abs=1e-3)
    both = server.post("/v1/audio/speech", json={"input": LINE, "ref_audio": b64(VOICE), "ref_text": "Ref.",
                                                 "response_format": "wav", "max_seconds": 1.2, "speed": 2.0})
    assert both.status_code == 200 and seconds(both.content) == pytest.approx(0.6, abs=1e-3)
    assert "X-Fishmp-Ignored" not in both.headers
    styled = server.post("/v1/audio/speech", json={"input": LINE, "ref_audio": b64(VOICE), "ref_text": "Ref.",
                                                   "response_format": "wav", "instructions": "Whisper.", "volume": 3})
    assert styled.status_code == 200 and styled.headers["X-Fishmp-Ignored"] == "instructions, volume"


@pytest.mark.parametrize("route, fields, needle", [
    ("/v1/tts", {"prosody": {"speed": 3}}, "prosody.speed must be a number from 0.5 to 2"),
    ("/v1/tts", {"prosody": "fast"}, "prosody must be an object"),
    ("/v1/tts", {"sample_rate": 1000}, "sample_rate must be a whole number of Hz from 8000 to 48000"),
    ("/v1/tts", {"max_seconds": 0}, "max_seconds must be a number of seconds > 0"),
    ("/v1/audio/speech", {"speed": 5.0}, "speed must be a number from 0.25 to 4"),
])
def test_bad_values_are_a_400_naming_them(server: Server, route: str, fields: dict, needle: str) -> None:
    if route == "/v1/tts":
        r = tts(server, **fields)
    else:
        r = server.post(route, json={"input": LINE, "ref_audio": b64(VOICE), "ref_text": "Ref.", **fields})
    assert r.status_code == 400 and needle in r.json()["detail"], r.text


def test_the_job_api_serves_the_track(server: Server) -> None:
    job = {"speakers": {"a": {"reference_audio": "data:audio/wav;base64," + b64(VOICE), "reference_text": "Ref."}},
           "segments": [{"speaker": "a", "text": LINE, "start": 0.5, "end": 1.7},
                        {"speaker": "a", "text": LINE, "start": 2.0}], "video_seconds": 4.0}
    created = server.post("/v1/jobs", json=job)
    assert created.status_code == 202, created.text
    jid = created.json()["id"]
    deadline = time.monotonic() + 120
    while server.get(f"/v1/jobs/{jid}").json()["status"] not in ("done", "failed", "cancelled", "interrupted"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    wav = server.get(f"/v1/jobs/{jid}/track")
    assert wav.status_code == 200 and seconds(wav.content) == pytest.approx(4.0)
    srt = server.get(f"/v1/jobs/{jid}/track", params={"format": "srt"})
    assert srt.status_code == 200 and "00:00:00,500 --> 00:00:01,700" in srt.text
    with zipfile.ZipFile(io.BytesIO(server.get(f"/v1/jobs/{jid}/archive").content)) as z:
        assert {"track.wav", "track.srt"} <= set(z.namelist())
    manifest = json.loads(server.get(f"/v1/jobs/{jid}/manifest").content)
    assert manifest["summary"]["track"]["lines"] == 2
    assert manifest["segments"]["0001"]["fit"]["final_s"] == pytest.approx(1.2)
    raw = server.get(f"/v1/jobs/{jid}/segments/0001/raw")
    assert raw.status_code == 200 and seconds(raw.content) == pytest.approx(1.38)  # before the fit
    unfitted = server.get(f"/v1/jobs/{jid}/segments/0002/raw")  # a start alone: placed, not fitted
    assert unfitted.status_code == 404 and "not fitted" in unfitted.json()["detail"]
    # a retake of a fitted line is fitted as the line was, its raw take beside it
    assert server.post(f"/v1/jobs/{jid}/segments/0001/retake").status_code == 202
    deadline = time.monotonic() + 120
    def first() -> dict:
        return next(s for s in server.get(f"/v1/jobs/{jid}").json()["segments"] if s["id"] == "0001")

    while (seg := first()).get("retake") or not seg.get("history"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    manifest = json.loads(server.get(f"/v1/jobs/{jid}/manifest").content)
    rec = manifest["segments"]["0001"]
    assert rec["fit"]["final_s"] == pytest.approx(1.2) and rec["fit"]["raw"] == rec["path"][:-4] + ".raw.wav"
    assert seconds(server.get(f"/v1/jobs/{jid}/segments/0001").content) == pytest.approx(1.2)
    plain = server.post("/v1/jobs", json={**job, "segments": [{"speaker": "a", "text": LINE}]}).json()["id"]
    while server.get(f"/v1/jobs/{plain}").json()["status"] not in ("done", "failed"):
        time.sleep(0.2)
    none = server.get(f"/v1/jobs/{plain}/track")
    assert none.status_code == 404 and "none of its segments has a start" in none.json()["detail"]
    assert server.get(f"/v1/jobs/{jid}/track", params={"format": "mp3"}).status_code == 400
