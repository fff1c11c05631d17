"""Results on disk: wavs written atomically and `manifest.json`, the record resume trusts.

A wav only ever appears at its final path complete: it is written to a hidden temp file in the same directory,
fsynced, then renamed over the final path (rename is atomic within a filesystem).
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

TMP_PREFIX = ".fishmp-tmp-"
MANIFEST = "manifest.json"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """Call `write(temp_path)` on a temp file beside `path`, fsync it, rename it into place. Cleans up on any error.

    Writers get a path (np.save, plain bytes); the temp name never collides, so concurrent writers are safe."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX, suffix=suffix, dir=directory)
    os.close(fd)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str, payload: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(payload)

    atomic_write(path, write)


def write_wav(path: str, samples: np.ndarray, sample_rate: int) -> None:
    """Encode in memory, then write plain bytes: libsndfile would turn ENOSPC into 'System error.'."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0), sample_rate, format="WAV",
             subtype="PCM_16")
    atomic_write_bytes(path, buf.getvalue())


def wav_ok(path: str) -> bool:
    """True when `path` is a readable, non-empty wav (what resume requires before skipping a segment)."""
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception:  # noqa: BLE001 - any unreadable file is simply "not done"
        return False
    return info.frames > 0


def output_dir_problem(path: str) -> str | None:
    """Why wavs cannot be written to `path`, or None. Probed with a real temp file: permissions, read-only mounts."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        return f"output directory {path} is not writable: {exc.strerror or exc}"
    return None


def remove_temp_files(directories: set[str]) -> int:
    """Delete temp files a killed worker may have left behind."""
    n = 0
    for d in directories:
        for p in glob.glob(os.path.join(glob.escape(d), TMP_PREFIX + "*")):
            with contextlib.suppress(OSError):
                os.unlink(p)
                n += 1
    return n


@dataclass
class SegmentRecord:
    status: str = "pending"  # pending | done | failed
    path: str | None = None
    speaker: str | None = None
    audio_seconds: float | None = None
    synthesis_seconds: float | None = None
    tokens: int | None = None
    worker: str | None = None
    device: str | None = None
    attempts: int = 0
    error: str | None = None
    error_kind: str | None = None
    fingerprint: str | None = None
    finished_at: float | None = None


@dataclass
class Manifest:
    path: str
    job: str | None = None
    segments: dict[str, SegmentRecord] = field(default_factory=dict)
    _last_write: float = 0.0
    _last_cost: float = 0.0

    @classmethod
    def load(cls, output_dir: str) -> Manifest:
        """The manifest in `output_dir`, or an empty one. An unreadable manifest is treated as absent (resume redoes)."""
        path = os.path.join(output_dir, MANIFEST)
        m = cls(path=path)
        try:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
            for sid, rec in data.get("segments", {}).items():
                known = {k: v for k, v in rec.items() if k in SegmentRecord.__dataclass_fields__}
                m.segments[sid] = SegmentRecord(**known)
        except (OSError, ValueError, TypeError, AttributeError):
            pass
        return m

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "failed": 0, "pending": 0}
        for r in self.segments.values():
            out[r.status] = out.get(r.status, 0) + 1
        return out

    def save(self, min_interval_s: float = 0.0) -> bool:
        """Write atomically. With `min_interval_s`, skip if the last write was more recent than that or than 20x the
        last write's duration, so a 10,000-segment manifest never takes more than ~5% of the job loop's time."""
        now = time.monotonic()
        if min_interval_s and now - self._last_write < max(min_interval_s, 20 * self._last_cost):
            return False
        data = {
            "version": 1,
            "job": self.job,
            "updated_at": time.time(),
            "counts": self.counts(),
            "segments": {sid: {k: v for k, v in vars(r).items() if v is not None} for sid, r in self.segments.items()},
        }
        # One segment per line: readable and diffable, without indent=1's cost on big jobs.
        lines = ",\n".join(f"{json.dumps(k, ensure_ascii=False)}:{json.dumps(v, ensure_ascii=False)}"
                            for k, v in data.pop("segments").items())
        head = json.dumps(data, ensure_ascii=False)[:-1]
        atomic_write_bytes(self.path, f'{head}, "segments": {{\n{lines}\n}}}}\n'.encode())
        self._last_write = time.monotonic()
        self._last_cost = self._last_write - now
        return True
