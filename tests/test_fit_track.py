"""The film's track from a real run (`python -m fishmp generate`, worker processes, the synthetic engine): each
fitted line at its start, sample-exact, the track as long as the video, overlaps and missing lines reported, and the
SRT of the dub's timings."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import soundfile as sf
from conftest import jsonl_events, synthetic_env

LINE = "Hello there, my friend."  # 1.38 s of synthetic tone


def test_the_track_places_each_line_at_its_start(tmp_path, make_wav, fishmp_cli) -> None:
    import srt

    make_wav(str(tmp_path / "a.wav"), 1.0, 16000)
    make_wav(str(tmp_path / "b.wav"), 1.0, 16000)
    segments = [
        {"id": "one", "speaker": "a", "text": LINE, "start": 0.5, "end": 1.7},  # fitted to 1.2 s
        {"id": "two", "speaker": "b", "text": LINE, "start": 2.25, "end": 4.0},  # shorter than its slot: as it is
        {"id": "three", "speaker": "a", "text": LINE, "start": 3.0, "fit": False},  # placed, not fitted: overlaps two
        {"id": "gone", "speaker": "b", "text": f"@@toolong@@ {LINE}", "start": 6.0, "end": 7.0},  # fails
    ]
    job = {"speakers": {"a": {"reference_audio": "a.wav", "reference_text": "I am a."},
                        "b": {"reference_audio": "b.wav", "reference_text": "I am b."}},
           "segments": segments, "video_seconds": 9.0}
    (tmp_path / "job.json").write_text(json.dumps(job))
    out = tmp_path / "out"
    res = fishmp_cli(["generate", str(tmp_path / "job.json"), "-o", str(out), "--progress", "jsonl"], str(tmp_path),
                     synthetic_env(tmp_path, FISH_CPU_WORKERS="1"))
    assert res.returncode == 1, res.stderr  # "gone" failed
    with open(out / "manifest.json") as f:
        manifest = json.load(f)
    summary = manifest["summary"]["track"]
    assert summary["path"] == str(out / "track.wav") and summary["missing"] == ["gone"]
    assert summary["lines"] == 3 and summary["seconds"] == 9.0  # video_seconds
    assert summary["overlaps"] == [{"a": "two", "b": "three", "seconds": pytest.approx(1.38 - 0.75, abs=1e-3)}]
    track, rate = sf.read(str(out / "track.wav"), dtype="int16")
    assert len(track) == 9 * rate
    one, r1 = sf.read(str(out / "one.wav"), dtype="int16")
    assert r1 == rate and len(one) == round(1.2 * rate)  # fitted to its slot
    start = round(0.5 * rate)
    assert np.array_equal(track[start:start + len(one)], one)  # sample-exact, at its start
    assert not np.array_equal(track[start + 1:start + 1 + len(one)], one)
    assert not track[:start].any() and not track[start + len(one):round(2.25 * rate)].any()  # silence between
    two, _ = sf.read(str(out / "two.wav"), dtype="int16")
    s2 = round(2.25 * rate)
    assert np.array_equal(track[s2:round(3.0 * rate)], two[:round(0.75 * rate)])  # until "three" starts over it
    assert not track[round(6.0 * rate):].any()  # the failed line is silence
    subs = list(srt.parse((out / "track.srt").read_text(encoding="utf-8")))
    assert [(s.start.total_seconds(), s.content) for s in subs] == [
        (0.5, f"a: {LINE}"), (2.25, f"b: {LINE}"), (3.0, f"a: {LINE}")]
    assert subs[0].end.total_seconds() == pytest.approx(1.7, abs=1e-3)  # the dub's own timing
    assert subs[1].end.total_seconds() == pytest.approx(2.25 + 1.38, abs=2e-3)
    from fishmp.job.subtitles import job_from_subtitles  # the dub's SRT reads back as a job of the same lines

    again = job_from_subtitles(str(out / "track.srt"), {"a": {"reference_id": "a"}, "b": {"reference_id": "b"}})
    assert [(s["speaker"], s["text"], s["start"]) for s in again["segments"]] == [
        ("a", LINE, 0.5), ("b", LINE, 2.25), ("a", LINE, 3.0)]
    (event,) = [e for e in jsonl_events(res.stdout) if e["event"] == "track"]
    assert event["missing"] == ["gone"] and event["path"] == summary["path"]
    assert os.path.exists(out / "one.raw.wav") and not os.path.exists(out / "three.raw.wav")


def test_the_track_is_the_same_whatever_its_block_size(tmp_path, monkeypatch) -> None:
    """The track is mixed block by block (never whole in memory): lines across block edges, overlapping lines and a
    line at another sample rate come out the same with 1 s blocks as with one block for all."""
    from fishmp.job import job_from_dict
    from fishmp.running import track

    rng = np.random.default_rng(0)
    out = tmp_path / "out"
    out.mkdir()
    segments = []
    for i, (start, seconds, rate) in enumerate([(0.3, 1.5, 44100), (1.2, 2.2, 44100), (3.95, 0.4, 22050)]):
        sf.write(str(out / f"{i}.wav"), rng.uniform(-0.3, 0.3, round(seconds * rate)).astype(np.float32), rate,
                 subtype="PCM_16")
        segments.append({"id": str(i), "speaker": "a", "text": "x", "output": f"{i}.wav", "start": start})
    sf.write(str(tmp_path / "v.wav"), np.zeros(1600, np.float32), 16000)
    job = job_from_dict({"speakers": {"a": {"reference_audio": "v.wav", "reference_text": "x"}},
                         "segments": segments}, str(tmp_path), str(out))
    whole = track.write_track(job, {"0", "1", "2"})
    one = (out / "track.wav").read_bytes()
    monkeypatch.setattr(track, "BLOCK_S", 1)
    assert track.write_track(job, {"0", "1", "2"}) == whole and (out / "track.wav").read_bytes() == one
    assert whole["overlaps"] == [{"a": "0", "b": "1", "seconds": 0.6}] and whole["seconds"] == pytest.approx(4.35)
    mixed, rate = sf.read(str(out / "track.wav"), dtype="int16")
    first, _ = sf.read(str(out / "0.wav"), dtype="int16")
    start = round(0.3 * rate)
    assert np.array_equal(mixed[start:round(1.2 * rate)], first[:round(1.2 * rate) - start])
