"""What the data dir collects and nothing else removes: unreferenced voices and abandoned lines' directories.

- voices/: every reference a request brings is stored there by content (refstore.py), including those of rejected
  jobs and of every single line (pyvideotrans's clone role sends a new voice per line). A voice file is removed once
  no stored voice (references/*.json), no job (its job.json / request.json) and no running line names it, and it
  has not been stored or reused for VOICE_GRACE_S (a request between storing its voice and submitting its job holds
  no other claim on it).
- lines/: a line's directory goes when its answer is sent, but a worker still finishing a cancelled line may write
  its wav afterwards; a directory of no running line is removed.

At start (before any request) and every SWEEP_S while the server runs; the file work runs beside the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import time
from collections.abc import Iterable

log = logging.getLogger("fishmp")
SWEEP_S = 600.0
VOICE_GRACE_S = 3600.0
_VOICE_NAME = re.compile(r"[0-9a-f]{64}\.[a-z0-9]{2,5}")


class Sweeper:
    def __init__(self, data_dir: str) -> None:
        self.data_dir = data_dir
        self.active_lines: dict[str, str] = {}  # line dir -> its voice file (lines.LineRun registers itself)
        self._names_of_job: dict[str, frozenset[str]] = {}  # job dir -> voice names in its files (never rewritten)

    def _job_voices(self) -> set[str]:
        names: set[str] = set()
        jobs = os.path.join(self.data_dir, "jobs")
        with contextlib.suppress(OSError):
            for job_id in os.listdir(jobs):
                d = os.path.join(jobs, job_id)
                if d not in self._names_of_job:
                    found: set[str] = set()
                    for name in ("job.json", "request.json"):
                        with contextlib.suppress(OSError), open(os.path.join(d, name), encoding="utf-8",
                                                                  errors="replace") as f:
                            found.update(_VOICE_NAME.findall(f.read()))
                    self._names_of_job[d] = frozenset(found)
                names |= self._names_of_job[d]
        return names

    def _stored_voices(self) -> set[str]:
        names: set[str] = set()
        refs = os.path.join(self.data_dir, "references")
        with contextlib.suppress(OSError):
            for entry in os.listdir(refs):
                with contextlib.suppress(OSError), open(os.path.join(refs, entry), encoding="utf-8",
                                                          errors="replace") as f:
                    names.update(_VOICE_NAME.findall(f.read()))
        return names

    def sweep(self, lines_in_use: Iterable[str], voices_in_use: Iterable[str], now: float | None = None) -> int:
        """Remove what nothing uses (blocking). Returns how many voices and line dirs went."""
        now = time.time() if now is None else now
        removed = 0
        lines = os.path.join(self.data_dir, "lines")
        keep_lines = set(lines_in_use)
        with contextlib.suppress(OSError):
            for name in os.listdir(lines):
                if os.path.join(lines, name) not in keep_lines:
                    shutil.rmtree(os.path.join(lines, name), ignore_errors=True)
                    removed += 1
        keep = self._job_voices() | self._stored_voices() | {os.path.basename(v) for v in voices_in_use}
        voices = os.path.join(self.data_dir, "voices")
        with contextlib.suppress(OSError):
            for name in os.listdir(voices):
                path = os.path.join(voices, name)
                if name in keep or not _VOICE_NAME.fullmatch(name):
                    continue
                with contextlib.suppress(OSError):
                    if now - os.stat(path).st_mtime > VOICE_GRACE_S:
                        os.unlink(path)
                        removed += 1
        return removed

    async def once(self) -> None:
        in_use = dict(self.active_lines)  # taken on the loop: a line starting later has a directory not listed
        try:
            n = await asyncio.to_thread(self.sweep, in_use.keys(), in_use.values())
        except Exception as exc:  # noqa: BLE001 - a sweep that fails must never take the server down
            log.warning("[Serve] sweeping the data dir failed: %s: %s", type(exc).__name__, exc)
            return
        if n:
            log.info("[Serve] removed %d unused voice file(s) and line director(ies) from the data dir", n)

    async def run(self, every_s: float = SWEEP_S) -> None:
        while True:
            await asyncio.sleep(every_s)
            await self.once()
