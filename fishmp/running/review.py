"""Human review of a job's takes: a retake replaces a segment's written take and keeps the old one's file, an accept
clears `suspect` as a recorded human decision. The record logic and the files it moves; no processes, no HTTP.

A segment's record (results.SegmentRecord) describes its current take as the take check left it; review adds:
    history   the written takes it had before, oldest first: each the record's take fields as they were, plus `file`
              (kept under <output dir>/.takes/, relative to the output dir), `replaced_at` and `replaced_by`
    review    the human decision on the current take: {"decision": "accepted", "at", "by" (when known), "reasons"
              (what the take check had found)}; a retake starts without one
The current take always lies at the segment's own path and the record keeps the segment's fingerprint (the job asked
for this text in this voice; the seed is the reviewer's choice), so resume trusts a retaken segment as it trusts any.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from typing import Any

from ..worker.files import new_temp
from .results import Manifest, SegmentRecord

TAKES_DIR = ".takes"  # hidden: the output directory keeps one wav per segment, as apps reading it expect
# What a replaced take keeps in its history entry: the fields that describe one written take.
TAKE_FIELDS = ("seed", "suspect", "kept_take", "takes", "over_slot_s", "audio_seconds", "synthesis_seconds", "tokens",
               "worker", "device", "finished_at", "review", "fit")
# What a retake copies from its own run's record onto the segment's.
RETAKE_FIELDS = ("audio_seconds", "synthesis_seconds", "tokens", "worker", "device", "finished_at", "suspect", "seed",
                 "kept_take", "takes", "over_slot_s", "fit")


class ReviewError(Exception):
    """A review action that does not apply to the segment as it is. `kind`: unknown_segment, not_finished (pending:
    its job has not written it), not_suspect."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _record(manifest: Manifest, sid: str) -> SegmentRecord:
    rec = manifest.segments.get(sid)
    if rec is None:
        raise ReviewError("unknown_segment", f"the manifest has no segment {sid!r}")
    return rec


def seeds_tried(rec: SegmentRecord) -> list[int]:
    """Every seed this segment's takes used, the replaced ones included (an unseeded take uses none)."""
    takes = list(rec.takes or [])
    for old in rec.history or []:
        takes += old.get("takes") or []
        takes.append({"seed": old.get("seed")})
    seeds = [t.get("seed") for t in takes if isinstance(t, dict)] + [rec.seed]
    return [s for s in seeds if isinstance(s, int) and not isinstance(s, bool)]


def next_seed(rec: SegmentRecord, base: int | None = None) -> int:
    """The seed of a retake: one past every seed tried so far (and past the segment's own `base`), so a retake never
    repeats a take; 1 when none was seeded (the unseeded first take's retries start at 1 too)."""
    seeds = seeds_tried(rec) + ([base] if base is not None else [])
    return max(seeds) + 1 if seeds else 1


def check_retake(rec: SegmentRecord | None, sid: str) -> None:
    """A retake needs a finished segment (done, or failed: a retake may still make it)."""
    if rec is None:
        raise ReviewError("unknown_segment", f"the manifest has no segment {sid!r}")
    if rec.status == "pending":
        raise ReviewError("not_finished", f"segment {sid!r} is pending: its job has not written it yet (a retake "
                          "replaces a written take; wait for it)")


def take_file(manifest: Manifest, output_dir: str, output: str, number: int) -> str:
    """Where take `number` of the segment written at `output` is kept: .takes/<its path in the output dir, number
    before the extension>, never a path some segment writes to."""
    rel = os.path.relpath(os.path.abspath(output), os.path.abspath(output_dir))
    if rel.startswith(".."):
        rel = os.path.basename(output)
    stem, ext = os.path.splitext(rel)
    taken = {os.path.abspath(r.path) for r in manifest.segments.values() if r.path}
    suffix = ""
    while True:
        path = os.path.join(os.path.abspath(output_dir), TAKES_DIR, f"{stem}.{number}{suffix}{ext or '.wav'}")
        if path not in taken:
            return path
        suffix += "_"


