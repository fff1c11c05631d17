"""Results on disk: wavs written atomically, `manifest.json` (the record resume trusts), and the output-directory lock.

A wav only ever appears at its final path complete: it is written to a hidden temp file in the same directory,
fsynced, then renamed over the final path (rename is atomic within a filesystem). Temp names carry the writer's host
and pid, so a clean-up removes only files of this process, of processes it names, or of dead processes on this host.
One job at a time per output directory: `OutputDirLock` (fishmp/running/outputlock.py, re-exported here).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from typing import Any

from ..worker.files import atomic_write_bytes, new_temp
from .outputlock import (  # noqa: F401 - re-exported: callers import them from here
    LOCK_NAME,
    ManifestError,
    OutputDirBusy,
    OutputDirError,
    OutputDirLock,
)

log = logging.getLogger("fishmp")

MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1


def output_dir_problem(path: str) -> str | None:
    """Why wavs cannot be written to `path`, or None. Probed with a real temp file: permissions, read-only mounts."""
    try:
        os.makedirs(path, exist_ok=True)
        os.unlink(new_temp(path))
    except OSError as exc:
        return f"output directory {path} is not writable: {exc.strerror or exc}"
    return manifest_problem(path)


# ------------------------------------------------------------------------------------------- output-directory lock
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
    # The take check (fishmp/worker/takes.py); absent when takes were not checked. A suspect segment is done (its best take
    # is written) and resume keeps it.
    suspect: bool | None = None  # no take passed the check
    seed: int | None = None  # seed of the kept take (absent: an unseeded first take)
    kept_take: int | None = None  # index of the kept take in `takes`
    takes: list[dict] | None = None  # every take tried: passed, reasons, duration_s, expected_s, rms, ... seed
    over_slot_s: float | None = None  # the kept take is this much longer than the segment's max_seconds
    # The fit (fishmp/worker/fit.py; absent when not fitted): slot_s, raw_s, trimmed_s, shortened_s, final_s, speed,
    # speed_needed, loudness_before/after, true_peak_db, raw (the raw take's wav), fit_ms, and `overrun`
    # ({"needed_speed", "over_s"}) when even max_speed left it over its slot: then the segment is suspect too.
    fit: dict | None = None
    # Human review (fishmp/running/review.py): the takes written before a retake replaced them, and the decision on
    # the current take ({"decision": "accepted", "at", "by"?}). Absent in manifests from before review existed.
    history: list[dict] | None = None
    review: dict | None = None


def take_fields(take: dict | None, fit: dict | None = None) -> dict[str, Any]:
    """SegmentRecord fields from a Done's take record (None: takes were not checked, every field cleared) and its fit
    record (None: not fitted). A fitted line that overruns its slot is suspect, whatever its takes."""
    if not take:
        out: dict[str, Any] = {"suspect": None, "seed": None, "kept_take": None, "takes": None, "over_slot_s": None}
    else:
        out = {"suspect": bool(take.get("suspect")), "seed": take.get("seed"), "kept_take": take.get("kept"),
               "takes": take.get("takes"), "over_slot_s": take.get("over_slot_s")}
    out["fit"] = fit or None
    if fit and fit.get("overrun"):
        out["suspect"] = True
    return out


def suspect_count(records: dict[str, SegmentRecord]) -> int:
    """Segments written whose takes all failed the take check."""
    return sum(1 for r in records.values() if r.status == "done" and r.suspect)


def manifest_problem(output_dir: str) -> str | None:
    """Why `output_dir`'s manifest.json cannot be used (a directory, not fishmp's, unreadable), or None. Read-only."""
    try:
        Manifest.load(output_dir, repair=False)
    except ManifestError as exc:
        return str(exc)
    return None


def _is_ours(head: object) -> bool:
    """fishmp writes {"fishmp": {"version": N}, ...}; before that field existed, exactly these keys (a damaged
    file's header has no "segments" yet)."""
    if not isinstance(head, dict):
        return False
    if isinstance(head.get("fishmp"), dict):
        return True
    return set(head) - {"segments"} == {"version", "job", "updated_at", "counts"} and head.get("version") == 1


def _record(sid: object, rec: object) -> SegmentRecord | None:
    if not isinstance(sid, str) or not isinstance(rec, dict):
        return None
    try:
        return SegmentRecord(**{k: v for k, v in rec.items() if k in SegmentRecord.__dataclass_fields__})
    except TypeError:
        return None


def _recover_lines(text: str) -> tuple[object, dict[str, SegmentRecord], int]:
    """A damaged manifest in fishmp's one-record-per-line layout: (header, intact records, lines lost)."""
    lines = text.split("\n")
    first = lines[0].rstrip()
    head: object = None
    marker = '"segments": {'
    if first.endswith(marker):
        with contextlib.suppress(ValueError):
            head = json.loads(first[: -len(marker)].rstrip().rstrip(",") + "}")
    records: dict[str, SegmentRecord] = {}
    lost = 0
    for line in lines[1:]:
        line = line.strip().rstrip(",")
        if not line or line.strip("}") == "":
            continue
        try:
            (sid, rec), = json.loads("{" + line + "}").items()
        except ValueError:
            lost += 1
            continue
        if (r := _record(sid, rec)) is not None:
            records[sid] = r
        else:
            lost += 1
    return head, records, lost


@dataclass
class Manifest:
    path: str
    job: str | None = None
    segments: dict[str, SegmentRecord] = field(default_factory=dict)
    invalid: list[dict] = field(default_factory=list)  # items the job left out (Job.invalid); resume ignores it
    summary: dict[str, Any] = field(default_factory=dict)  # job-level figures (GPU telemetry), written when set
    _last_write: float = 0.0
    _last_cost: float = 0.0

    @classmethod
    def load(cls, output_dir: str, repair: bool = True) -> Manifest:
        """The manifest in `output_dir`, or an empty one when there is none.

        Raises ManifestError when manifest.json is a directory, unreadable, or not fishmp's (fishmp never overwrites
        a file it did not write). A damaged fishmp manifest (cut short, a line garbled) keeps every intact record:
        with `repair`, a copy of the damaged file is kept as manifest.json.damaged-<time> and a warning gives the
        count; without it, nothing is written (for read-only callers)."""
        path = os.path.join(output_dir, MANIFEST)
        m = cls(path=path)
        if os.path.isdir(path):
            raise ManifestError(f"{path} is a directory, not fishmp's manifest: remove it or choose another output "
                                "directory")
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return m
        except OSError as exc:
            raise ManifestError(f"cannot read {path}: {exc.strerror or exc}") from None
        try:
            text = raw.decode("utf-8")
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict) and _is_ours(data) and isinstance(data.get("segments"), dict):
            m.job = data.get("job") if isinstance(data.get("job"), str) else None
            # Kept as they are for a load-edit-save (a review of a finished job); a run sets its own.
            m.invalid = data["invalid"] if isinstance(data.get("invalid"), list) else []
            m.summary = data["summary"] if isinstance(data.get("summary"), dict) else {}
            for sid, rec in data["segments"].items():
                if (r := _record(sid, rec)) is not None:
                    m.segments[sid] = r
            return m
        if not raw.strip():  # empty (a crash of the filesystem, not of fishmp): nothing to lose; keep the evidence
            m._keep_damaged(0, 0, repair)
            return m
        if data is not None:
            raise ManifestError(f"{path} was not written by fishmp: choose another output directory (fishmp never "
                                "overwrites a file it did not write)")
        head, records, lost = _recover_lines(raw.decode("utf-8", errors="replace"))
        if not _is_ours(head):
            raise ManifestError(f"{path} is not a manifest fishmp can read (not written by fishmp, or damaged beyond "
                                "recognition): move it away or choose another output directory")
        m.segments = records
        m._keep_damaged(len(records), lost, repair)
        return m

    def _keep_damaged(self, recovered: int, lost: int, repair: bool) -> None:
        if not repair:
            return
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        copy = f"{self.path}.damaged-{stamp}"
        try:
            shutil.copyfile(self.path, copy)
        except OSError as exc:
            raise ManifestError(f"{self.path} is damaged and a copy could not be kept ({exc.strerror or exc}): "
                                "move it away or choose another output directory") from None
        log.warning("[Main] %s was damaged: recovered %d segment records (%d unreadable lines; those segments are "
                    "redone); the damaged file is kept as %s", self.path, recovered, lost, copy)

    def counts(self) -> dict[str, int]:
        out = {"done": 0, "failed": 0, "pending": 0}
        for r in self.segments.values():
            out[r.status] = out.get(r.status, 0) + 1
        out["suspect"] = suspect_count(self.segments)  # of the done ones
        return out

    def save(self, min_interval_s: float = 0.0) -> bool:
        """Write atomically. With `min_interval_s`, skip if the last write was more recent than that or than 20x the
        last write's duration, so a 10,000-segment manifest never takes more than ~5% of the job loop's time."""
        now = time.monotonic()
        if min_interval_s and now - self._last_write < max(min_interval_s, 20 * self._last_cost):
            return False
        data = {
            "fishmp": {"version": MANIFEST_FORMAT},  # how fishmp recognises its own manifest (never overwrite others)
            "version": MANIFEST_FORMAT,
            "job": self.job,
            "updated_at": time.time(),
            "counts": self.counts(),
            "invalid": self.invalid,  # rewritten by every run from its job: resume ignores it
            **({"summary": self.summary} if self.summary else {}),
            "segments": {sid: {k: v for k, v in vars(r).items() if v is not None} for sid, r in self.segments.items()},
        }
        # One segment per line: readable, diffable, and a damaged file still yields every intact line (see load).
        lines = ",\n".join(f"{json.dumps(k, ensure_ascii=False)}:{json.dumps(v, ensure_ascii=False)}"
                            for k, v in data.pop("segments").items())
        head = json.dumps(data, ensure_ascii=False)[:-1]
        atomic_write_bytes(self.path, f'{head}, "segments": {{\n{lines}\n}}}}\n'.encode())
        self._last_write = time.monotonic()
        self._last_cost = self._last_write - now
        return True
