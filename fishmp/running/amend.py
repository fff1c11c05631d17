"""Edits to a job's manifest from outside its run (a reviewer's retake or accept), without losing either side's work.

While a job runs, its manifest is its run's: the service loop's thread keeps the records in memory and rewrites the
file from them, so an edit written to the file would be overwritten at the next save. An edit is therefore a function
handed to the run (`JobHandle.amend`): the loop applies it to the records at its next turn, saves at once, then says
so. Once the run has ended (or never started) the edit is made on the file instead, under the output directory's lock
like any job. `edit_manifest` picks the way; `Amendments` is the run's side (a list and one lock).

    caller thread                         loop thread (JobRun.save_manifest / finish)
    handle.amend(fn) -> Amendment  --->   apply(): fn(manifest), save, settle() -> caller's wait() returns
    ... run over: amend() is None  --->   caller: lock, load, fn, save, unlock
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .results import Manifest, ManifestError, OutputDirBusy, OutputDirLock

Edit = Callable[[Manifest], Any]


class Amendment:
    def __init__(self, fn: Edit) -> None:
        self.fn = fn
        self.ran = False
        self.result: Any = None
        self.error: BaseException | None = None
        self._settled = threading.Event()

    def apply(self, manifest: Manifest) -> None:
        """On the loop's thread: an edit that raises is the caller's error, never the loop's."""
        self.ran = True
        try:
            self.result = self.fn(manifest)
        except Exception as exc:  # noqa: BLE001 - handed to the caller
            self.error = exc

    def settle(self, save_error: str | None = None) -> None:
        if self.ran and self.error is None and save_error:
            self.error = ManifestError(f"the edit was made but manifest.json could not be written: {save_error}")
        self._settled.set()

    def wait(self, timeout_s: float) -> bool:
        return self._settled.wait(timeout_s)


class Amendments:
    """A run's pending edits. Closed when the run ends: later edits go to the file (edit_manifest)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending: list[Amendment] = []
        self._closed = False

    def add(self, fn: Edit) -> Amendment | None:
        with self._lock:
            if self._closed:
                return None
            a = Amendment(fn)
            self._pending.append(a)
            return a

    def take(self) -> list[Amendment]:
        with self._lock:
            out, self._pending = self._pending, []
            return out

    def close(self) -> list[Amendment]:
        """No more edits; the ones still pending are returned (to apply before the final save, or to reject)."""
        with self._lock:
            self._closed = True
            out, self._pending = self._pending, []
            return out

    def apply(self, manifest: Manifest, save: Callable[[], str | None], final: bool = False) -> bool:
        """On the loop's thread: the pending edits applied to `manifest`, then `save()` (it returns why the file could
        not be written, or None) and each caller told. False, and nothing saved, when none was pending and not
        `final` (the run's last save: always saved, and the list closed)."""
        edits = self.close() if final else self.take()
        if not edits and not final:
            return False
        for a in edits:
            a.apply(manifest)
        error = save()
        for a in edits:
            a.settle(error)
        return True


def edit_manifest(output_dir: str, fn: Edit, handle: Any = None, timeout_s: float = 60.0) -> Any:
    """`fn(manifest)` applied to the manifest in `output_dir` and saved; returns what fn returns, raises what it
    raises. `handle`: the JobHandle of the run that may hold the directory (None: no run). Raises TimeoutError when
    neither the run nor the lock took the edit within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    if handle is not None and not handle.done():
        a = handle.amend(fn)
        if a is not None:
            if not a.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"the job running in {output_dir} did not take the edit within {timeout_s:g}s")
            if a.ran:
                if a.error is not None:
                    raise a.error
                return a.result
    while True:  # the run is over (its final save may still hold the lock for a moment)
        try:
            lock = OutputDirLock(output_dir).acquire()
        except OutputDirBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
            continue
        try:
            manifest = Manifest.load(output_dir)
            result = fn(manifest)
            manifest.save()
            return result
        finally:
            lock.release()
