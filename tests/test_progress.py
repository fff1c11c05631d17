"""Renderers read the same events: the bar, plain lines and JSON lines."""

from __future__ import annotations

import io
import json
import re

from fishmp.running.progress import Bar, JsonLines, LegacyLines, PlainLines, make_event, make_renderer

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
    assert lines[3] == "[Main] [2/2] c FAILED (bad_reference): ref.wav is silent"
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


# The dubbing backend's client parses these (its three patterns, verbatim).
CLIENT_PATTERNS = [re.compile(r"进度:\s*(\d+)/(\d+)"), re.compile(r"Processed\s+(\d+)/(\d+)\s+segments"),
                   re.compile(r"Generated\s+(\d+)/(\d+)\s+segments")]


def client_progress(text: str) -> list[tuple[int, int]]:
    found = []
    for line in text.splitlines():
        for pattern in CLIENT_PATTERNS:
            if m := pattern.search(line):
                found.append((int(m.group(1)), int(m.group(2))))
    return found


def test_legacy_lines_count_every_task_up_to_the_configs_total() -> None:
    out = io.StringIO()
    r = make_renderer("legacy", stderr=out, items=4, already=1)  # one task was left out as invalid
    assert isinstance(r, LegacyLines)
    for ev in EVENTS:
        r(ev)
    text = out.getvalue()
    assert "[BatchGen] 进度: 2/4" in text and "[Main] Generated 3/4 segments" in text
    assert text.splitlines()[-1] == "[Main] All done! Processed 4/4 segments (2 done, 1 failed, 1 invalid)"
    assert "c FAILED (bad_reference)" in text  # failures stay visible
    seen = client_progress(text)
    assert seen[-1] == (4, 4) and all(a <= b for a, b in zip(seen, seen[1:], strict=False))
    assert {n for n, _ in seen} == {2, 3, 4}


def test_legacy_lines_total_from_the_plan_and_no_all_done_when_interrupted() -> None:
    out = io.StringIO()
    r = LegacyLines(out)
    r(EVENTS[0])
    r(EVENTS[3])
    r(make_event("finished", done=1, failed=0, pending=2, skipped=1, audio_seconds=1.0, wall_seconds=1.0,
                 exit_code=130))
    assert client_progress(out.getvalue()) == [(1, 3), (1, 3)] and "All done" not in out.getvalue()


GPU_EVENT = make_event("gpu", gpus=[{"index": 0, "name": "NVIDIA H100", "used_gib": 30.04, "free_gib": 49.96,
                                     "total_gib": 80.0, "util_pct": 91.0, "workers_gib": {"w0": 6.1}},
                                    {"index": 1, "name": "NVIDIA H100", "used_gib": 2.0, "free_gib": 78.0,
                                     "total_gib": 80.0, "util_pct": None, "workers_gib": {}}])
GPU_SUMMARY = {"0": {"name": "NVIDIA H100", "total_gib": 80.0, "samples": 4, "used_gib_peak": 30.04,
                     "used_gib_mean": 21.5, "free_gib_min": 49.96, "util_pct_peak": 91.0, "util_pct_mean": 60.0,
                     "workers_gib_peak": {"w0": 6.1}}}
RECYCLED = make_event("worker_recycled", worker="w0", pid=2, device="cuda:0", handed_back=1, segments=50,
                      reason="finished 50 segments (FISH_WORKER_MAX_SEGMENTS=50)")


def _with_gpus(events: list[dict]) -> list[dict]:
    finished = dict(events[-1], gpus=GPU_SUMMARY)
    return [*events[:3], GPU_EVENT, RECYCLED, *events[3:-1], finished]


def test_bar_shows_the_latest_gpu_figures_and_the_summary() -> None:
    out = io.StringIO()
    bar = Bar(out)
    for ev in _with_gpus(EVENTS):
        bar(ev)
    bar.close()
    text = out.getvalue()
    assert "gpu=gpu0 30.0/80G 91% gpu1 2.0/80G" in text
    assert "[Worker w0] recycled: finished 50 segments (FISH_WORKER_MAX_SEGMENTS=50)" in text
    assert ("[GPU 0] NVIDIA H100: memory used peak 30.04 GiB, mean 21.50 of 80.0 GiB, utilisation peak 91% mean 60% "
            "(4 samples)") in text


def test_plain_lines_gpu_at_most_once_a_minute_and_the_summary() -> None:
    out = io.StringIO()
    r = PlainLines(out)
    for ev in _with_gpus(EVENTS)[:4] + [GPU_EVENT, GPU_EVENT] + _with_gpus(EVENTS)[4:]:
        r(ev)
    lines = out.getvalue().splitlines()
    assert [ln for ln in lines if ln.startswith("[Main] gpu")] == ["[Main] gpu0 30.0/80G 91% gpu1 2.0/80G"]
    assert "[Worker w0] on cuda:0 (pid 2) recycled: finished 50 segments (FISH_WORKER_MAX_SEGMENTS=50)" in lines
    assert lines[-1].startswith("[GPU 0] NVIDIA H100: memory used peak 30.04 GiB")


def test_no_gpu_events_no_gpu_text() -> None:
    for make in (Bar, PlainLines):
        out = io.StringIO()
        r = make(out)
        for ev in EVENTS:
            r(ev)
        r.close()
        assert "gpu" not in out.getvalue().lower()


def test_every_line_about_a_problem_reaches_a_client_that_filters_by_marker() -> None:
    """Issue 25: the backend's client echoes only lines with one of its markers; failures must be among them."""
    from fishmp.running.progress import LEGACY_MARKERS

    trouble = [
        make_event("segment_failed", id="4", kind="engine_error", error="EngineError: boom", worker="w0"),
        make_event("segment_requeued", id="5", reason="worker died", attempts=1, worker="w0"),
        make_event("worker_died", worker="w1", pid=9, device="cpu", exit_code=-9, reason="killed by SIGKILL"),
        make_event("worker_recycled", worker="w0", pid=8, device="cpu", reason="finished 5 segments"),
    ]
    for renderer in (PlainLines, LegacyLines):
        out = io.StringIO()
        r = renderer(out)
        for ev in [EVENTS[0], *trouble, EVENTS[-1]]:
            r(ev)
        lines = out.getvalue().splitlines()
        for needle in ("4 FAILED (engine_error): EngineError: boom", "5 requeued", "killed by SIGKILL",
                       "finished 5 segments"):
            (line,) = [ln for ln in lines if needle in ln]
            assert any(m in line for m in LEGACY_MARKERS), line
