"""The film's track: every line of a job whose segments carry `start` placed at its start (sample-exact), as one wav
the video's length (`track.wav`), and an SRT of the dub's actual timings (`track.srt`). Written by the main process
when the job finishes (fishmp/running/jobrun.py), from the fitted wavs on disk; no torch.

Overlapping lines (a line still speaking when the next one starts) are mixed, and reported with how long they
overlap; lines that are not done (failed, pending) are left silent and listed as missing. The track is as long as
the job's `video_seconds`, or else as the last line's end (its `end`, or where its audio ends if later).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import numpy as np

from ..job import Job, Segment
from ..worker.files import atomic_write_bytes, write_wav

log = logging.getLogger("fishmp")
TRACK = "track.wav"
TRACK_SRT = "track.srt"


def _read(path: str) -> tuple[np.ndarray, int] | None:
    import soundfile as sf

    try:
        x, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception:  # noqa: BLE001 - an unreadable wav is a missing line, not a failed job
        return None
    return x.mean(axis=1), int(rate)


def _srt(lines: list[tuple[Segment, float, float]]) -> str:
    import srt

    subs = [srt.Subtitle(i + 1, datetime.timedelta(seconds=start), datetime.timedelta(seconds=end),
                         f"{seg.speaker}: {seg.text}") for i, (seg, start, end) in enumerate(lines)]
    return srt.compose(subs, reindex=False)


def write_track(job: Job, done: set[str]) -> dict[str, Any] | None:
    """Write track.wav and track.srt into the job's output directory from the segments in `done` (ids whose wav
    is written); None when no segment has a start. Returns the manifest's summary entry."""
    placed = sorted((s for s in job.segments if s.start is not None), key=lambda s: (s.start, s.order))
    if not placed:
        return None
    audio: list[tuple[Segment, np.ndarray, int]] = []
    missing = []
    for seg in placed:
        got = _read(seg.output) if seg.id in done else None
        if got is None:
            missing.append(seg.id)
        else:
            audio.append((seg, *got))
    rate = max((r for _, _, r in audio), default=44100, key=[r for _, _, r in audio].count)
    lines = []
    for seg, x, r in audio:
        if r != rate:
            import soxr

            x = soxr.resample(x, r, rate).astype(np.float32)
        lines.append((seg, round(seg.start * rate), x))
    ends = [start + len(x) for _, start, x in lines] + [round((s.end or s.start) * rate) for s in placed]
    length = max([*ends, round((job.video_seconds or 0.0) * rate), 1])
    track = np.zeros(length, dtype=np.float32)
    overlaps, last = [], None  # the line that ends latest so far
    for seg, start, x in lines:
        track[start:start + len(x)] += x
        if last is not None and last[1] > start:
            overlaps.append({"a": last[0].id, "b": seg.id, "seconds": round((last[1] - start) / rate, 3)})
        if last is None or start + len(x) > last[1]:
            last = (seg, start + len(x))
    path, srt_path = os.path.join(job.output_dir, TRACK), os.path.join(job.output_dir, TRACK_SRT)
    write_wav(path, track, rate)
    atomic_write_bytes(srt_path, _srt([(s, a / rate, (a + len(x)) / rate) for s, a, x in lines]).encode("utf-8"))
    if overlaps:
        log.warning("[Main] %s: %d lines overlap the next one (listed in manifest.json summary.track.overlaps)",
                    path, len(overlaps))
    return {"path": path, "srt": srt_path, "seconds": round(length / rate, 3), "sample_rate": rate,
            "lines": len(lines), "missing": missing, "overlaps": overlaps}


def finish(job: Job, manifest: Any, emit: Any) -> None:
    """At the end of a job (JobRun.finish): write the track when the job places its lines, record it in the
    manifest's summary and say so in a `track` event. A disk error is reported there, never raised."""
    from .progress import make_event

    done = {sid for sid, r in manifest.segments.items() if r.status == "done"}
    try:
        summary = write_track(job, done)
    except OSError as exc:
        summary = {"error": f"cannot write the track: {exc.strerror or exc}"}
        log.error("[Main] %s", summary["error"])
    if summary is not None:
        manifest.summary["track"] = summary
        emit(make_event("track", **summary))
