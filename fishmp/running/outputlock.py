"""The output-directory lock: one fishmp job at a time per output directory.

`OutputDirLock` holds an flock on `.fishmp.lock` there, which the kernel releases when the holder dies (a SIGKILLed job
never leaves a stale lock). The errors the CLI turns into exit codes 2 and 3 live here too.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import os
import socket
import time

LOCK_NAME = ".fishmp.lock"


class OutputDirError(Exception):
    """The output directory cannot be used for this job. One line; `exit_code` is what the CLI should return."""

    exit_code = 2


class OutputDirBusy(OutputDirError):
    """Another fishmp job (in this or another process) holds the directory's lock."""

    exit_code = 3


class ManifestError(OutputDirError):
    """`manifest.json` cannot be read or must not be overwritten (not fishmp's, a directory, unreadable)."""


class OutputDirLock:
    """An exclusive flock on `<directory>/.fishmp.lock` for one job. The file records who holds it (pid, start time,
    host) for the refusal message. Use `with OutputDirLock(d):` or `acquire()` / `release()`.

    flock belongs to the open file, so a second lock on the same directory is refused even in the same process (two
    jobs from threads), and the kernel drops it when the holder dies. The file is removed on release, while still
    locked; an acquirer that locked a file just unlinked by its holder sees the inode changed and tries again."""

    def __init__(self, directory: str) -> None:
        self.directory = os.path.abspath(directory)
        self.path = os.path.join(self.directory, LOCK_NAME)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> OutputDirLock:
        if self._fd is not None:
            raise OutputDirBusy(f"output directory {self.directory} is already locked by this job")
        try:
            os.makedirs(self.directory, exist_ok=True)
        except OSError as exc:
            raise OutputDirError(f"cannot create output directory {self.directory}: {exc.strerror or exc}") from None
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o666)
            except OSError as exc:
                raise OutputDirError(f"cannot lock output directory {self.directory} ({self.path}): "
                                     f"{exc.strerror or exc}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                holder = _read_holder(fd)
                os.close(fd)
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputDirBusy(f"output directory {self.directory} is in use by {holder} (another fishmp "
                                        "job); wait for it or use another -o") from None
                raise OutputDirError(f"cannot lock output directory {self.directory}: {exc.strerror or exc}") from None
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its holder removed it between our open and flock: lock the new one
        info = f"{os.getpid()} {time.time():.3f} {socket.gethostname()}\n".encode()
        with contextlib.suppress(OSError):
            os.ftruncate(fd, 0)
            os.pwrite(fd, info, 0)
        self._fd = fd
        return self

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(fd, self.path):
                os.unlink(self.path)
        os.close(fd)

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _same_file(fd: int, path: str) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path, follow_symlinks=False)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read_holder(fd: int) -> str:
    try:
        pid, started, host = os.pread(fd, 512, 0).decode().split(None, 2)
        pid = str(int(pid))
        since = datetime.datetime.fromtimestamp(float(started)).strftime("%Y-%m-%d %H:%M:%S")
    except (OSError, ValueError, OverflowError, UnicodeDecodeError):
        return "a process that is starting up"  # it has the lock but has not written its pid yet
    where = "" if host.strip() == socket.gethostname() else f" on host {host.strip()}"
    return f"pid {pid}{where} since {since}"
