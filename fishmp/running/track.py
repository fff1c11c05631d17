"""The film's track: every line of a job whose segments carry `start` placed at its start (sample-exact), as one wav
the video's length (`track.wav`), and an SRT of the dub's actual timings (`track.srt`). Written by the main process
when the job finishes (fishmp/running/jobrun.py), from the fitted wavs on disk, BLOCK_S at a time (a two-hour film's
track would be 1.3 GB as float samples: it is never in memory whole); no torch.

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
from ..worker.files import atomic_write, atomic_write_bytes

log = logging.getLogger("fishmp")
TRACK = "track.wav"
TRACK_SRT = "track.srt"
BLOCK_S = 30  # the track is mixed and written this many seconds at a time


def _info(path: str) -> tuple[int, int] | None:
    """(frames, sample rate) of a readable wav, else None (a missing line, not a failed job)."""
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception:  # noqa: BLE001 - an unreadable wav is a missing line
        return None
    return (int(info.frames), int(info.samplerate)) if info.frames > 0 else None


class _Line:
    """A placed line: read in pieces as the track is written, so a film's track never sits in memory whole."""

    def __init__(self, seg: Segment, path: str, frames: int, rate: int, track_rate: int) -> None:
        self.seg, self.path = seg, path
        self.start = round((seg.start or 0.0) * track_rate)
        self.samples: np.ndarray | None = None  # only for a line at another rate: resampled whole (rare)
        if rate != track_rate:
            import soxr

            self.samples = soxr.resample(self._read(0, frames), rate, track_rate).astype(np.float32)
            frames = len(self.samples)
        self.frames = frames

    @property
    def end(self) -> int:
        return self.start + self.frames

    def _read(self, a: int, z: int) -> np.ndarray:
        import soundfile as sf

        x, _ = sf.read(self.path, start=a, stop=z, dtype="float32", always_2d=True)
        return x.mean(axis=1)

    def piece(self, a: int, z: int) -> np.ndarray:
        """Samples [a, z) of the line (track sample numbers, within the line)."""
        if self.samples is not None:
            return self.samples[a - self.start:z - self.start]
        return self._read(a - self.start, z - self.start)


def _mix(path: str, lines: list[_Line], length: int, rate: int) -> None:
    """Write the track block by block (BLOCK_S), each line added where it overlaps the block."""
    import soundfile as sf

    block = BLOCK_S * rate

    def write(tmp: str) -> None:
        with sf.SoundFile(tmp, "w", rate, 1, "PCM_16", format="WAV") as f:
            for b0 in range(0, length, block):
                b1 = min(length, b0 + block)
                buf = np.zeros(b1 - b0, dtype=np.float32)
                for line in lines:
                    a, z = max(b0, line.start), min(b1, line.end)
                    if a < z:
                        buf[a - b0:z - b0] += line.piece(a, z)
                f.write(np.clip(buf, -1.0, 1.0))

    atomic_write(path, write, ".wav")


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
    found: list[tuple[Segment, int, int]] = []
    missing = []
    for seg in placed:
        info = _info(seg.output) if seg.id in done else None
        if info is None:
            missing.append(seg.id)
        else:
            found.append((seg, *info))
    rates = [r for _, _, r in found]
    rate = max(rates, default=44100, key=rates.count)
    lines = [_Line(seg, seg.output, frames, r, rate) for seg, frames, r in found]
    ends = [line.end for line in lines] + [round((s.end or s.start or 0.0) * rate) for s in placed]
    length = max([*ends, round((job.video_seconds or 0.0) * rate), 1])
    overlaps, last = [], None  # the line that ends latest so far
    for line in lines:
        if last is not None and last.end > line.start:
            overlaps.append({"a": last.seg.id, "b": line.seg.id, "seconds": round((last.end - line.start) / rate, 3)})
        if last is None or line.end > last.end:
            last = line
    path, srt_path = os.path.join(job.output_dir, TRACK), os.path.join(job.output_dir, TRACK_SRT)
    _mix(path, lines, length, rate)
    atomic_write_bytes(srt_path, _srt([(ln.seg, ln.start / rate, ln.end / rate) for ln in lines]).encode("utf-8"))
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
    except (OSError, RuntimeError) as exc:  # libsndfile's errors are RuntimeErrors
        summary = {"error": f"cannot write the track: {getattr(exc, 'strerror', None) or exc}"}
        log.error("[Main] %s", summary["error"])
    if summary is not None:
        manifest.summary["track"] = summary
        emit(make_event("track", **summary))
