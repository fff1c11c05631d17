"""One server per data dir: two would wipe each other's lines, resume each other's jobs and append to the same event
logs. The lock is running/outputlock.py's flock (released by the kernel when the holder dies, so a killed server
leaves nothing stale) on `<data dir>/.fishmp.lock`; no job's output directory is the data dir itself."""

from __future__ import annotations

import re

from ..running.outputlock import OutputDirBusy, OutputDirError, OutputDirLock


class DataDirBusy(Exception):
    """Another `fishmp serve` holds the data dir (one line naming its pid)."""


def lock_data_dir(data_dir: str) -> OutputDirLock:
    """The data dir's lock, held until `.release()`; DataDirBusy if another process holds it, OSError if it cannot
    be made."""
    lock = OutputDirLock(data_dir)
    try:
        return lock.acquire()
    except OutputDirBusy as exc:
        holder = re.search(r"in use by (.+?) \(another", str(exc))
        raise DataDirBusy(f"data dir {data_dir} is in use by another fishmp serve ({holder.group(1) if holder else exc})"
                          ": stop it, or give this one another --data-dir") from None
    except OutputDirError as exc:
        raise OSError(str(exc)) from None
