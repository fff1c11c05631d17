"""Renderers read the same events: the bar, plain lines and JSON lines."""

from __future__ import annotations

import io
import json

from fishmp.progress import Bar, JsonLines, PlainLines, make_event, make_renderer

EVENTS = [
    make_event("plan", segments=3, skipped=1, speakers=1, workers=2, mode="cpu", output_dir="/o", pid=1),
    make_event("segment_done", id="a", path="/o/a.wav", skipped=True, audio_seconds=1.0, synthesis_seconds=0.0,
               worker=None),
    make_event("worker_ready", worker="w0", pid=2, device="cpu", load_seconds=0.5),
    make_event("segment_done", id="b", path="/o/b.wav", audio_seconds=2.5, synthesis_seconds=1.0, worker="w0"),
    make_event("segment_failed", id="c", kind="bad_reference", error="ref.wav is silent", worker="w0"),
    make_event("finished", done=2, failed=1, pending=0, skipped=1, audio_seconds=3.5, wall_seconds=1.2, exit_code=1),
]


def test_bar_counts_segments_to_do_and_audio() -> None:
    out = io.StringIO()
    bar = Bar(out)
    for ev in EVENTS:
        bar(ev)
    bar.close()
    text = out.getvalue()
    assert "2/2" in text and "audio=2s" in text and "failed=1" in text  # the resumed segment is not counted
    assert "c FAILED (bad_reference): ref.wav is silent" in text


def test_plain_lines() -> None:
    out = io.StringIO()
    r = PlainLines(out)
    for ev in EVENTS:
        r(ev)
    lines = out.getvalue().splitlines()
    assert lines[0] == "[Main] 2 segments to synthesize (1 already done), 1 speakers, 2 workers"
    assert lines[2].startswith("[1/2] b done: 2.5s audio in 1.0s by w0")
    assert lines[3] == "[2/2] c FAILED (bad_reference): ref.wav is silent"
    assert lines[-1].startswith("[Main] finished: 2 done, 1 failed")


def test_json_lines_one_object_per_line() -> None:
    out = io.StringIO()
    r = JsonLines(out)
    for ev in EVENTS:
        r(ev)
    parsed = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [p["event"] for p in parsed] == [e["event"] for e in EVENTS] and all("time" in p for p in parsed)


def test_auto_is_plain_off_a_tty_and_none_renders_nothing() -> None:
    assert isinstance(make_renderer("auto", stderr=io.StringIO()), PlainLines)
    assert make_renderer("none") is None
