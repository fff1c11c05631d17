"""Worker processes: start one per plan slot (spawn, pinned to its GPU), watch them, replace them, stop them.

This module is mechanism only; the policy of what to run where lives in scheduler.py and the job loop in run.py.
Each worker has its own task pipe and result pipe; the main process waits on every result pipe, every process
sentinel and a wake-up pipe (for signals) at once, so a death is seen the moment it happens.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from .config import Settings
from .plan import Plan
from .worker import worker_main

log = logging.getLogger("fishmp")


def describe_exit(code: int | None) -> str:
    """What an exit code probably means, for the person reading the log."""
    if code is None:
        return "still running"
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.Signals._value2member_map_ else str(-code)
        hint = {
            "SIGKILL": " (not by fishmp: the kernel's out-of-memory killer or another process; see dmesg)",
            "SIGSEGV": " (segmentation fault in native code)",
            "SIGABRT": " (aborted, often a CUDA or driver error)",
        }.get(name, "")
        return f"killed by {name}{hint}"
    return f"exited with code {code}"


@dataclass
class WorkerHandle:
    id: str
    slot: int
    device: str
    pin: str | None
    task_conn: Connection
    result_conn: Connection
    process: Any = None  # SpawnProcess, or None for the in-process worker
    thread: threading.Thread | None = None
    state: str = "starting"  # starting -> ready -> leaving -> dead
    pid: int | None = None
    spawned_at: float = field(default_factory=time.monotonic)
    outstanding: deque[str] = field(default_factory=deque)  # task ids sent, in order: [running, queued-ahead]
    running: str | None = None
    started: set[str] = field(default_factory=set)  # outstanding tasks the worker has begun
    running_since: float = 0.0
    kill_reason: str | None = None
    ever_ready: bool = False
    leaving: bool = False  # it said it is exiting on purpose (after a failure): its exit is not a crash
    leaving_since: float = 0.0

    @property
    def live(self) -> bool:
        return self.state in ("starting", "ready")

    def exitcode(self) -> int | None:
        return self.process.exitcode if self.process is not None else 0


class WorkerPool:
    """Owns the processes of one plan. Not thread-safe: one job loop drives it."""

    def __init__(self, plan: Plan, settings: Settings) -> None:
        self.plan, self.settings = plan, settings
        self.ctx = mp.get_context("spawn")  # CUDA cannot survive fork; 3.14 changes the default anyway
        self.slots = plan.slots()
        self.restarts = [0] * len(self.slots)
        self.dropped: set[int] = set()
        self.handles: dict[str, WorkerHandle] = {}
        self._generation = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self.stop_signal: int | None = None
        self.stop_count = 0
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
            h.thread = threading.Thread(target=worker_main, name=f"fishmp-{wid}", daemon=True,
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

    def can_restart(self, slot: int) -> bool:
        return slot not in self.dropped and self.restarts[slot] < self.settings.max_restarts

    def respawn(self, slot: int) -> WorkerHandle | None:
        if not self.can_restart(slot):
            self.dropped.add(slot)
            return None
        self.restarts[slot] += 1
        return self.spawn(slot)

    def live_handles(self) -> list[WorkerHandle]:
        return [h for h in self.handles.values() if h.live]

    def send(self, h: WorkerHandle, task: Any) -> bool:
        try:
            h.task_conn.send(task)
        except (OSError, ValueError):  # the worker just died; its sentinel will tell
            return False
        h.outstanding.append(task.id)
        return True

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
            if h.state != "dead" and h.thread is not None and not h.thread.is_alive() and h not in exited:
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
