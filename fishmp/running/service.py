"""The loop that drives a WorkerPool for any number of jobs at once, in one background thread.

Each turn: apply stop requests -> dispatch -> wait for messages, deaths or a deadline -> apply them -> enforce
deadlines -> finish jobs that are done. Jobs (run.py) keep their own scheduler, manifest and events; this loop owns
the workers and divides them fairly between running jobs (by priority), keeping speaker affinity inside each job.

Deaths and blame (issue 11): a worker that dies while running exactly one segment, alone, blames that segment
(attempts + 1; FISH_MAX_ATTEMPTS of those make it poison). Every death counts against its slot's FISH_MAX_RESTARTS,
but one blamed on a segment whose fate is still open does not stop a replacement, and when that segment ends as
poison its deaths are refunded: poison segments never use up the budget that the innocent ones need. A death with
several segments running at once (lanes) blames none of them: each is requeued to run solo, so the one that then
dies alone is the culprit and its batchmates are never poisoned.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
import time
from typing import Any

from ..backends.contract import BOOTSTRAP_EXIT, MISSING_GUARD, PoolError, WorkerHandle, WorkerPoolContract, describe_exit
from ..worker.protocol import AudioChunk, Done, Failed, Leaving, LoadFailed, Ready, Started
from . import autofill
from .jobrun import Blame, JobHandle, JobRun
from .progress import make_event
from .telemetry import GpuStats, PoolTelemetry
from .watchdog import LEAVE_TIMEOUT_S, Deadlines

log = logging.getLogger("fishmp")


class Service(Deadlines):
    """Runs jobs on a WorkerPool from one loop thread; `submit` is safe from any thread."""

    def __init__(self, workers: WorkerPoolContract) -> None:
        self.workers, self.settings = workers, workers.settings
        self._lock = threading.Lock()
        self._incoming: list[JobHandle] = []
        self._cancels: list[JobHandle] = []
        self.active: list[JobHandle] = []
        self._owner: dict[str, tuple[JobHandle, str]] = {}  # task id on the wire -> (job, segment id)
        self._abandoned: set[str] = set()  # tasks of stopped jobs still on a worker: results are ignored
        self._count = 0
        self._closing = False
        self._stopped_by_signal = False  # the pool's stop signal ended a job: clear it once no job is left
        self.last_load_error: str | None = None
        self.oom_by_device: dict[str, int] = {}
        self.telemetry = PoolTelemetry.open(workers)  # None without NVML or without a GPU in the plan
        self._thread = threading.Thread(target=self._loop, name="fishmp-loop", daemon=True)
        self._thread.start()

    # -- API (any thread) -------------------------------------------------------------------------------------------
    def new_number(self) -> int:
        with self._lock:
            self._count += 1
            return self._count

    def submit(self, run: JobRun) -> JobHandle:
        handle = JobHandle(run, self)
        with self._lock:
            if self._closing:
                raise PoolError("this fishmp.Pool is closed: create a new Pool (or use it inside its `with` block)")
            if self.workers.broken:
                raise PoolError(self.workers.broken)
            self._incoming.append(handle)
        self.workers.wake()
        return handle

    def cancel(self, handle: JobHandle) -> None:
        with self._lock:
            self._cancels.append(handle)
        self.workers.wake()

    def close(self) -> None:
        """Stop every job at once (their results say interrupted) and the loop thread."""
        with self._lock:
            self._closing = True
        self.workers.wake()
        self._thread.join(timeout=LEAVE_TIMEOUT_S)
        if self.telemetry is not None:
            self.telemetry.stop()

    # -- the loop ----------------------------------------------------------------------------------------------------
    def _loop(self) -> None:
        try:
            while True:
                with self._lock:
                    incoming, self._incoming = self._incoming, []
                    cancels, self._cancels = self._cancels, []
                    closing = self._closing
                for handle in incoming:
                    self._start(handle)
                for handle in cancels:
                    if handle in self.active:
                        handle._run.stop(signal.SIGTERM, cancelled=True)
                if closing:
                    for handle in list(self.active):
                        handle._run.stop(signal.SIGTERM)
                        self._end(handle)
                    return
                self._turn()
        except BaseException as exc:  # noqa: BLE001 - a bug here must not leave callers blocked forever
            log.exception("[Main] the job loop failed")
            with self._lock:
                self._closing = True
                incoming, self._incoming = self._incoming, []
            for handle in list(self.active):
                self.active.remove(handle)
                with contextlib.suppress(BaseException):  # keep what is done: manifest written, directory released
                    handle._run.finish(set())
                handle._set(None, exc)
            for handle in incoming:
                handle._set(None, exc)

    def _start(self, handle: JobHandle) -> None:
        run = handle._run
        try:
            live = self.workers.refill() + self.workers.live_handles()
            run.prepare(len({h.id for h in live}), self.workers.plan.to_dict(), self.workers.plan.mode)
        except BaseException as exc:  # noqa: BLE001 - invalid job, locked directory: raised to the caller
            handle._set(None, exc)
            return
        run.gpu_stats = GpuStats()
        self.active.append(handle)
        for h in self.workers.handles.values():  # workers that were ready before this job came
            if h.state == "ready":
                self._ready_event(handle, h)

    def _turn(self) -> None:
        w = self.workers
        if w.stop_signal is not None:  # the pool's request_stop (the CLI's Ctrl-C / SIGTERM): every job stops
            for handle in self.active:
                handle._run.stop(w.stop_signal)
        for handle in list(self.active):
            self._check_stop(handle)
        if self.telemetry is not None:
            self.telemetry.turn(self.active)
        self._dispatch()
        if self.active and all(h.state == "dead" for h in w.handles.values()):
            self._no_workers_left()
            self._end_finished()
        for kind, h, payload in w.poll(self._next_timeout()):
            if kind == "msg":
                self._on_message(h, payload)
            else:
                self._on_exit(h, payload)
        self._enforce_deadlines()
        self._end_finished()
        for handle in self.active:
            handle._run.save_manifest(min_interval_s=1.0)
        if not self.active and self._stopped_by_signal:
            w.stop_signal, w.stop_count, self._stopped_by_signal = None, 0, False  # the pool takes new jobs

    def _end_finished(self) -> None:
        for handle in list(self.active):
            if handle._run.finished:
                self._settle(handle)
                self._end(handle)

    def _check_stop(self, handle: JobHandle) -> None:
        run = handle._run
        if run.stopping_since is None:
            return
        running = any(self._owner.get(t, (None,))[0] is handle for h in self.workers.live_handles() for t in h.running)
        now_ = (self.workers.stop_count > 1 and not run.cancelled) or (run.cancelled and run.stream)  # client gone
        if now_ or not running or time.monotonic() - run.stopping_since >= self.settings.shutdown_grace_s:
            self._end(handle)

    def _end(self, handle: JobHandle, error: BaseException | None = None) -> None:
        """The job is over: its tasks still on workers are abandoned (results ignored; after the pool's own stop
        signal their workers are killed, so the caller is not kept waiting), its result returned."""
        if handle not in self.active:
            return
        self.active.remove(handle)
        run = handle._run
        mine = set()
        for tid, (owner, _) in list(self._owner.items()):
            if owner is handle:
                del self._owner[tid]
                self._abandoned.add(tid)
                mine.add(tid)
        drop = getattr(self.workers, "drop", None) if run.cancelled and run.stream else None
        for h in self.workers.handles.values():
            if h.job is handle:
                h.job = None
            for tid in [t for t in h.outstanding if t in mine] if drop and h.state != "dead" else ():
                drop(h, tid)  # a streamed line's client left: its rows are freed now, not finished
            if h.state != "dead" and run.stop_signal is not None and not run.cancelled and \
                    any(t in self._abandoned for t in h.outstanding):
                self.workers.kill(h, f"stopped by {signal.Signals(run.stop_signal).name}")
        idle = {h.pid for h in self.workers.handles.values()
                if h.pid and (h.state == "dead" or not h.outstanding) and h.process is not None}
        try:
            result = run.finish(idle)
        except BaseException as exc:  # noqa: BLE001
            handle._set(None, exc)
            return
        if run.stop_signal is not None and not run.cancelled:
            self._stopped_by_signal = True
        self.workers.exit_code = result.exit_code
        handle._set(None, error) if error is not None else handle._set(result)

    # -- dispatch ----------------------------------------------------------------------------------------------------
    def _jobs_with_work(self) -> list[JobHandle]:
        return [j for j in self.active if j._run.stopping_since is None and j._run.sched.pending_count]

    def _choose_job(self, h: WorkerHandle, jobs: list[JobHandle]) -> JobHandle:
        """The job whose workers per unit of priority, counting `h` in it, would be fewest; ties keep h's current job.
        Counting `h` (+1) lets a high priority win a lone worker: without it every job scored 0 there and h's current
        job kept it, so a priority-100 line waited behind a whole film on a 1-worker pool (fishmp serve, issue 23)."""
        count = {id(j): 0 for j in jobs}
        for o in self.workers.live_handles():
            if o is not h and o.job is not None and id(o.job) in count:
                count[id(o.job)] += 1
        return min(jobs, key=lambda j: ((count[id(j)] + 1) / j._run.priority, j is not h.job, j._run.number))

    def _dispatch(self) -> None:
        ready = [h for h in self.workers.handles.values() if h.state == "ready"]
        jobs = self._jobs_with_work()
        if not ready or not jobs:
            return
        # Rounds fill every worker's lanes one task at a time (so worker 0 does not take the longest segments of
        # all), then queue one task behind each worker so it never waits on this process. A queued task is committed
        # early, which is only worth it for short ones: near the end, or for a task longer than a fair share of what
        # is left (half the pending work per worker), it is left for whichever worker frees up first.
        ahead = sum(j._run.sched.pending_count for j in jobs) >= 2 * len(ready)  # else no queue-ahead (the end)
        for target in range(1, max(h.batch_size for h in ready) + 2):
            for h in ready:
                lanes = h.batch_size + int(ahead)  # B running + 1 queued behind them
                unstarted = sum(1 for t in h.outstanding if t not in h.running)
                if target > lanes or unstarted + len(h.running) >= target or h.solo & set(h.outstanding):
                    continue  # full, or running a suspect alone (nothing may share its death)
                jobs = self._jobs_with_work()
                if not jobs:
                    return
                handle = self._choose_job(h, jobs)
                run = handle._run
                queued = target > h.batch_size
                max_cost = (run.sched.pending_total_cost / (2 * len(ready))) if queued else None
                if h.job is not handle:
                    if h.job is not None:
                        h.job._run.sched.worker_gone(h.id)
                    h.job = handle
                task = run.sched.next_for(h.id, max_cost)
                if task is None:
                    continue
                solo = run.sched.tasks[task.id].attempts > 0 or task.id in run.suspect_slots
                if solo and h.outstanding:  # a suspect runs on an empty worker, so a death can only be its own
                    run.sched.requeue(task.id, count_attempt=False)
                    continue
                msg = run.message_for(task, solo)
                if not self.workers.send(h, msg):
                    run.sched.requeue(task.id, count_attempt=False)
                    continue
                self._owner[msg.id] = (handle, task.id)
                h.sent_at[msg.id] = time.monotonic()  # it must start within FISH_START_TIMEOUT_S once due (watchdog)
                if solo:
                    h.solo.add(msg.id)

    # -- messages -----------------------------------------------------------------------------------------------------
    def _on_message(self, h: WorkerHandle, msg: Any) -> None:
        h.last_heard = time.monotonic()
        if isinstance(msg, Ready):
            h.state, h.pid, h.ever_ready, h.load_seconds = "ready", msg.pid, True, msg.load_seconds
            h.batch_size = max(1, int(getattr(msg, "batch_size", 1) or 1))
            for handle in self.active:
                self._ready_event(handle, h)
            autofill.on_ready(self, h, msg)  # FISH_MODEL_MEMORY_GB=auto: fill the GPUs once each has measured
        elif isinstance(msg, LoadFailed):
            h.state, h.leaving, h.leaving_since = "leaving", True, time.monotonic()
            self.last_load_error = msg.message
            log.error("[Worker %s] could not load the model on %s: %s", h.id, h.device, msg.message)
        elif type(msg).__name__ == "Resized":  # out of memory halved its batch: fewer lanes from now on
            h.batch_size = max(1, int(msg.batch_size))
        elif isinstance(msg, Started):
            h.running[msg.task] = time.monotonic()  # its deadline starts now
        elif isinstance(msg, AudioChunk):  # a streamed segment's audio so far: to its job's callback, in order
            if (owner := self._owner.get(msg.task)) is not None:
                owner[0]._run.emit(make_event("segment_audio", id=owner[1], index=msg.index, samples=msg.samples,
                                              sample_rate=msg.sample_rate))
        elif isinstance(msg, Leaving):
            self._on_leaving(h, msg)
        elif isinstance(msg, Done | Failed):
            self._finish_task(h, msg.task)
            if isinstance(msg, Failed) and (msg.kind == "out_of_memory" or not msg.input_error):
                h.state, h.leaving, h.leaving_since = "leaving", True, time.monotonic()  # it exits after this
                if msg.kind == "out_of_memory":
                    self.oom_by_device[h.device] = self.oom_by_device.get(h.device, 0) + 1
            owner = self._owner.pop(msg.task, None)
            self._abandoned.discard(msg.task)
            if owner is None:
                return
            handle, sid = owner
            if isinstance(msg, Failed) and not msg.input_error:  # it leaves because of this segment: blame it
                if h.leave_blame is None:
                    h.leave_blame = Blame(h.slot, self.workers.resolve)
                    self.workers.charge(h.slot, suspect=True)
                handle._run.blame(sid, h.leave_blame)
            if isinstance(msg, Done):
                handle._run.on_done(h, sid, msg)
            else:
                handle._run.on_failed(h, sid, msg)

    @staticmethod
    def _finish_task(h: WorkerHandle, tid: str) -> None:
        h.running.pop(tid, None)
        h.sent_at.pop(tid, None)
        h.solo.discard(tid)
        with contextlib.suppress(ValueError):
            h.outstanding.remove(tid)
        if h.recycled is not None and not h.running:
            h.leaving_since = time.monotonic()  # its rows are done: it has LEAVE_TIMEOUT_S to exit from now

    def _on_leaving(self, h: WorkerHandle, msg: Leaving) -> None:
        """Recycled (fishmp/worker/recycle.py): nothing more is sent to it; what it handed back (never started there) goes
        back to its job's queue at once, uncounted. Its rows finish as usual; then it exits 0 and is replaced."""
        h.state, h.leaving, h.leaving_since, h.recycled = "leaving", True, time.monotonic(), msg.reason
        for tid in msg.handed_back:
            if tid not in h.outstanding:
                continue
            self._finish_task(h, tid)
            owner = self._owner.pop(tid, None)
            self._abandoned.discard(tid)
            if owner is not None:
                owner[0]._run.sched.requeue(owner[1], count_attempt=False)
        if h.job is not None:
            h.job._run.sched.worker_gone(h.id)
        log.info("[Worker %s] on %s (pid %s) is being recycled: %s; %d queued tasks handed back", h.id, h.device,
                 h.pid, msg.reason, len(msg.handed_back))
        self._emit_all(make_event("worker_recycled", worker=h.id, pid=h.pid, device=h.device, reason=msg.reason,
                                  handed_back=len(msg.handed_back), **msg.figures))

    @staticmethod
    def _ready_event(handle: JobHandle, h: WorkerHandle) -> None:
        handle._run.emit(make_event("worker_ready", worker=h.id, pid=h.pid, device=h.device,
                                    load_seconds=round(h.load_seconds, 3), batch_size=h.batch_size))

    def _emit_all(self, event: dict) -> None:
        for handle in self.active:
            handle._run.emit(event)

    # -- deaths ---------------------------------------------------------------------------------------------------------
    def _on_exit(self, h: WorkerHandle, code: int | None) -> None:
        # A recycled worker that exits 0 left as planned; killed (or crashed) while it drained, it died like any other.
        deliberate = h.kill_reason is None and h.leaving and (h.recycled is None or code == 0)
        recycled = deliberate and h.recycled is not None
        reason = h.kill_reason or (describe_exit(code) if not deliberate else "recycled after a failure")
        if recycled:
            reason = f"recycled: {h.recycled}"
        elif h.recycled is not None:
            reason += " while being recycled"
        if code == BOOTSTRAP_EXIT and not h.ever_ready:
            self.workers.broken = MISSING_GUARD
        elif not h.ever_ready and not deliberate:
            self.last_load_error = f"the worker stopped while loading the model: {reason}"
        # The segments it had begun (Started seen) share the blame; one alone is the culprit (attempts + 1).
        running = [] if deliberate else [t for t in h.running if t in self._owner]
        blame = Blame(h.slot, self.workers.resolve) if running else None
        if h.leave_blame is None and not recycled:  # a worker leaving because of a segment was charged then
            self.workers.charge(h.slot, suspect=blame is not None)
        for tid in list(h.outstanding):
            owner = self._owner.pop(tid, None)
            self._abandoned.discard(tid)
            if owner is None:
                continue
            handle, sid = owner
            if recycled and tid not in h.running:  # sent after its Leaving, never started: handed back as well
                handle._run.sched.requeue(sid, count_attempt=False)
                continue
            if blame is not None and tid in running:
                handle._run.blame(sid, blame)  # before requeue: a segment that turns poison now refunds at once
            handle._run.requeue(sid, reason, h, counted=len(running) == 1 and tid in running)
        h.outstanding.clear()
        h.running.clear()
        h.sent_at.clear()
        if h.job is not None:
            h.job._run.sched.worker_gone(h.id)
            h.job = None
        if not self.active:
            return
        if all(j._run.stopping_since is not None for j in self.active):
            return
        if recycled:  # announced by worker_recycled; its replacement does not use the slot's restarts
            if any(not j._run.finished for j in self.active):
                self.workers.recycle(h.slot)
            return
        self._emit_all(make_event("worker_died", worker=h.id, pid=h.pid, device=h.device, exit_code=code,
                                  reason=reason))
        if self.workers.broken or self._drop_for_oom(h):
            return
        if any(not j._run.finished for j in self.active):
            if self.workers.respawn(h.slot) is None:
                log.warning("[Worker %s] slot %d on %s used its %d restarts (FISH_MAX_RESTARTS): going on with fewer "
                            "workers", h.id, h.slot, h.device, self.settings.max_restarts)

    def _drop_for_oom(self, h: WorkerHandle) -> bool:
        """Out of memory twice on one GPU: that GPU holds fewer workers than planned, so drop this slot."""
        if self.oom_by_device.get(h.device, 0) < 2:
            return False
        others = [o for o in self.workers.live_handles() if o.device == h.device]
        if not others:
            return False
        self.workers.dropped.add(h.slot)
        self.workers.oom_dropped.add(h.slot)
        self.oom_by_device[h.device] = 0
        log.warning("[Main] repeated out-of-memory on %s: dropping a worker there (%d left); raise FISH_MODEL_MEMORY_GB",
                    h.device, len(others))
        return True

    def _no_workers_left(self) -> None:
        if self.workers.broken:
            error = self.workers.broken
        elif self.last_load_error:
            error = "no worker could load the model: " + self.last_load_error
        else:
            error = "every worker slot used its restarts"
        for handle in list(self.active):
            handle._run.fail_rest("no_workers", error)
            if self.workers.broken == MISSING_GUARD:  # the caller's program must change: raised, not a result
                self._end(handle, PoolError(error))
