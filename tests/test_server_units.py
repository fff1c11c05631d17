"""The server's pure parts without a server (issue 23): the reference store (names never paths, content-addressed
audio, data URLs, rename/delete), the job view folded from events, the queue bound, the audio formats, streamed
chunks, the loopback check; and the job format's reference_id and data-URL voices, also through the CLI."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import soundfile as sf
from serve_helpers import data_url, wav_bytes

from fishmp.job import JobError, job_from_dict
from fishmp.server import formats
from fishmp.server.errors import ApiError
from fishmp.server.jobview import JobView
from fishmp.server.lines import chunks
from fishmp.server.main import is_loopback
from fishmp.server.refstore import ReferenceExists, References, Voice, decode_audio_string
from fishmp.server.state import QueueGate

VOICE = wav_bytes(1.0, 150.0, seed=9)


def test_reference_store(tmp_path) -> None:
    refs = References(str(tmp_path))
    voice = refs.add("anna", VOICE, " Anna's transcript. ")
    assert voice.text == "Anna's transcript." and voice.path.endswith(".wav") and os.path.isfile(voice.path)
    assert refs.store_audio(VOICE, "again") == voice.path  # by content: one file however often it comes
    with pytest.raises(ReferenceExists):
        refs.add("anna", wav_bytes(1.0, 170.0), "other")
    for bad in ("../anna", "a/b", "", "x" * 65, "a.b"):
        with pytest.raises(ValueError, match="letters, digits"):
            refs.get(bad)
    refs.rename("anna", "anna-2")
    assert refs.list() == ["anna-2"] and refs.reference("anna-2") == (voice.path, "Anna's transcript.")
    refs.delete("anna-2")
    with pytest.raises(LookupError, match="not a stored voice"):
        refs.get("anna-2")
    assert os.path.isfile(voice.path)  # a job that already uses the audio keeps it
    assert Voice(voice.path, "t").speaker_id == Voice(voice.path, "t").speaker_id != Voice(voice.path, "u").speaker_id


@pytest.mark.parametrize("data, says", [(b"", "is empty"), (b"RIFF nonsense" * 10, "cannot read"),
                                        (wav_bytes(0.3), "0.30 s long")])
def test_unusable_reference_audio_is_named(tmp_path, data, says) -> None:
    with pytest.raises(ValueError, match=says) as exc:
        References(str(tmp_path)).store_audio(data, "references[0].audio")
    assert "references[0].audio" in str(exc.value) and "fishmp-tmp" not in str(exc.value)
    voices = tmp_path / "voices"
    assert (os.listdir(voices) if voices.exists() else []) == []  # nothing kept, no temp file left


def test_audio_strings() -> None:
    assert decode_audio_string(data_url(VOICE), "x") == VOICE
    import base64

    assert decode_audio_string(base64.b64encode(VOICE).decode(), "x") == VOICE
    for bad, says in (("data:audio/wav,plain", "without ';base64,'"), ("%%%", "not base64"), ("", "empty")):
        with pytest.raises(ValueError, match=says):
            decode_audio_string(bad, "x")


def test_a_job_names_stored_voices_and_data_urls(tmp_path) -> None:
    refs = References(str(tmp_path / "data"))
    refs.add("bob", VOICE, "Bob's words.")
    data = {"speakers": {"bob": {"reference_id": "bob"},
                         "bob2": {"reference_id": "bob", "reference_text": "Other words."},
                         "eve": {"reference_audio": data_url(wav_bytes(1.0, 190.0)), "reference_text": "Eve."}},
            "segments": [{"speaker": s, "text": "Hi."} for s in ("bob", "bob2", "eve")]}
    job = job_from_dict(data, str(tmp_path), str(tmp_path / "out"), voices=refs)
    assert job.speakers["bob"].reference_text == "Bob's words." and job.speakers["bob"].reference_id == "bob"
    assert job.speakers["bob2"].reference_text == "Other words."
    assert job.speakers["eve"].reference_audio.startswith(refs.voices_dir)
    with pytest.raises(JobError) as exc:  # without a store: each named, nothing crashes
        job_from_dict(data, str(tmp_path), str(tmp_path / "out"))
    assert sum("no reference store here" in p for p in exc.value.problems) == 3
    bad = {"speakers": {"a": {"reference_id": "ghost"}, "b": {"reference_id": "x", "reference_audio": "y.wav"},
                        "c": {"reference_audio": "data:audio/wav;base64,!!!", "reference_text": "t"}},
           "segments": [{"speaker": "a", "text": "x"}]}
    with pytest.raises(JobError) as exc:
        job_from_dict(bad, str(tmp_path), str(tmp_path / "out"), voices=refs)
    text = "\n".join(exc.value.problems)
    assert 'reference_id "ghost" is not a stored voice' in text and "not reference_audio and reference_id" in text
    assert "not base64" in text


def test_the_schema_knows_reference_id() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from fishmp.job.schema import job_schema

    v = jsonschema.Draft202012Validator(job_schema())
    ok = {"speakers": {"a": {"reference_id": "narrator_1"}}, "segments": [{"speaker": "a", "text": "x"}]}
    assert not list(v.iter_errors(ok))
    ok["speakers"]["a"] = {"reference_id": "../x"}
    assert list(v.iter_errors(ok))
    ok["speakers"]["a"] = {"reference_audio": "a.wav"}  # a file still needs its transcript
    assert list(v.iter_errors(ok))


def test_the_cli_resolves_reference_id_in_the_servers_store(tmp_path, fishmp_cli) -> None:
    References(str(tmp_path / "store")).add("narrator", VOICE, "I narrate.")
    (tmp_path / "job.json").write_text(json.dumps({"speakers": {"n": {"reference_id": "narrator"}},
                                                   "segments": [{"id": "s1", "speaker": "n", "text": "Hello."}]}))
    env = {"FISH_ENGINE": "synthetic", "FISH_SYNTHETIC_LOAD_S": "0.1", "FISH_CACHE_DIR": str(tmp_path / "cache"),
           "FISH_SERVE_DATA_DIR": str(tmp_path / "store")}
    r = fishmp_cli(["generate", "job.json", "-o", "out", "--progress", "none"], str(tmp_path), env)
    assert r.returncode == 0, r.stderr
    assert sf.info(str(tmp_path / "out" / "s1.wav")).frames > 0
    r = fishmp_cli(["generate", "job.json", "-o", "out2"], str(tmp_path), {**env, "FISH_SERVE_DATA_DIR": "elsewhere"})
    assert r.returncode == 2 and 'reference_id "narrator" is not a stored voice' in r.stderr


def test_job_view_folds_events() -> None:
    view = JobView("j", 1.0, [{"id": "a", "speaker": "s", "text": "A."}, {"id": "b", "speaker": "s", "text": "B."}])
    assert view.status == "queued" and view.counts() == {"done": 0, "failed": 0, "pending": 2, "suspect": 0}
    for ev in ({"event": "plan"}, {"event": "segment_done", "id": "a", "path": "/o/a.wav", "audio_seconds": 1.5,
                                   "suspect": True, "takes": [{"passed": False}]},
               {"event": "segment_requeued", "id": "b", "attempts": 1},
               {"event": "finished", "interrupted": "SIGTERM", "done": 1, "pending": 1, "exit_code": 143}):
        view.apply(ev)
    assert view.status == "interrupted" and view.over and view.counts()["suspect"] == 1
    view.resumed()
    assert view.status == "queued" and not view.over
    view.apply({"event": "segment_done", "id": "a", "skipped": True, "path": "/o/a.wav"})
    assert view.segments["a"]["audio_seconds"] == 1.5  # a resumed segment keeps what its first run said
    view.apply({"event": "segment_failed", "id": "b", "kind": "bad_reference", "error": "silent", "attempts": 1})
    view.apply({"event": "finished", "done": 1, "failed": 1, "pending": 0, "exit_code": 1})
    detail = view.detail()
    assert detail["status"] == "failed" and detail["exit_code"] == 1 and "path" not in detail["segments"][0]
    assert detail["segments"][1]["error_kind"] == "bad_reference"


def test_queue_gate() -> None:
    gate = QueueGate(10)
    gate.admit(6)
    with pytest.raises(ApiError) as exc:
        gate.admit(5)
    assert exc.value.status == 429 and exc.value.headers["Retry-After"] == "5"
    with pytest.raises(ApiError) as exc:
        gate.admit(11)
    assert exc.value.status == 400
    gate.release(6)
    gate.admit(10)
    assert gate.outstanding == 10


def test_formats_round_trip() -> None:
    samples = (np.sin(np.arange(44100) * 2 * np.pi * 300 / 44100) * 8000).astype(np.int16)
    assert formats.encode(samples, "pcm") == samples.astype("<i2").tobytes()
    for fmt in ("wav", "flac"):
        back, rate = sf.read(io.BytesIO(formats.encode(samples, fmt)), dtype="int16")
        assert rate == 44100 and np.array_equal(back, samples)  # lossless
    for fmt, rate in (("mp3", 44100), ("opus", 48000)):
        if fmt in formats.available():
            info = sf.info(io.BytesIO(formats.encode(samples, fmt)))
            assert info.samplerate == rate and abs(info.frames / info.samplerate - 1.0) < 0.1
    assert formats.unavailable("aac")
    assert len(formats.wav_stream_header()) == 44


def test_stream_chunks() -> None:
    text = "One sentence here. Another one there! A third? " * 5
    parts = chunks(text, 60)
    assert " ".join(parts) == " ".join(text.split()) and all(len(p) <= 60 for p in parts) and len(parts) > 3
    assert chunks("x" * 500, 100) == ["x" * 500]  # nothing to cut at: whole
    assert chunks("Short.", 200) == ["Short."]


@pytest.mark.parametrize("host, loop", [("127.0.0.1", True), ("localhost", True), ("::1", True), ("[::1]", True),
                                        ("127.0.0.2", True), ("0.0.0.0", False), ("::", False), ("10.0.0.5", False),
                                        ("example.org", False)])
def test_loopback(host, loop) -> None:
    assert is_loopback(host) is loop
