"""One job's state: its scheduler, manifest, events and result. The loop that drives workers lives in service.py.

Every segment is always in exactly one state in the manifest: pending, done (with a readable wav) or failed (with a
reason). Task ids sent to workers carry the job's number (`<job>:<segment id>`), so several jobs can share one pool
without mixing their segments up.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..backends.contract import PoolError, WorkerHandle
from ..config import Settings
from ..engines import SynthesisParams
from ..job import Job, JobError, Segment, Speaker, reference_fingerprint, segment_fingerprint
from ..worker.files import remove_temp_files, wav_ok
from ..worker.protocol import Done, Failed, SegmentTask, SpeakerRef
from ..worker.references import cache_dir_problem
from . import results, track
from .amend import Amendment, Amendments, Edit
from .delivery import EventDelivery
from .delivery import current as current_delivery
from .progress import EventCallback, make_event
from .results import Manifest, SegmentRecord, output_dir_problem
from .scheduler import Scheduler, Task

log = logging.getLogger("fishmp")
DEFAULT_MAX_NEW_TOKENS = SynthesisParams().max_new_tokens  # the engines' default, for a segment that sets none
MANIFEST_EXIT = 5  # the job ran, but its final manifest.json could not be written
FINAL_SAVE_RETRIES_S = (0.5, 2.0)  # waits between the final manifest write's attempts (a disk freeing up)


@dataclass
class JobResult:
    output_dir: str
    manifest_path: str
    records: dict[str, SegmentRecord]
    skipped: int = 0
    wall_seconds: float = 0.0
    interrupted: int | None = None  # the signal that stopped the job (SIGTERM for a cancelled one)
    error: str | None = None  # why the job could not go on (no worker could load the model...)
    cancelled: bool = False  # stopped by JobHandle.cancel(), not by a signal to the whole pool
    callback_error: str | None = None  # the job's on_event raised this; it got no events after it (delivery.py)
    manifest_error: str | None = None  # the final manifest.json could not be written (after retries): exit code 5

    def count(self, status: str) -> int:
        return sum(1 for r in self.records.values() if r.status == status)

    @property
    def ok(self) -> bool:
        return self.interrupted is None and all(r.status == "done" for r in self.records.values())

    @property
    def exit_code(self) -> int:
        """5 when the final manifest could not be written (the wavs are there, resume cannot know it: said first),
        else `outcome_exit_code`."""
        return MANIFEST_EXIT if self.manifest_error is not None else self.outcome_exit_code

    @property
    def outcome_exit_code(self) -> int:
        """What the segments say: 128 + signal when interrupted, 0 all done, 1 otherwise."""
        if self.interrupted is not None:
            return 128 + self.interrupted
        return 0 if self.ok else 1


def _reference_fingerprint(speaker: Speaker) -> str:
    """An unreadable reference gets a fingerprint that never matches: its segments are redone, and fail by name."""
    try:
        return reference_fingerprint(speaker)
    except OSError as exc:
        return f"unreadable:{time.time()}:{exc}"


def _fingerprints(job: Job, engine_fingerprint: str) -> tuple[dict[str, str], dict[str, str]]:
    ref_fp = {sid: _reference_fingerprint(sp) for sid, sp in job.speakers.items()}
    return ref_fp, {s.id: segment_fingerprint(s, ref_fp[s.speaker], engine_fingerprint) for s in job.segments}


def _already_done(manifest: Manifest, seg: Segment, fingerprint: str, resume: bool) -> bool:
    rec = manifest.segments.get(seg.id)
    return (resume and rec is not None and rec.status == "done" and rec.path == seg.output
            and rec.fingerprint == fingerprint and wav_ok(seg.output))


def warn_if_no_cache(cache_dir: str) -> None:
    """One warning when FISH_CACHE_DIR cannot hold encoded references: the job runs without the cache (workers encode
    each voice they meet), and no segment is blamed for it."""
    if problem := cache_dir_problem(cache_dir):
        log.warning("[Main] FISH_CACHE_DIR %s cannot be used (%s): reference audio is encoded without the cache, "
                    "again by each worker and each job; fix or change FISH_CACHE_DIR", cache_dir, problem)


def remaining_segments(job: Job, engine_fingerprint: str, resume: bool = True) -> int:
    """How many segments a run of `job` would synthesize (the rest resume from the manifest): plan workers for these."""
    if not resume:
        return len(job.segments)
    manifest = Manifest.load(job.output_dir)
    _, fps = _fingerprints(job, engine_fingerprint)
    return sum(1 for s in job.segments if not _already_done(manifest, s, fps[s.id], resume))


class JobRun:
    """A job in flight. The loop (service.py) calls these methods from its one thread."""

    def __init__(self, job: Job, engine_fingerprint: str, settings: Settings, on_event: EventCallback | None = None,
                 resume: bool = True, number: int = 0, priority: float = 1.0, stream: bool = False) -> None:
        self.job, self.settings, self.resume, self.number = job, settings, resume, number
        self.stream = stream  # its segments stream: `segment_audio` events before each segment_done (worker/streams.py)
        self.priority = priority
        # Events go to the callback from a thread of their own (delivery.py), never from the loop's.
        self.delivery = EventDelivery(on_event, job.output_dir) if on_event else None
        self.emit: EventCallback = self.delivery.put if self.delivery else (lambda ev: None)
        self.segments: dict[str, Segment] = {s.id: s for s in job.segments}
        ref_fp, self.fingerprints = _fingerprints(job, engine_fingerprint)
        self.refs = {sid: SpeakerRef(sid, sp.reference_text, sp.reference_audio, sp.prompt_tokens, ref_fp[sid])
                     for sid, sp in job.speakers.items()}
        self.stop_signal: int | None = None  # set when this job is being stopped (cancel or the pool's signal)
        self.cancelled = False
        self.stopping_since: float | None = None
        self.error: str | None = None
        self.manifest_error: str | None = None
        self.suspect_slots: dict[str, list[Any]] = {}  # segment -> the deaths blamed on it (service.Blame)
        self.lock: Any = None
        self.t0 = time.monotonic()
        self.skipped = 0
        self.gpu_stats: Any = None  # telemetry.GpuStats, set by the service when it samples GPUs
        self.amends = Amendments()  # a reviewer's edits to the manifest, applied on the loop's thread (amend.py)

    # -- set-up -----------------------------------------------------------------------------------------------------
    def prepare(self, workers: int, plan: dict, mode: str) -> None:
        """Lock the output directory, read the manifest, queue what is not done yet, announce the plan."""
        problem = output_dir_problem(self.job.output_dir)
        if problem:
            raise JobError([problem], self.job.source)
        # Held for the whole job, released in finish(); OutputDirBusy names the holder when another job has it.
        self.lock = results.OutputDirLock(self.job.output_dir).acquire()
        try:
            self._queue(workers, plan, mode)
        except BaseException:
            self.lock.release()
            raise
        if self.sched.pending_count and any(sp.reference_audio for sp in self.job.speakers.values()):
            warn_if_no_cache(self.settings.cache_dir)

    def _queue(self, workers: int, plan: dict, mode: str) -> None:
        self.manifest = Manifest.load(self.job.output_dir)
        self.manifest.job = self.job.source
        self.manifest.invalid = list(self.job.invalid)  # why items were left out, for the app that wrote them
        self.manifest.summary = {}  # this run's figures, not an earlier run's
        keep = set(self.segments)
        for sid in list(self.manifest.segments):  # a manifest from an older version of the job
            if sid not in keep:
                del self.manifest.segments[sid]
        todo: list[Task] = []
        for seg in self.job.segments:
            if _already_done(self.manifest, seg, self.fingerprints[seg.id], self.resume):
                self.skipped += 1
                continue
            self.manifest.segments[seg.id] = SegmentRecord(status="pending", path=seg.output, speaker=seg.speaker,
                                                           fingerprint=self.fingerprints[seg.id])
            todo.append(Task(seg.id, seg.speaker, cost=float(len(seg.text))))
        self.save_manifest()
        self.sched = Scheduler(todo, max_attempts=self.settings.max_attempts)
        self.emit(make_event("plan", segments=len(self.job.segments), skipped=self.skipped,
                             speakers=len(self.job.speakers), workers=workers, mode=mode,
                             output_dir=self.job.output_dir, pid=os.getpid(), plan=plan))
        for seg in self.job.segments:
            if seg.id not in self.sched.tasks:
                rec = self.manifest.segments[seg.id]
                self.emit(make_event("segment_done", id=seg.id, path=seg.output, skipped=True,
                                     audio_seconds=rec.audio_seconds or 0.0, synthesis_seconds=0.0, worker=None))

    def save_manifest(self, min_interval_s: float = 0.0) -> None:
        """A full disk must not stop the job: the wavs are the results; the manifest is retried on the next save.
        Edits handed in by JobHandle.amend are applied first and saved at once."""
        if not self.amends.apply(self.manifest, lambda: self._save(0.0)):
            self._save(min_interval_s)

    def _save(self, min_interval_s: float) -> str | None:
        try:
            self.manifest.save(min_interval_s)
        except OSError as exc:
            if not self.manifest_error:
                log.error("[Main] cannot write %s: %s (will keep trying)", self.manifest.path, exc.strerror or exc)
            self.manifest_error = exc.strerror or str(exc)
        else:
            self.manifest_error = None
        return self.manifest_error

    # -- work -----------------------------------------------------------------------------------------------------------
    def gid(self, segment_id: str) -> str:
        return f"{self.number}:{segment_id}"

    def message_for(self, task: Task, solo: bool) -> SegmentTask:
        seg = self.segments[task.id]
        args: dict[str, Any] = {}
        if solo and "solo" in SegmentTask.__dataclass_fields__:
            args["solo"] = True
        if seg.max_seconds is not None:
            args["max_seconds"] = seg.max_seconds
        if self.stream:
            args["stream"] = True
        if seg.fit is not None:  # fitted: the settings, the slot and where the raw take goes (fishmp/worker/fit.py)
            args["fit"] = {**seg.fit.to_dict(), "slot": seg.slot, "raw_output": seg.raw_output}
        return SegmentTask(self.gid(seg.id), seg.text, self.refs[seg.speaker], seg.params.to_dict(), seg.output,
                           **args)

    def timeout_for(self, segment_id: str) -> float:
        """FISH_SEGMENT_TIMEOUT_S + _PER_CHAR_S x characters + _PER_FRAME_S x the frames it may decode (its
        max_new_tokens, 1024 unless set): a healthy 1023-frame take must not be killed as a hang."""
        seg = self.segments[segment_id]
        frames = seg.params.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
        s = self.settings
        return s.segment_timeout_s + s.segment_timeout_per_char_s * len(seg.text) + s.segment_timeout_per_frame_s * frames

    @property
    def finished(self) -> bool:
        return self.sched.all_finished

    # -- outcomes ---------------------------------------------------------------------------------------------------
    def _resolve(self, sid: str, poison: bool) -> None:
        """Its fate is known: deaths blamed on a poison segment are refunded to their slots; otherwise they stay."""
        for blame in self.suspect_slots.pop(sid, []):
            blame.settle((self.number, sid), poison)

    def blame(self, sid: str, blame: Any) -> None:
        """A death is (partly) blamed on this segment: it runs solo from now on (see service.py)."""
        blame.add((self.number, sid))
        self.suspect_slots.setdefault(sid, []).append(blame)

    def on_done(self, h: WorkerHandle, sid: str, msg: Done) -> None:
        self.sched.done(sid)
        self._resolve(sid, poison=False)
        rec = self.manifest.segments[sid]
        rec.status, rec.audio_seconds, rec.synthesis_seconds, rec.tokens = (
            "done", round(msg.audio_seconds, 3), round(msg.synthesis_seconds, 3), msg.tokens)
        rec.worker, rec.device, rec.finished_at = h.id, h.device, time.time()
        rec.attempts, rec.error, rec.error_kind = self.sched.tasks[sid].attempts + 1, None, None
        take = results.take_fields(getattr(msg, "take", None), getattr(msg, "fit", None))  # takes.py, fit.py
        for name, value in take.items():
            setattr(rec, name, value)
        self.emit(make_event("segment_done", id=sid, path=msg.path, audio_seconds=rec.audio_seconds,
                             synthesis_seconds=rec.synthesis_seconds, tokens=msg.tokens, worker=h.id,
                             pid=h.pid, device=h.device, attempts=rec.attempts,
                             **{k: v for k, v in take.items() if v is not None}))

    def on_failed(self, h: WorkerHandle, sid: str, msg: Failed) -> None:
        if msg.input_error:
            self.fail(sid, msg.kind, msg.message, h)
            if msg.kind == "bad_reference":  # every segment of that voice would fail the same way
                for tid in self.sched.pending_of_speaker(self.segments[sid].speaker):
                    self.fail(tid, msg.kind, msg.message, None)
        else:
            self.requeue(sid, f"{msg.kind}: {msg.message}", h, counted=True)

    def fail(self, sid: str, kind: str, message: str, h: WorkerHandle | None) -> None:
        self.sched.failed(sid)
        self._resolve(sid, poison=kind == "poison")
        rec = self.manifest.segments[sid]
        rec.status, rec.error_kind, rec.error = "failed", kind, message
        rec.attempts = max(self.sched.tasks[sid].attempts, 1)
        rec.worker, rec.device, rec.finished_at = (h.id if h else None), (h.device if h else None), time.time()
        self.emit(make_event("segment_failed", id=sid, kind=kind, error=message, worker=rec.worker,
                             pid=h.pid if h else None, device=rec.device, attempts=rec.attempts))

    def requeue(self, sid: str, reason: str, h: WorkerHandle, counted: bool) -> bool:
        """Back to pending (attempts + 1 when `counted`). False when it is now poison, and failed as such."""
        if self.sched.requeue(sid, count_attempt=counted):
            self.manifest.segments[sid].attempts = self.sched.tasks[sid].attempts
            self.emit(make_event("segment_requeued", id=sid, reason=reason, attempts=self.sched.tasks[sid].attempts,
                                 worker=h.id, pid=h.pid, device=h.device))
            return True
        n = self.sched.tasks[sid].attempts
        self.fail(sid, "poison", f"this segment stopped its worker {n} times (FISH_MAX_ATTEMPTS="
                  f"{self.settings.max_attempts}); last: {reason}", h)
        return False

    def fail_rest(self, kind: str, error: str) -> None:
        self.error = self.error or error
        for tid in list(self.sched.tasks):
            if tid not in self.sched.finished:
                self.fail(tid, kind, error, None)

    # -- stopping -----------------------------------------------------------------------------------------------------
    def stop(self, signum: int, cancelled: bool = False) -> None:
        if self.stop_signal is None:
            self.stop_signal, self.cancelled, self.stopping_since = signum, cancelled, time.monotonic()
            what = "cancelled" if cancelled else f"{signal.Signals(signum).name} (again to stop now)"
            log.warning("[Main] %s %s: finishing running segments (up to %gs, FISH_SHUTDOWN_GRACE_S)",
                        self.job.output_dir, what, self.settings.shutdown_grace_s)

    def finish(self, worker_pids: set[int]) -> JobResult:
        """Write the manifest, remove the temp files this process and `worker_pids` (its idle or dead workers) left,
        release the directory, say `finished`."""
        for sid in list(self.suspect_slots):
            self._resolve(sid, poison=False)
        gpus = self.gpu_stats.summary() if self.gpu_stats else {}  # telemetry: peak/mean per GPU, {} without one
        if gpus and isinstance(getattr(self.manifest, "summary", None), dict):
            self.manifest.summary["gpus"] = gpus
        if self.stop_signal is None:  # the film's track, when the job places its lines
            track.finish(self.job, self.manifest, self.emit)
        try:
            dirs = {os.path.dirname(s.output) for s in self.job.segments} | {self.job.output_dir}
            remove_temp_files(dirs, worker_pids)  # first: on a full disk that may be the room the manifest needs
            self.amends.apply(self.manifest, self._save_final, final=True)  # later edits: to the file (amend.py)
        finally:
            if self.lock is not None:
                self.lock.release()
        result = JobResult(self.job.output_dir, self.manifest.path, self.manifest.segments, self.skipped,
                           time.monotonic() - self.t0, self.stop_signal, self.error, self.cancelled,
                           manifest_error=self.manifest_error)
        self.emit(make_event("finished", done=result.count("done"), failed=result.count("failed"),
                             suspect=results.suspect_count(self.manifest.segments),
                             pending=result.count("pending"), skipped=self.skipped,
                             audio_seconds=sum(r.audio_seconds or 0 for r in self.manifest.segments.values()),
                             wall_seconds=round(result.wall_seconds, 3), exit_code=result.exit_code,
                             interrupted=signal.Signals(result.interrupted).name if result.interrupted else None,
                             cancelled=self.cancelled, manifest=self.manifest.path, **({"gpus": gpus} if gpus else {}),
                             **({"manifest_error": self.manifest_error} if self.manifest_error else {})))
        return result

    def _save_final(self) -> str | None:
        """The manifest resume trusts: retried, and when it still cannot be written the result says so (exit 5)."""
        for wait in (*FINAL_SAVE_RETRIES_S, None):
            self._save(0.0)
            if self.manifest_error is None or wait is None:
                break
            time.sleep(wait)
        if self.manifest_error is not None:
            log.error("[Main] the final %s could NOT be written: %s; the wavs are on disk, but a re-run redoes the "
                      "segments it does not list as done (free space and re-run)", self.manifest.path,
                      self.manifest_error)
        return self.manifest_error


class Blame:
    """One death blamed on the segments its worker had begun. It is refunded to the slot as soon as one of them ends
    as poison; once all of them ended otherwise, the death stays the slot's own."""

    def __init__(self, slot: int, resolve: Callable[[int, bool], None]) -> None:
        self.slot, self._resolve = slot, resolve
        self.members: set[tuple[int, str]] = set()
        self.closed = False

    def add(self, member: tuple[int, str]) -> None:
        if not self.closed:
            self.members.add(member)

    def settle(self, member: tuple[int, str], poison: bool) -> None:
        if self.closed or member not in self.members:
            return
        self.members.discard(member)
        if poison or not self.members:
            self.closed = True
            self._resolve(self.slot, poison)


