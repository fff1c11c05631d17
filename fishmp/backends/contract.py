"""The worker-pool contract: what the job loop (fishmp/running/service.py) may rely on from any backend.

A backend owns the workers of one plan: it starts one per slot, sends tasks (fishmp/worker/protocol.py), reports
their messages and deaths through `poll`, replaces them within the restart budget, and stops them. Two implement it:
`local.WorkerPool` (child processes on this machine) and `ray_pool.RayWorkerPool` (one Ray actor per worker); the
policy of what runs where is the scheduler's, never the backend's.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Protocol

from ..config import Settings
from ..planning.plan import Plan

# A spawned worker re-imports the caller's main module. Without `if __name__ == "__main__":` that module builds a Pool
# again inside the child; fishmp recognises this and the child exits with this code, so the parent stops at once.
BOOTSTRAP_EXIT = 87
MISSING_GUARD = ("fishmp's worker processes re-import your main module, and it starts a fishmp.Pool (or "
                 "fishmp.generate) at import time: put that code under `if __name__ == \"__main__\":` "
                 "(multiprocessing's spawn method needs it)")


class PoolError(RuntimeError):
    """The pool cannot run jobs: it is closed, or its workers cannot start (the message says why)."""


def refuse_in_bootstrap() -> None:
    """Called when a Pool is built: inside a worker that is still being spawned, say what to add and exit."""
    if getattr(mp.current_process(), "_inheriting", False):
        sys.stderr.write(f"fishmp: {MISSING_GUARD}\n")
        sys.stderr.flush()
        os._exit(BOOTSTRAP_EXIT)


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
    outstanding: deque[str] = field(default_factory=deque)  # task ids sent and not finished, in order
    running: dict[str, float] = field(default_factory=dict)  # begun tasks (Started seen) -> when each began
    sent_at: dict[str, float] = field(default_factory=dict)  # outstanding task -> when it was sent
    last_heard: float = field(default_factory=time.monotonic)  # its last message: a sign of life
    batch_size: int = 1  # tasks it runs at once (its Ready says; lanes)
    job: Any = None  # the job it last took work from (fair sharing between jobs)
    load_seconds: float = 0.0
    solo: set[str] = field(default_factory=set)  # outstanding tasks sent to run alone (suspects of a death)
    leave_blame: Any = None  # service.Blame: it is leaving because of the segments it reported Failed
    kill_reason: str | None = None
    ever_ready: bool = False
    leaving: bool = False  # it said it is exiting on purpose (after a failure): its exit is not a crash
    leaving_since: float = 0.0
    recycled: str | None = None  # why it is being recycled (its Leaving): its exit is planned, not charged

    @property
    def live(self) -> bool:
        return self.state in ("starting", "ready")

    def exitcode(self) -> int | None:
        return self.process.exitcode if self.process is not None else 0


class WorkerPoolContract(Protocol):
    """What the job loop uses of a backend. Not thread-safe: one loop thread drives it (`request_stop` and `wake`
    excepted, which are safe from any thread and from signal handlers)."""

    plan: Plan
    settings: Settings
    handles: dict[str, WorkerHandle]  # every worker started, by id, dead ones included
    slots: list[tuple[str, str | None]]  # (device, pin) per plan slot
    dropped: set[int]  # slots that used their restarts
    oom_dropped: set[int]  # slots dropped for repeated out-of-memory: they stay dropped
    broken: str | None  # why no worker can ever start (e.g. the missing __main__ guard)
    stop_signal: int | None
    stop_count: int
    exit_code: int

    def spawn(self, slot: int) -> WorkerHandle: ...
    def respawn(self, slot: int) -> WorkerHandle | None: ...  # None: the slot used its restarts
    def recycle(self, slot: int) -> WorkerHandle | None: ...  # a planned replacement, not charged
    def charge(self, slot: int, suspect: bool) -> None: ...
    def resolve(self, slot: int, refund: bool) -> None: ...
    def grow(self, plan: Plan, settings: Settings) -> list[WorkerHandle]: ...
    def refill(self) -> list[WorkerHandle]: ...
    def live_handles(self) -> list[WorkerHandle]: ...
    def send(self, h: WorkerHandle, task: Any) -> bool: ...  # False: the worker just died (poll will say)
    def kill(self, h: WorkerHandle, reason: str) -> None: ...
    def request_stop(self, signum: int) -> None: ...
    def wake(self) -> None: ...
    # ('msg', handle, message) and ('exit', handle, exitcode), a worker's last messages before its death
    def poll(self, timeout: float | None) -> list[tuple[str, WorkerHandle, Any]]: ...
    def close(self, grace_s: float = 5.0) -> None: ...
