"""`fishmp job-from-subtitles`: real SRT and WebVTT files (a BOM, markup, speaker prefixes and voice spans, NOTE and
STYLE blocks, multi-line cues) become jobs that load, whose segments give the cues back; a malformed cue, a backwards
cue and a speaker without a voice are named. In-process (fishmp.cli.main) and fast."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import srt
from job_files import write_wav

from fishmp.cli import main
from fishmp.job import JobError, load_job
from fishmp.job.subtitles import job_from_subtitles, read_cues

FILM_SRT = """\ufeff1
00:00:01,250 --> 00:00:03,000
ANNA: <i>Where were you</i>
last night?

2
00:00:03,400 --> 00:00:05,120
BOB: Out. Just... out.

3
00:00:05,100 --> 00:00:06,000
{\\an8}Somebody knocks.

4
00:01:02,003 --> 00:01:04,500
Anna: Then tell me at 10:30, not now.
"""

FILM_VTT = """WEBVTT - a film

NOTE translated by hand

STYLE
::cue { color: yellow }

intro
00:00:01.250 --> 00:00:03.000 line:90% align:center
<v Anna>Where were you
last night?

00:00:03.400 --> 00:00:05.120
<v Bob><i>Out.</i> Just... out.

00:01:02.003 --> 00:01:04.500
Somebody knocks.
"""


def _cli(*args: str) -> int:
    return main(["job-from-subtitles", *args])


def test_an_srt_file_becomes_a_job_that_gives_its_cues_back(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "film.srt").write_text(FILM_SRT, encoding="utf-8")
    write_wav(tmp_path / "anna.wav")
    (tmp_path / "voices.json").write_text(json.dumps({"ANNA": {"reference_audio": "anna.wav",
                                                               "reference_text": "I am Anna."}}))
    assert _cli(str(tmp_path / "film.srt"), "-o", str(tmp_path / "job.json"), "--voices", str(tmp_path / "voices.json"),
                "--voice", "Anna=anna_v2", "--voice", "BOB=anna.wav|I am Bob.", "--speaker", "BOB",
                "--max-speed", "1.3") == 0
    assert "wrote" in capsys.readouterr().err
    data = json.loads((tmp_path / "job.json").read_text())
    assert data["speakers"] == {"ANNA": {"reference_audio": "anna.wav", "reference_text": "I am Anna."},
                                "BOB": {"reference_audio": "anna.wav", "reference_text": "I am Bob."},
                                "Anna": {"reference_id": "anna_v2"}}
    assert data["fit"] == {"max_speed": 1.3}
    assert [(s["speaker"], s["text"]) for s in data["segments"]] == [
        ("ANNA", "Where were you last night?"), ("BOB", "Out. Just... out."), ("BOB", "Somebody knocks."),
        ("Anna", "Then tell me at 10:30, not now.")]
    data["speakers"]["Anna"] = data["speakers"]["ANNA"]  # no reference store in this test: a file instead
    (tmp_path / "job.json").write_text(json.dumps(data))
    job = load_job(str(tmp_path / "job.json"), str(tmp_path / "out"))
    assert [s.slot for s in job.segments] == pytest.approx([1.75, 1.72, 0.9, 2.497])  # every line fitted
    # round trip: the job's segments, written as SRT, are the file's cues (timings to the millisecond)
    back = srt.compose([srt.Subtitle(i + 1, datetime.timedelta(seconds=s.start), datetime.timedelta(seconds=s.end),
                                     f"{s.speaker}: {s.text}") for i, s in enumerate(job.segments)])
    original = list(srt.parse(FILM_SRT.lstrip("\ufeff")))
    assert [(c.start, c.end) for c in srt.parse(back)] == [(c.start, c.end) for c in original]


def test_a_vtt_file_with_voice_spans(tmp_path: Path) -> None:
    (tmp_path / "film.vtt").write_text(FILM_VTT, encoding="utf-8")
    cues = read_cues(str(tmp_path / "film.vtt"))
    assert [(c[1], c[2], c[4]) for c in cues] == [(1.25, 3.0, "Anna"), (3.4, 5.12, "Bob"), (62.003, 64.5, None)]
    job = job_from_subtitles(str(tmp_path / "film.vtt"), {"Anna": {"reference_id": "a"}, "Bob": {"reference_id": "b"},
                                                          "Narrator": {"reference_id": "n"}}, "Narrator")
    assert [(s["speaker"], s["text"], s["start"], s["end"]) for s in job["segments"]] == [
        ("Anna", "Where were you last night?", 1.25, 3.0), ("Bob", "Out. Just... out.", 3.4, 5.12),
        ("Narrator", "Somebody knocks.", 62.003, 64.5)]


@pytest.mark.parametrize("name, text, needle", [
    ("bad.srt", FILM_SRT.replace("00:00:03,400 --> 00:00:05,120", "00:00:03,400 -> 00:00:05,120"),
     "cue 2 (the one after cue 1) is malformed: '2 / 00:00:03,400 -> 00:00:05,120'"),
    ("bad.vtt", FILM_VTT.replace("00:00:03.400 --> 00:00:05.120", "00:00:03.400 -> 00:00:05.120"),
     "cue 2 (after cue 1 (intro)) is malformed"),
    ("back.srt", FILM_SRT.replace("00:00:03,400 --> 00:00:05,120", "00:00:05,400 --> 00:00:05,120"),
     "cue 2 ends (5.12 s) before it starts (5.4 s)"),
    ("voice.srt", FILM_SRT, "no voice for speakers 'ANNA', 'BOB', 'X', 'Anna'"),
    ("nobody.srt", FILM_SRT, "cue 3 names no speaker"),
])
def test_bad_cues_and_missing_voices_are_named(tmp_path: Path, name: str, text: str, needle: str) -> None:
    (tmp_path / name).write_text(text, encoding="utf-8")
    with pytest.raises(JobError) as info:
        job_from_subtitles(str(tmp_path / name), {}, None if name == "nobody.srt" else "X")
    assert any(needle in p for p in info.value.problems), info.value.problems


def test_the_command_reports_a_malformed_cue_without_a_traceback(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "bad.srt").write_text("1\n00:00:01,000 --> 00:00:02,000\nHi.\n\n2\nnot a timing\nHo.\n")
    assert _cli(str(tmp_path / "bad.srt"), "--speaker", "A", "--voice", "A=a") == 2
    err = capsys.readouterr().err
    assert "cue 2" in err and "malformed" in err and "Traceback" not in err
    assert _cli(str(tmp_path / "bad.srt"), "--voice", "A") == 2
    assert "expected NAME=VOICE" in capsys.readouterr().err
