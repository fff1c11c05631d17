"""Deadlines of the job loop (split out of service.py): model loads, segments, shutdown grace, workers that said
they are leaving (recycled, or after a failure), and segments that never start. A mixin of service.Service: it reads
the loop's state (workers, owners, active jobs) and kills through the pool; the loop calls `_enforce_deadlines` each
turn and sleeps at most `_next_timeout`.

A segment's deadline counts from its Started, so a worker frozen while idle (SIGSTOP, a stuck driver) would hold the
tasks sent to it forever. A task queued behind running rows legitimately has no Started yet; but once the worker has
nothing running, the oldest task sent to it starts next, so it must start within FISH_START_TIMEOUT_S of the later of
its sending and the worker's last message (its last sign of life: the Done that freed its lanes). Past that, the
worker is killed as frozen: its tasks go back unblamed (none of them had started) to other workers, and it is
replaced like any dead worker.
"""

from __future__ import annotations

import time
from typing import Any

from ..backends.contract import WorkerHandle

LEAVE_TIMEOUT_S = 30.0  # a worker that said it is leaving but hangs (e.g. in CUDA teardown) is killed after this
SETTLE_S = 3.0  # after a job's last segment, how long to wait for workers that announced their exit


class Deadlines:
    workers: Any
    settings: Any
    active: list[Any]
    _owner: dict[str, tuple[Any, str]]
    _on_message: Any
    _on_exit: Any

    def _leave_deadline(self, h: WorkerHandle) -> float | None:
        """When a leaving worker is overdue. A recycled one first finishes its rows (each under its own segment
        deadline): its leave timeout starts once none is running."""
        if h.kill_reason is not None or (h.recycled is not None and h.running):
            return None
        return h.leaving_since + LEAVE_TIMEOUT_S

    def _settle(self, handle: Any) -> None:
        """Workers that said they are leaving (recycled after a failure) exit within moments: see those exits now, so
        the job's events are complete (worker_died) whatever the machine's load."""
        deadline = time.monotonic() + SETTLE_S
        while any(h.state == "leaving" for h in self.workers.handles.values()) and time.monotonic() < deadline:
            for kind, h, payload in self.workers.poll(max(0.0, deadline - time.monotonic())):
                if kind == "msg":
                    self._on_message(h, payload)
                else:
                    self._on_exit(h, payload)

    def _enforce_deadlines(self) -> None:
        now = time.monotonic()
        for h in self.workers.handles.values():
            if h.state == "leaving":
                due = self._leave_deadline(h)
                if due is not None and now > due:
                    self.workers.kill(h, f"it announced its exit but was still running {LEAVE_TIMEOUT_S:g}s later")
                    continue
            if h.state == "starting" and now - h.spawned_at > self.settings.load_timeout_s:
                self.workers.kill(h, f"model load took longer than FISH_LOAD_TIMEOUT_S={self.settings.load_timeout_s:g}s")
            elif (h.state == "ready" or (h.state == "leaving" and h.recycled is not None)) and h.kill_reason is None:
                for tid, since in h.running.items():
                    limit = self._timeout_for(tid)
                    if now - since > limit:
                        self._overdue(h, tid, limit)
                        break
                else:
                    due = self._start_deadline(h)
                    if due is not None and now > due[1]:
                        self._never_started(h, due[0])

    def _start_deadline(self, h: WorkerHandle) -> tuple[str, float] | None:
        """(task, when it is overdue) for the task a worker with nothing running should be starting; None when no
        task is due (something runs, nothing is queued, or the worker is in this process and cannot be killed)."""
        if h.state != "ready" or h.running or h.process is None:
            return None
        tid = next(iter(h.outstanding), None)
        if tid is None:
            return None
        return tid, max(h.sent_at.get(tid, h.last_heard), h.last_heard) + self.settings.start_timeout_s

    def _never_started(self, h: WorkerHandle, tid: str) -> None:
        owner = self._owner.get(tid)
        name = owner[1] if owner else tid
        self.workers.kill(h, f"it did not start segment {name} within FISH_START_TIMEOUT_S="
                             f"{self.settings.start_timeout_s:g}s with nothing else running (stopped or frozen: "
                             "SIGSTOP, a stuck driver?); its segments go to other workers, not blamed")

    def _overdue(self, h: WorkerHandle, tid: str, limit: float) -> None:
        owner = self._owner.get(tid)
        name = owner[1] if owner else tid
        reason = (f"segment {name} ran past its {limit:.0f}s deadline (FISH_SEGMENT_TIMEOUT_S + "
                  "FISH_SEGMENT_TIMEOUT_PER_CHAR_S x characters + FISH_SEGMENT_TIMEOUT_PER_FRAME_S x max_new_tokens)")
        if h.process is not None:
            self.workers.kill(h, reason)
            return
        # In-process (FISH_MULTIPROCESS_MODE=false) the model runs in this process and cannot be stopped: the jobs
        # stop; the hung thread is left behind and the process exits past it (see backends/local.py). Only a segment
        # that ran alone is known to have hung (timeout); batchmates stall with the culprit and are not blamed.
        h.kill_reason = reason
        h.state = "dead"
        mode = "in single-process mode (FISH_MULTIPROCESS_MODE=false) it cannot be stopped: use auto"
        running = [self._owner[t] for t in h.running if t in self._owner]
        if len(running) == 1:
            handle, sid = running[0]
            handle._run.fail(sid, "timeout", f"{reason}; {mode}", h)
        else:
            names = ", ".join(sid for _, sid in running)
            for handle, sid in running:
                handle._run.fail(sid, "no_workers", f"it was decoding in one batch with {names} when the batch "
                                 f"stopped ({reason}): one of these {len(running)} segments hung; single-process mode "
                                 "(FISH_MULTIPROCESS_MODE=false) can neither stop it nor tell which: use auto, which "
                                 "retries them alone until the culprit is found", h)
        error = f"the only worker hung ({reason}); {mode}"
        for handle in list(self.active):
            handle._run.fail_rest("no_workers", error)
        self.workers.broken = error

    def _next_timeout(self) -> float:
        """Wake up in time for the nearest deadline (segment timeout, load timeout, shutdown grace)."""
        now, soonest = time.monotonic(), 5.0
        for h in self.workers.handles.values():
            if h.state == "leaving" and (due := self._leave_deadline(h)) is not None:
                soonest = min(soonest, due - now)
            elif h.state == "starting":
                soonest = min(soonest, h.spawned_at + self.settings.load_timeout_s - now)
            if h.state == "ready" or (h.state == "leaving" and h.recycled is not None):
                for tid, since in h.running.items():
                    soonest = min(soonest, since + self._timeout_for(tid) - now)
                if (due := self._start_deadline(h)) is not None:
                    soonest = min(soonest, due[1] - now)
        for handle in self.active:
            if handle._run.stopping_since is not None:
                soonest = min(soonest, handle._run.stopping_since + self.settings.shutdown_grace_s - now)
        return max(0.0, soonest)

    def _timeout_for(self, tid: str) -> float:
        owner = self._owner.get(tid)
        if owner is None:  # abandoned: the base timeout still bounds it
            return self.settings.segment_timeout_s
        return owner[0]._run.timeout_for(owner[1])