class JobHandle:
    """A submitted job: `result()` waits for its JobResult, `cancel()` stops only this job."""

    def __init__(self, run: JobRun, service: Any) -> None:
        self._run, self._service = run, service
        self._done = threading.Event()
        self._result: JobResult | None = None
        self._error: BaseException | None = None
        self._outcome_set = False

    @property
    def job(self) -> Any:
        return self._run.job

    def done(self) -> bool:
        return self._done.is_set()

    def cancel(self) -> None:
        """Stop this job: its running segments get FISH_SHUTDOWN_GRACE_S, then it ends (pending ones stay pending)."""
        self._service.cancel(self)

    def amend(self, fn: Edit) -> Amendment | None:
        """Hand an edit of the manifest's records to the running job (see amend.py); None once it has ended."""
        edit = self._run.amends.add(fn)
        if edit is not None:
            self._service.workers.wake()
        return edit

    def result(self, timeout: float | None = None) -> JobResult:
        if self._run.delivery is not None and current_delivery() is self._run.delivery:
            raise PoolError("JobHandle.result() was called from this job's own on_event callback: the result comes "
                            "after its last event, which cannot be delivered while the callback waits")
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._done.wait(0.2):  # short waits: the main thread stays responsive to signals
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError("the job is still running")
        if self._error is not None:
            raise self._error
        assert self._result is not None
        return self._result

    def _set(self, result: JobResult | None, error: BaseException | None = None) -> None:
        """The job's outcome. With a callback, the caller gets it once the callback has had every event."""
        if self._outcome_set:
            return
        self._outcome_set = True
        for edit in self._run.amends.close():  # a run that never started: the edits go to the file instead
            edit.settle()
        self._result, self._error = result, error
        delivery = self._run.delivery
        if delivery is None:
            self._done.set()
            return

        def release() -> None:
            if self._result is not None:
                self._result.callback_error = delivery.error
            self._done.set()

        delivery.close(release)
