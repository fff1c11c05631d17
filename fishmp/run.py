"""The job loop: turn a validated job into wavs with a WorkerPool, a Scheduler and a Manifest.

Each turn of the loop is a named step: handle a stop request -> dispatch -> wait for messages, deaths or a
deadline -> apply them -> enforce deadlines -> save the manifest (throttled). Every segment is always in exactly
one state in the manifest: pending, done (with a readable wav) or failed (with a reason).
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from typing import Any

from .job import Job, JobError, Segment, Speaker, reference_fingerprint, segment_fingerprint
from .pool import WorkerHandle, WorkerPool, describe_exit
from .progress import EventCallback, make_event
from .results import Manifest, SegmentRecord, output_dir_problem, remove_temp_files, wav_ok
from .scheduler import Scheduler, Task
from .worker import Done, Failed, LoadFailed, Ready, SegmentTask, SpeakerRef, Started

log = logging.getLogger("fishmp")
LEAVE_TIMEOUT_S = 30.0  # a worker that said it is leaving but hangs (e.g. in CUDA teardown) is killed after this


@dataclass
class JobResult:
    output_dir: str
    manifest_path: str
    records: dict[str, SegmentRecord]
    skipped: int = 0
    wall_seconds: float = 0.0
    interrupted: int | None = None  # the signal that stopped the job
    error: str | None = None  # why the job could not go on (no worker could load the model...)

    def count(self, status: str) -> int:
        return sum(1 for r in self.records.values() if r.status == status)

    @property
    def ok(self) -> bool:
        return self.interrupted is None and all(r.status == "done" for r in self.records.values())

    @property
    def exit_code(self) -> int:
        if self.interrupted is not None:
            return 128 + self.interrupted
        return 0 if self.ok else 1


def _reference_fingerprint(speaker: Speaker) -> str:
    """An unreadable reference gets a fingerprint that never matches: its segments are redone, and fail by name."""
    try:
        return reference_fingerprint(speaker)
    except OSError as exc:
        return f"unreadable:{time.time()}:{exc}"


class JobRun:
    def __init__(self, pool: WorkerPool, job: Job, engine_fingerprint: str, on_event: EventCallback | None = None,
                 resume: bool = True) -> None:
        self.pool, self.job, self.settings = pool, job, pool.settings
        self.emit = on_event or (lambda ev: None)
        self.resume = resume
        self.manifest = Manifest.load(job.output_dir)
        self.manifest.job = job.source
        self.segments: dict[str, Segment] = {s.id: s for s in job.segments}
        ref_fp = {sid: _reference_fingerprint(sp) for sid, sp in job.speakers.items()}
        self.fingerprints = {s.id: segment_fingerprint(s, ref_fp[s.speaker], engine_fingerprint) for s in job.segments}
        self.refs = {sid: SpeakerRef(sid, sp.reference_text, sp.reference_audio, sp.prompt_tokens, ref_fp[sid])
                     for sid, sp in job.speakers.items()}
        self.oom_by_device: dict[str, int] = {}
        self.stopping_since: float | None = None
        self.error: str | None = None
        self.manifest_error: str | None = None
        self.last_load_error: str | None = None

    # -- set-up -----------------------------------------------------------------------------------------------------
    def _already_done(self, seg: Segment) -> bool:
        rec = self.manifest.segments.get(seg.id)
        return (self.resume and rec is not None and rec.status == "done" and rec.path == seg.output
                and rec.fingerprint == self.fingerprints[seg.id] and wav_ok(seg.output))

    def _prepare(self) -> Scheduler:
        keep = {s.id for s in self.job.segments}
        for sid in list(self.manifest.segments):  # a manifest from an older version of the job
            if sid not in keep:
                del self.manifest.segments[sid]
        todo: list[Task] = []
        self.skipped = 0
        for seg in self.job.segments:
            if self._already_done(seg):
                self.skipped += 1
                continue
            self.manifest.segments[seg.id] = SegmentRecord(status="pending", path=seg.output, speaker=seg.speaker,
                                                           fingerprint=self.fingerprints[seg.id])
            todo.append(Task(seg.id, seg.speaker, cost=float(len(seg.text))))
        problem = output_dir_problem(self.job.output_dir)
        if problem:
            raise JobError([problem], self.job.source)
        self._save_manifest()
        return Scheduler(todo, max_attempts=self.settings.max_attempts)

    def _save_manifest(self, min_interval_s: float = 0.0) -> None:
        """A full disk must not stop the job: the wavs are the results; the manifest is retried on the next save."""
        try:
            self.manifest.save(min_interval_s)
        except OSError as exc:
            if not self.manifest_error:
                log.error("[Main] cannot write %s: %s (will keep trying)", self.manifest.path, exc.strerror or exc)
            self.manifest_error = str(exc)
        else:
            self.manifest_error = None

    # -- the loop -----------------------------------------------------------------------------------------------------
    def run(self) -> JobResult:
        t0 = time.monotonic()
        sched = self.sched = self._prepare()
        self.emit(make_event("plan", segments=len(self.job.segments), skipped=self.skipped, speakers=len(self.job.speakers),
                             workers=len(self.pool.live_handles()), mode=self.pool.plan.mode,
                             output_dir=self.job.output_dir, pid=os.getpid(), plan=self.pool.plan.to_dict()))
        for seg in self.job.segments:
            if seg.id not in sched.tasks:
                rec = self.manifest.segments[seg.id]
                self.emit(make_event("segment_done", id=seg.id, path=seg.output, skipped=True,
                                     audio_seconds=rec.audio_seconds or 0.0, synthesis_seconds=0.0, worker=None))
        try:
            while not sched.all_finished:
                if self.pool.stop_signal is not None and self._stop_step():
                    break
                if self.stopping_since is None:
                    self._dispatch()
                if all(h.state == "dead" for h in self.pool.handles.values()):  # exits seen, none replaced
                    self._no_workers_left()
                    break
                for kind, h, payload in self.pool.poll(self._next_timeout()):
                    if kind == "msg":
                        self._on_message(h, payload)
                    else:
                        self._on_exit(h, payload)
                self._enforce_deadlines()
                self._save_manifest(min_interval_s=1.0)
        finally:
            self._save_manifest()
            remove_temp_files({os.path.dirname(s.output) for s in self.job.segments} | {self.job.output_dir})
        result = JobResult(self.job.output_dir, self.manifest.path, self.manifest.segments, self.skipped,
                           time.monotonic() - t0, self.pool.stop_signal, self.error)
        self.emit(make_event("finished", done=result.count("done"), failed=result.count("failed"),
                             pending=result.count("pending"), skipped=self.skipped,
                             audio_seconds=sum(r.audio_seconds or 0 for r in self.manifest.segments.values()),
                             wall_seconds=round(result.wall_seconds, 3), exit_code=result.exit_code,
                             interrupted=signal.Signals(result.interrupted).name if result.interrupted else None,
                             manifest=self.manifest.path))
        return result

    def _dispatch(self) -> None:
        ready = [h for h in self.pool.handles.values() if h.state == "ready"]
        if not ready:
            return
        # Round 1 gives every idle worker a segment; round 2 queues one segment behind each running one, so a worker
        # never waits on this process between segments. Rounds, not filling one worker at a time: otherwise worker 0
        # takes the two longest segments. A queued segment is committed early, which is only worth it for short ones:
        # near the end of the job, or for a segment longer than a fair share of what is left (half of pending work per
        # worker), it is left for whichever worker frees up first (longest-first stays longest-first).
        rounds = (1, 2) if self.sched.pending_count >= 2 * len(ready) else (1,)
        for target in rounds:
            max_cost = self.sched.pending_total_cost / (2 * len(ready)) if target == 2 else None
            for h in ready:
                # A worker's load: its running segment plus those not started yet (one being written does not count).
                unstarted = sum(1 for t in h.outstanding if t not in h.started)
                if unstarted + (h.running is not None) >= target:
                    continue
                if not self.sched.pending_count:
                    return
                task = self.sched.next_for(h.id, max_cost)
                if task is None:
                    continue
                seg = self.segments[task.id]
                msg = SegmentTask(seg.id, seg.text, self.refs[seg.speaker], seg.params.to_dict(), seg.output)
                if not self.pool.send(h, msg):
                    self.sched.requeue(task.id, count_attempt=False)
                elif h.running is None and not unstarted:
                    h.running_since = time.monotonic()  # its deadline starts now: nothing is ahead of it

    def _next_timeout(self) -> float:
        """Wake up in time for the nearest deadline (segment timeout, load timeout, shutdown grace)."""
        now, soonest = time.monotonic(), 5.0
        for h in self.pool.handles.values():
            if h.state == "leaving" and h.kill_reason is None:
                soonest = min(soonest, h.leaving_since + LEAVE_TIMEOUT_S - now)
            elif h.state == "starting":
                soonest = min(soonest, h.spawned_at + self.settings.load_timeout_s - now)
            elif h.state == "ready" and h.running is not None:
                soonest = min(soonest, h.running_since + self._timeout_for(h.running) - now)
        if self.stopping_since is not None:
            soonest = min(soonest, self.stopping_since + self.settings.shutdown_grace_s - now)
        return max(0.0, soonest)

    def _timeout_for(self, task_id: str) -> float:
        text = self.segments[task_id].text
        return self.settings.segment_timeout_s + self.settings.segment_timeout_per_char_s * len(text)

    # -- messages -------------------------------------------------------------------------------------------------------
    def _on_message(self, h: WorkerHandle, msg: Any) -> None:
        if isinstance(msg, Ready):
            h.state, h.pid, h.ever_ready = "ready", msg.pid, True
            self.emit(make_event("worker_ready", worker=h.id, pid=msg.pid, device=h.device,
                                 load_seconds=round(msg.load_seconds, 3)))
        elif isinstance(msg, LoadFailed):
            h.state, h.leaving, h.leaving_since = "leaving", True, time.monotonic()
            self.last_load_error = msg.message
            log.error("[Worker %s] could not load the model on %s: %s", h.id, h.device, msg.message)
        elif isinstance(msg, Started):
            h.running, h.running_since = msg.task, time.monotonic()
            h.started.add(msg.task)
        elif isinstance(msg, Done):
            self._finish(h, msg.task)
            self.sched.done(msg.task)
            rec = self.manifest.segments[msg.task]
            rec.status, rec.audio_seconds, rec.synthesis_seconds, rec.tokens = (
                "done", round(msg.audio_seconds, 3), round(msg.synthesis_seconds, 3), msg.tokens)
            rec.worker, rec.device, rec.finished_at = h.id, h.device, time.time()
            rec.attempts, rec.error, rec.error_kind = self.sched.tasks[msg.task].attempts + 1, None, None
            self.emit(make_event("segment_done", id=msg.task, path=msg.path, audio_seconds=rec.audio_seconds,
                                 synthesis_seconds=rec.synthesis_seconds, tokens=msg.tokens, worker=h.id,
                                 pid=h.pid, device=h.device, attempts=rec.attempts))
        elif isinstance(msg, Failed):
            self._finish(h, msg.task)
            if msg.kind == "out_of_memory" or not msg.input_error:
                # It exits after this message; a clean one replaces it.
                h.state, h.leaving, h.leaving_since = "leaving", True, time.monotonic()
            if msg.kind == "out_of_memory":
                self.oom_by_device[h.device] = self.oom_by_device.get(h.device, 0) + 1
            if msg.input_error:
                self._fail(msg.task, msg.kind, msg.message, h)
                if msg.kind == "bad_reference":  # every segment of that voice would fail the same way
                    speaker = self.segments[msg.task].speaker
                    for tid in self.sched.pending_of_speaker(speaker):
                        self._fail(tid, msg.kind, msg.message, None)
            else:
                self._requeue(msg.task, f"{msg.kind}: {msg.message}", h, counted=True)

    def _finish(self, h: WorkerHandle, task_id: str) -> None:
        h.started.discard(task_id)
        if task_id in h.outstanding:
            h.outstanding.remove(task_id)
        if h.running == task_id:
            h.running = None
            h.running_since = time.monotonic()  # the queued-ahead segment starts now

    def _fail(self, task_id: str, kind: str, message: str, h: WorkerHandle | None) -> None:
        self.sched.failed(task_id)
        rec = self.manifest.segments[task_id]
        rec.status, rec.error_kind, rec.error = "failed", kind, message
        rec.attempts = max(self.sched.tasks[task_id].attempts, 1)
        rec.worker, rec.device, rec.finished_at = (h.id if h else None), (h.device if h else None), time.time()
        self.emit(make_event("segment_failed", id=task_id, kind=kind, error=message, worker=rec.worker,
                             pid=h.pid if h else None, device=rec.device, attempts=rec.attempts))

    def _requeue(self, task_id: str, reason: str, h: WorkerHandle, counted: bool) -> None:
        if self.sched.requeue(task_id, count_attempt=counted):
            self.manifest.segments[task_id].attempts = self.sched.tasks[task_id].attempts
            self.emit(make_event("segment_requeued", id=task_id, reason=reason, attempts=self.sched.tasks[task_id].attempts,
                                 worker=h.id, pid=h.pid, device=h.device))
        else:
            n = self.sched.tasks[task_id].attempts
            self._fail(task_id, "poison", f"this segment stopped its worker {n} times (FISH_MAX_ATTEMPTS="
                       f"{self.settings.max_attempts}); last: {reason}", h)

    # -- deaths -----------------------------------------------------------------------------------------------------------
    def _on_exit(self, h: WorkerHandle, code: int | None) -> None:
        deliberate = h.kill_reason is None and h.leaving
        reason = h.kill_reason or (describe_exit(code) if not deliberate else "recycled after a failure")
        if not h.ever_ready and not deliberate:
            self.last_load_error = f"the worker stopped while loading the model: {reason}"
        if h.outstanding:
            running = h.running
            for tid in list(h.outstanding):
                # Only the segment it was running can have caused the death; the one queued behind it is innocent.
                self._requeue(tid, reason, h, counted=(tid == running and not deliberate))
            h.outstanding.clear()
        h.running = None
        self.sched.worker_gone(h.id)
        if self.stopping_since is not None or self.sched.all_finished:
            return
        self.emit(make_event("worker_died", worker=h.id, pid=h.pid, device=h.device, exit_code=code, reason=reason))
        if self._drop_for_oom(h):
            return
        if self.sched.pending_count or self.sched.outstanding:
            if self.pool.respawn(h.slot) is None:
                log.warning("[Worker %s] slot %d on %s used its %d restarts (FISH_MAX_RESTARTS): going on with fewer "
                            "workers", h.id, h.slot, h.device, self.settings.max_restarts)

    def _drop_for_oom(self, h: WorkerHandle) -> bool:
        """Out of memory twice on one GPU: that GPU holds fewer workers than planned, so drop this slot."""
        if self.oom_by_device.get(h.device, 0) < 2:
            return False
        others = [o for o in self.pool.live_handles() if o.device == h.device]
        if not others:
            return False
        self.pool.dropped.add(h.slot)
        self.oom_by_device[h.device] = 0
        log.warning("[Main] repeated out-of-memory on %s: dropping a worker there (%d left); raise FISH_MODEL_MEMORY_GB",
                    h.device, len(others))
        return True

    def _no_workers_left(self) -> None:
        cause = self.last_load_error
        self.error = ("no worker could load the model: " + cause) if cause else "every worker slot used its restarts"
        for tid in list(self.sched.outstanding) + [t for t in self.sched.tasks if t not in self.sched.finished]:
            if tid not in self.sched.finished:
                self._fail(tid, "no_workers", self.error, None)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for h in self.pool.handles.values():
            if h.state == "leaving" and h.kill_reason is None and now - h.leaving_since > LEAVE_TIMEOUT_S:
                self.pool.kill(h, f"it announced its exit but was still running {LEAVE_TIMEOUT_S:g}s later")
            elif h.state == "starting" and now - h.spawned_at > self.settings.load_timeout_s:
                self.pool.kill(h, f"model load took longer than FISH_LOAD_TIMEOUT_S={self.settings.load_timeout_s:g}s")
            elif h.state == "ready" and h.running is not None and now - h.running_since > self._timeout_for(h.running):
                limit = self._timeout_for(h.running)
                self.pool.kill(h, f"segment {h.running} ran past its {limit:.0f}s deadline (FISH_SEGMENT_TIMEOUT_S + "
                                  "FISH_SEGMENT_TIMEOUT_PER_CHAR_S x characters)")

    # -- stopping --------------------------------------------------------------------------------------------------------
    def _stop_step(self) -> bool:
        """On the first signal: stop dispatching and give running segments the grace period. True = stop now."""
        now = time.monotonic()
        if self.stopping_since is None:
            self.stopping_since = now
            log.warning("[Main] %s: finishing running segments (up to %gs, FISH_SHUTDOWN_GRACE_S); again to stop now",
                        signal.Signals(self.pool.stop_signal).name, self.settings.shutdown_grace_s)
        if self.pool.stop_count > 1 or now - self.stopping_since >= self.settings.shutdown_grace_s:
            return True
        return not any(h.running for h in self.pool.live_handles())

