"""Files written atomically: a hidden temp file in the same directory, fsynced, renamed over the final path.

A wav, a cached reference or a manifest only ever appears at its final path complete (rename is atomic within a
filesystem). Temp names carry the writer's host and pid (`.fishmp-tmp-<host>-<pid>-<hex><suffix>`), so a clean-up
removes only files of this process, of processes it names, or of dead processes on this host.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Callable, Iterable

import numpy as np

TMP_PREFIX = ".fishmp-tmp-"


_HOST = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]


# .fishmp-tmp-<host>-<pid>-<random><suffix>: nothing else is ever treated as a fishmp temp file.
_TMP_RE = re.compile(r"^\.fishmp-tmp-([0-9a-f]{8})-([0-9]+)-[0-9a-f]{16}(\.[A-Za-z0-9]{1,8})?$")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def new_temp(directory: str, suffix: str = "") -> str:
    """Create an empty temp file owned by this process. Mode 0666 minus the umask, like any file the user makes
    (mkstemp's 0600 hid the wavs from the web server that serves them)."""
    while True:
        tmp = os.path.join(directory, f"{TMP_PREFIX}{_HOST}-{os.getpid()}-{secrets.token_hex(8)}{suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp


def atomic_write(path: str, write: Callable[[str], None], suffix: str = "") -> None:
    """Call `write(temp_path)` on a temp file beside `path`, fsync it, rename it into place. Cleans up on any error.

    Writers get a path (np.save, plain bytes); the temp name never collides, so concurrent writers are safe."""
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    tmp = new_temp(directory, suffix)
    try:
        write(tmp)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(directory)


def atomic_write_bytes(path: str, payload: bytes) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(payload)

    atomic_write(path, write)


def write_wav(path: str, samples: np.ndarray, sample_rate: int) -> None:
    """Encode in memory, then write plain bytes: libsndfile would turn ENOSPC into 'System error.'."""
    import io

    import soundfile as sf

    buf = io.BytesIO()
    sf.write(buf, np.clip(np.asarray(samples, dtype=np.float32), -1.0, 1.0), sample_rate, format="WAV",
             subtype="PCM_16")
    atomic_write_bytes(path, buf.getvalue())


def wav_ok(path: str) -> bool:
    """True when `path` is a readable, non-empty wav (what resume requires before skipping a segment)."""
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception:  # noqa: BLE001 - any unreadable file is simply "not done"
        return False
    return info.frames > 0


def _pid_alive(pid: int) -> bool:
    """False for a pid that does not exist or is a zombie (a killed worker not yet reaped writes nothing more)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it exists, under another user
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True


def remove_temp_files(directories: Iterable[str], pids: Iterable[int] = ()) -> int:
    """Delete fishmp temp files left behind in `directories`: those of this process, of `pids` (e.g. this job's
    workers, dead or idle), and of processes on this host that no longer exist. Never a live process's file of
    another job, never a file that does not match fishmp's own temp-name pattern."""
    mine = {os.getpid(), *pids}
    n = 0
    for d in set(directories):
        for p in glob.glob(os.path.join(glob.escape(d), TMP_PREFIX + "*")):
            m = _TMP_RE.match(os.path.basename(p))
            if not m or m.group(1) != _HOST:
                continue
            pid = int(m.group(2))
            if pid in mine or not _pid_alive(pid):
                with contextlib.suppress(OSError):
                    os.unlink(p)
                    n += 1
    return n