def _keep(src: str, dst: str) -> None:
    """`dst` becomes a second name for `src`'s file (a hard link: no copy, and the rename that follows leaves it
    alone), or a copy where links cannot be made."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dst)  # left by an earlier attempt that died before its manifest was written
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _place(src: str, dst: str) -> None:
    """Move the new take's wav over the segment's path in one rename (a copy into a temp beside it first when they
    lie on different filesystems), so a reader sees the old take or the new one, never a part."""
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    try:
        os.replace(src, dst)
        return
    except OSError:
        pass
    tmp = new_temp(os.path.dirname(dst), ".wav")
    try:
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        os.unlink(src)


def adopt_retake(manifest: Manifest, sid: str, output_dir: str, new: SegmentRecord, seed: int,
                 by: str | None, now: float) -> SegmentRecord:
    """Make `new` (the record of a finished retake run, its wav at `new.path`) segment `sid`'s current take: the
    take written so far moves into `history` (its file kept under .takes/), the new wav takes the segment's path.
    `seed`: the seed the retake was asked for (recorded even when takes were not checked)."""
    rec = _record(manifest, sid)
    check_retake(rec, sid)
    if rec.path is None or new.path is None:
        raise ReviewError("not_finished", f"segment {sid!r} has no output path to write its retake to")
    history = list(rec.history or [])
    if rec.status == "done" and os.path.isfile(rec.path):
        kept = take_file(manifest, output_dir, rec.path, len(history) + 1)
        _keep(rec.path, kept)
        entry = {k: getattr(rec, k) for k in TAKE_FIELDS if getattr(rec, k) is not None}
        history.append({**entry, "file": os.path.relpath(kept, os.path.abspath(output_dir)), "replaced_at": now,
                        **({"replaced_by": by} if by else {})})
    _place(new.path, rec.path)
    for name in RETAKE_FIELDS:
        setattr(rec, name, getattr(new, name))
    raw = (rec.fit or {}).get("raw")
    if raw and os.path.isfile(raw):  # a fitted retake's raw take goes beside the segment's wav too (x.raw.wav)
        dst = rec.path[: -len(".wav")] + ".raw.wav" if rec.path.lower().endswith(".wav") else rec.path + ".raw.wav"
        _place(raw, dst)
        rec.fit = {**rec.fit, "raw": dst}
    if rec.seed is None:
        rec.seed = seed  # takes unchecked: the take used the seed it was asked for
    rec.status, rec.error, rec.error_kind, rec.review, rec.history = "done", None, None, None, history
    rec.attempts = max(rec.attempts, 1)
    return rec


def accept(manifest: Manifest, sid: str, by: str | None, now: float) -> SegmentRecord:
    """A person listened and keeps the take: `suspect` is cleared and the decision recorded beside it."""
    rec = _record(manifest, sid)
    if rec.status != "done":
        raise ReviewError("not_finished", f"segment {sid!r} is {rec.status}: only a written take can be accepted")
    if not rec.suspect:
        if rec.review:
            why = "it was accepted already" + (f" by {rec.review['by']}" if rec.review.get("by") else "")
        elif rec.suspect is None:
            why = "its takes were not checked (FISH_TAKE_CHECK=false)"
        else:
            why = "its take passed the take check"
        raise ReviewError("not_suspect", f"segment {sid!r} is not suspect: {why}")
    kept = (rec.takes or [])[rec.kept_take] if rec.takes and rec.kept_take is not None else {}
    rec.review = {"decision": "accepted", "at": now, **({"by": by} if by else {}),
                  "reasons": list(kept.get("reasons") or [])}
    rec.suspect = False
    return rec


def take_state(rec: SegmentRecord) -> dict[str, Any]:
    """The segment's take as the job API and its events show it (no absolute paths)."""
    fields = ("status", "audio_seconds", "synthesis_seconds", "tokens", "worker", "device", "attempts", "seed", "suspect",
              "kept_take", "takes", "over_slot_s", "review", "history")
    return {k: getattr(rec, k) for k in fields if getattr(rec, k) is not None}
