"""Worker processes: start one per plan slot (spawn, pinned to its GPU), watch them, replace them, stop them.

This module is mechanism only; the policy of what to run where lives in scheduler.py and the job loop in run.py.
Each worker has its own task pipe and result pipe; the main process waits on every result pipe, every process
sentinel and a wake-up pipe (for signals) at once, so a death is seen the moment it happens.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import multiprocessing as mp
import os
import sys
import threading
import time
from multiprocessing.connection import wait
from typing import Any

from ..config import Settings
from ..planning.plan import Plan
from ..worker.process import worker_main
from .contract import WorkerHandle

log = logging.getLogger("fishmp")


_IN_PROCESS: list[WorkerPool] = []


@atexit.register
def _exit_past_busy_threads() -> None:
    """An in-process worker thread still inside torch at interpreter exit would be torn down by pthread_exit in C++
    code, which aborts ("terminate called without an active exception", exit 134). Leave before that happens, with
    the exit code the job reported (e.g. 143 after SIGTERM)."""
    for pool in _IN_PROCESS:
        if any(h.thread is not None and h.thread.is_alive() for h in pool.handles.values()):
            for stream in (sys.stdout, sys.stderr):
                with contextlib.suppress(Exception):
                    stream.flush()
            os._exit(pool.exit_code)


class WorkerPool:
    """Owns the processes of one plan. Not thread-safe: one loop thread drives it (request_stop and wake excepted)."""

    def __init__(self, plan: Plan, settings: Settings) -> None:
        self.plan, self.settings = plan, settings
        self.ctx = mp.get_context("spawn")  # CUDA cannot survive fork; 3.14 changes the default anyway
        self.slots = plan.slots()
        self.restarts = [0] * len(self.slots)  # deaths per slot (see can_restart)
        self.suspects = [0] * len(self.slots)  # of those, blamed on segments not yet known to be poison or not
        self.dropped: set[int] = set()
        self.oom_dropped: set[int] = set()  # dropped for repeated out-of-memory: stays dropped
        self.handles: dict[str, WorkerHandle] = {}
        self._generation = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.stop_signal: int | None = None
        self.stop_count = 0
        self.exit_code = 0  # what the last job reported; used only by _exit_past_busy_threads
        self.broken: str | None = None  # why no worker can ever start (e.g. the missing __main__ guard)
        self._returned: set[str] = set()  # in-process workers whose worker_main returned
        if plan.in_process:
            _IN_PROCESS.append(self)
        for slot in range(len(self.slots)):
            self.spawn(slot)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def spawn(self, slot: int) -> WorkerHandle:
        device, pin = self.slots[slot]
        self._generation += 1
        wid = f"w{slot}" if self._generation <= len(self.slots) else f"w{slot}.{self._generation}"
        task_r, task_w = mp.Pipe(duplex=False)
        res_r, res_w = mp.Pipe(duplex=False)
        h = WorkerHandle(wid, slot, device, pin, task_conn=task_w, result_conn=res_r)
        if self.plan.in_process:
            h.thread = threading.Thread(target=self._in_process, name=f"fishmp-{wid}", daemon=True,
                                        args=(wid, device, pin, self.settings, task_r, res_w, None))
            h.thread.start()
            h.pid = os.getpid()
        else:
            n_cpu = sum(1 for d, _ in self.slots if d == "cpu")
            threads = max(1, (os.cpu_count() or 1) // n_cpu) if device == "cpu" else None
            h.process = self.ctx.Process(target=worker_main, name=f"fishmp-{wid}", daemon=True,
                                         args=(wid, device, pin, self.settings, task_r, res_w, os.getpid(), threads))
            h.process.start()
            h.pid = h.process.pid
            task_r.close()  # the child holds its ends; ours must go so EOF is seen when one side dies
            res_w.close()
        self.handles[wid] = h
        return h

    def _in_process(self, *args: Any) -> None:
        """An in-process worker has no sentinel to wait on: say it returned and wake the loop (e.g. recycled)."""
        try:
            worker_main(*args)
        finally:
            self._returned.add(args[0])
            self.wake()

    def can_restart(self, slot: int) -> bool:
        """Deaths still blamed on a segment that may yet prove to be poison do not count (see service.py)."""
        return slot not in self.dropped and self.restarts[slot] - self.suspects[slot] < self.settings.max_restarts

    def respawn(self, slot: int) -> WorkerHandle | None:
        if self.broken or not self.can_restart(slot):
            self.dropped.add(slot)
            return None
        return self.spawn(slot)

    def recycle(self, slot: int) -> WorkerHandle | None:
        """A fresh worker for a recycled one (FISH_WORKER_MAX_*): a planned exit, so the restart budget is not used."""
        if self.broken or slot in self.dropped:
            return None
        return self.spawn(slot)

    def charge(self, slot: int, suspect: bool) -> None:
        """Count a death of `slot`; `suspect`: it is blamed on a segment whose fate is not known yet."""
        self.restarts[slot] += 1
        self.suspects[slot] += int(suspect)

    def resolve(self, slot: int, refund: bool) -> None:
        """A blamed segment's fate is known: poison (`refund`: the death was not the slot's fault) or not."""
        self.suspects[slot] = max(0, self.suspects[slot] - 1)
        if refund:
            self.restarts[slot] = max(0, self.restarts[slot] - 1)

    def grow(self, plan: Plan, settings: Settings) -> list[WorkerHandle]:
        """FISH_MODEL_MEMORY_GB=auto (fishmp/running/autofill.py): `plan` has at least as many workers on each GPU as the
        current one; append a slot per extra worker and start them. `settings` (a measured number instead of auto)
        is what every worker started from now on gets, so replacements do not measure again."""
        have = {g.gpu.index: g.workers for g in self.plan.gpus}
        new = [(f"cuda:{g.gpu.index}", g.gpu.pin) for g in plan.gpus for _ in range(g.workers - have.get(g.gpu.index, 0))]
        self.plan, self.settings = plan, settings
        first = len(self.slots)
        self.slots.extend(new)
        self.restarts.extend([0] * len(new))
        self.suspects.extend([0] * len(new))
        return [self.spawn(s) for s in range(first, len(self.slots))] if not self.broken else []

    def refill(self) -> list[WorkerHandle]:
        """Start a worker for every slot that has none (not dropped): a new job gets the full plan again."""
        if self.broken:
            return []
        live = {h.slot for h in self.handles.values() if h.state != "dead"}
        for s in range(len(self.slots)):  # a new job gives a slot that used its restarts a fresh budget
            if s not in live and s not in self.oom_dropped:
                self.dropped.discard(s)
                self.restarts[s] = self.suspects[s] = 0
        return [self.spawn(s) for s in range(len(self.slots)) if s not in live and s not in self.dropped]

    def live_handles(self) -> list[WorkerHandle]:
        return [h for h in self.handles.values() if h.live]

    def send(self, h: WorkerHandle, task: Any) -> bool:
        try:
            h.task_conn.send(task)
        except (OSError, ValueError):  # the worker just died; its sentinel will tell
            return False
        h.outstanding.append(task.id)
        return True

    def drop(self, h: WorkerHandle, task_id: str) -> None:
        """Ask the worker to free the row of a task whose job was cancelled (fishmp.worker.protocol.Drop)."""
        from ..worker.protocol import Drop

        with contextlib.suppress(OSError, ValueError):  # the worker just died: nothing left to free
            h.task_conn.send(Drop(task_id))

    def kill(self, h: WorkerHandle, reason: str) -> None:
        h.kill_reason = reason
        if h.process is not None:
            with contextlib.suppress(OSError):
                h.process.kill()

    # -- waiting ----------------------------------------------------------------------------------------------------
    def request_stop(self, signum: int) -> None:
        """Called from a signal handler: remember, and wake the job loop."""
        self.stop_signal = signum
        self.stop_count += 1
        self.wake()

    def wake(self) -> None:
        """Make the current (or next) poll return at once; safe from any thread and from signal handlers."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def poll(self, timeout: float | None) -> list[tuple[str, WorkerHandle, Any]]:
        """Wait for messages and deaths: ('msg', handle, message) and ('exit', handle, exitcode), in that order."""
        by_obj: dict[Any, WorkerHandle] = {}
        for h in self.handles.values():
            if h.state == "dead":
                continue
            by_obj[h.result_conn] = h
            if h.process is not None:
                by_obj[h.process.sentinel] = h
        ready = wait([*by_obj, self._wake_r], timeout)
        if self._wake_r in ready:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 1024)
        events: list[tuple[str, WorkerHandle, Any]] = []
        exited: list[WorkerHandle] = []
        for obj in ready:
            h = by_obj.get(obj)
            if h is None:
                continue
            if obj is h.result_conn:
                events.extend(("msg", h, m) for m in self._drain(h))
            elif h not in exited:
                exited.append(h)
        for h in self.handles.values():  # an in-process worker has no sentinel: it ends by returning
            if h.state != "dead" and h.thread is not None and h not in exited and \
                    (h.id in self._returned or not h.thread.is_alive()):
                exited.append(h)
        for h in exited:
            events.extend(("msg", h, m) for m in self._drain(h))  # its last words come before its death
            if h.process is not None:
                h.process.join(timeout=5)
            h.state = "dead"
            events.append(("exit", h, h.exitcode()))
        return events

    @staticmethod
    def _drain(h: WorkerHandle) -> list[Any]:
        out = []
        try:
            while h.result_conn.poll():
                out.append(h.result_conn.recv())
        except (EOFError, OSError):
            pass
        return out

    # -- shutdown ---------------------------------------------------------------------------------------------------
    def close(self, grace_s: float = 5.0) -> None:
        """Idempotent: ask every worker to exit, then terminate, then kill, all against one deadline."""
        for h in self.handles.values():
            with contextlib.suppress(OSError, ValueError):
                h.task_conn.send(None)
        deadline = time.monotonic() + grace_s
        procs = [h.process for h in self.handles.values() if h.process is not None]
        for p in procs:
            p.join(timeout=max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(timeout=2)
            if p.is_alive():
                p.kill()
                p.join(timeout=2)
        for h in self.handles.values():
            if h.thread is not None:
                h.thread.join(timeout=max(0.0, deadline - time.monotonic()))
            h.state = "dead"
            for c in (h.task_conn, h.result_conn):
                with contextlib.suppress(OSError):
                    c.close()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1
