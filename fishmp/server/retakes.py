"""Review of a stored job's takes: a retake of a segment as a job of its own on the shared pool, and accept.

A retake is a job of one segment (the segment's text, voice, params and slot; seed: the next one, review.next_seed)
at interactive priority, like a single line, in `<job dir>/retakes/<n>/`. Once its take is written, it becomes the
segment's current take (running/review.adopt_retake: the old take's file is kept under `out/.takes/`, the manifest
records it in `history`), through the job's own run while that runs, else under the output directory's lock
(running/amend.py). Accept clears `suspect` the same way and records the decision. Each step is an event in the job's
log (`retake_started`, `segment_retaken`, `retake_failed`, `segment_accepted`; see jobview.py), so the page's event
stream shows it and a restarted server rebuilds the same view. One review step at a time per job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import time
import uuid
from typing import Any

from ..job import JobError, job_from_dict
from ..running.amend import edit_manifest
from ..running.progress import make_event
from ..running.results import Manifest, ManifestError, OutputDirError, SegmentRecord
from ..running.review import ReviewError, accept, adopt_retake, next_seed, take_state
from .errors import ApiError
from .jobstore import JobStore, StoredJob
from .state import INTERACTIVE_PRIORITY, ServerState, Submission

log = logging.getLogger("fishmp")
REVIEW_STATUS = {"unknown_segment": (404, "unknown segment"), "not_finished": (409, "segment not finished"),
                 "not_suspect": (409, "segment not suspect")}
EDIT_TIMEOUT_S = 60.0


def _api_error(exc: Exception) -> ApiError:
    if isinstance(exc, ReviewError):
        status, error = REVIEW_STATUS.get(exc.kind, (409, "cannot review"))
        return ApiError(status, error, str(exc))
    if isinstance(exc, TimeoutError):
        return ApiError(503, "job busy", f"{exc}: retry")
    if isinstance(exc, ManifestError):  # edited or cut short on disk: the job's state, not a server fault
        return ApiError(409, "manifest damaged", f"the job's manifest.json cannot be used: {exc}")
    return ApiError(500, "manifest not written", str(exc))


def _slot(segment: Any) -> dict[str, Any]:
    """A retake is fitted as its segment is (the same settings and slot: fishmp/job/fitting.py), or judged by its
    max_seconds alone when the segment is not fitted."""
    if segment.fit is not None:
        return {"max_seconds": segment.slot, "fit": {**segment.fit.to_dict(), "borrow_gap": False}}
    return {"max_seconds": segment.max_seconds, "fit": False} if segment.max_seconds is not None else {}


class Review:
    def __init__(self, state: ServerState, jobs: JobStore) -> None:
        self.state, self.jobs = state, jobs
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, sj: StoredJob) -> asyncio.Lock:
        return self._locks.setdefault(sj.id, asyncio.Lock())

    @staticmethod
    def segment(sj: StoredJob, sid: str) -> dict:
        seg = sj.view.segments.get(sid)
        if seg is None:
            raise ApiError(404, "unknown segment", f"job {sj.id} has no segment {sid!r}")
        if sid in sj.view.retaking:
            raise ApiError(409, "retake running", f"segment {sid!r} has a retake running (seed "
                           f"{seg['retake'].get('seed')}): wait for its take")
        return seg

    async def _edit(self, sj: StoredJob, fn: Any) -> dict:
        """fn(manifest) on the job's manifest (amend.py), off the event loop; its errors as JSON errors. The caller
        holds the job's lock."""
        handle = sj.sub.handle if sj.sub is not None else None
        try:
            return await asyncio.to_thread(edit_manifest, sj.out, fn, handle, EDIT_TIMEOUT_S)
        except (ReviewError, TimeoutError, ManifestError, OutputDirError, OSError) as exc:
            raise _api_error(exc) from None

    # -- retake ------------------------------------------------------------------------------------------------------
    @staticmethod
    def _job_segment(sj: StoredJob, sid: str) -> tuple[dict, Any]:
        """(job.json as stored, the segment as the job runs it: params merged, its slot). Off the event loop: a film's
        job.json is thousands of segments."""
        with open(os.path.join(sj.dir, "job.json"), encoding="utf-8") as f:
            resolved = json.load(f)
        try:
            return resolved, next(s for s in job_from_dict(resolved, sj.dir, sj.out).segments if s.id == sid)
        except (JobError, StopIteration) as exc:
            raise ApiError(409, "cannot retake", f"segment {sid!r} of job {sj.id} cannot be made again: {exc}") from None

    async def retake(self, sj: StoredJob, sid: str, by: str | None) -> dict:
        """Start a retake of a written (or failed) segment; its take replaces the current one when done."""
        async with self._lock(sj):  # two requests at once: the second sees the first's retake running
            seg = self.segment(sj, sid)
            if seg["status"] == "pending":
                raise ApiError(409, "segment not finished", f"segment {sid!r} is pending in its job: a retake replaces "
                               "a written take, so wait until it is done (or failed)")
            self.state.check_accepting()
            resolved, segment = await asyncio.to_thread(self._job_segment, sj, sid)
            return self._start(sj, sid, seg, resolved, segment, by)

    def _start(self, sj: StoredJob, sid: str, seg: dict, resolved: dict, segment: Any, by: str | None) -> dict:
        current = SegmentRecord(seed=seg.get("seed"), takes=seg.get("takes"), history=seg.get("history"))
        seed = next_seed(current, segment.params.seed)
        directory = os.path.join(sj.dir, "retakes", uuid.uuid4().hex[:12])
        data = {"speakers": {segment.speaker: resolved["speakers"][segment.speaker]},
                "segments": [{"id": sid, "speaker": segment.speaker, "text": segment.text, "output": "take.wav",
                              "params": {**segment.params.to_dict(), "seed": seed},
                              **_slot(segment)}]}
        failures: dict[str, dict] = {}
        try:
            job = job_from_dict(data, sj.dir, directory)
        except JobError as exc:
            raise ApiError(409, "cannot retake", exc.problems) from None
        sub = Submission(self.state, job, directory, priority=INTERACTIVE_PRIORITY, resume=False,
                         on_event=lambda ev: failures.update({"ev": ev}) if ev["event"] == "segment_failed" else None)
        take = len(seg.get("history") or []) + (2 if seg["status"] == "done" else 1)  # a failed one had no take
        self.jobs.record(sj, make_event("retake_started", id=sid, seed=seed, take=take, **({"by": by} if by else {})))
        self.state.background(self._finish(sj, sid, sub, directory, seed, by, failures))
        return {"id": sj.id, "segment": sid, "status": "retaking", "seed": seed, "take": take}

    async def _finish(self, sj: StoredJob, sid: str, sub: Submission, directory: str, seed: int, by: str | None,
                      failures: dict) -> None:
        await sub.ended()
        try:
            new = Manifest.load(directory, repair=False).segments.get(sid) if sub.finished else None
            if new is None or new.status != "done":
                ev = failures.get("ev") or {}
                why = ev.get("error") or str(sub.error() or "the retake ended without a take (cancelled or stopped)")
                self._failed(sj, sid, seed, why, ev.get("kind"))
                return
            async with self._lock(sj):
                state = await self._edit(sj, lambda m: take_state(adopt_retake(m, sid, sj.out, new, seed, by,
                                                                               time.time())))
                self.jobs.record(sj, make_event("segment_retaken", id=sid, **state))
        except ApiError as exc:
            self._failed(sj, sid, seed, str(exc.detail), exc.error)
        except (ManifestError, OSError) as exc:
            self._failed(sj, sid, seed, str(exc), "manifest")
        finally:
            shutil.rmtree(directory, ignore_errors=True)

    def _failed(self, sj: StoredJob, sid: str, seed: int, error: str, kind: str | None) -> None:
        log.warning("[Serve] job %s: the retake of segment %s failed: %s", sj.id, sid, error)
        self.jobs.record(sj, make_event("retake_failed", id=sid, seed=seed, error=error,
                                        **({"kind": kind} if kind else {})))

    # -- accept ------------------------------------------------------------------------------------------------------
    async def accept(self, sj: StoredJob, sid: str, by: str | None) -> dict:
        """A person keeps the suspect take: recorded in the manifest, then in the job's events."""
        async with self._lock(sj):
            self.segment(sj, sid)
            state = await self._edit(sj, lambda m: take_state(accept(m, sid, by, time.time())))
            self.jobs.record(sj, make_event("segment_accepted", id=sid, review=state.get("review")))
        return state

    # -- start-up ----------------------------------------------------------------------------------------------------
    def recover(self) -> None:
        """Retakes a previous server left running are gone with it: each is recorded as failed (the old take stays)
        and its directory removed."""
        for sj in self.jobs.jobs.values():
            for sid in sj.view.retaking:
                seed = sj.view.segments[sid]["retake"].get("seed")
                self._failed(sj, sid, seed, "the server stopped before this retake was done: retake it again", "stopped")
            shutil.rmtree(os.path.join(sj.dir, "retakes"), ignore_errors=True)
