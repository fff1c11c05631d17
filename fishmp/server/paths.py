"""Files named by a request are the server's own disk: refused (400) unless the server runs with --root DIR and the
path, symlinks resolved, lies inside it. Reference audio travels in the request instead (base64, data URLs) or is
stored once (/v1/references/add).

`inside_root` is the one check every file a request names goes through: a job speaker's reference_audio or
prompt_tokens (a data URL is no path: the reference store decodes it), a legacy task's npy_file, OpenAI's
`references[].audio_path`. A refusal names the item and never says whether the file exists (no probing of the disk
through error messages), and shows no server path; `read_regular_file` reads one off the event loop, refusing
anything but a regular file (a FIFO would block, a directory is no audio)."""

from __future__ import annotations

import os
import stat
from typing import Any

from .errors import ApiError

SPEAKER_PATH_KEYS = ("reference_audio", "prompt_tokens")


def inside_root(root: str | None, raw: Any, what: str) -> str:
    """The absolute path `raw` names (relative ones against the root), if the root allows it."""
    if root is None:
        raise ApiError(400, "file paths not allowed", f"{what} is a path on the server; this server reads no files "
                       "named by requests (start it with --root DIR to allow paths inside DIR); send the audio itself "
                       "(a data: URL or base64) or a stored reference_id")
    if not isinstance(raw, str) or not raw.strip() or "\0" in raw:
        raise ApiError(400, "invalid path", f"{what} must be a non-empty path without NUL characters")
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, raw))
    if os.path.commonpath([path, real_root]) != real_root:
        raise ApiError(400, "path outside the root", f"{what} {raw[:200]!r} is outside --root")
    return path


def read_regular_file(path: str, what: str, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (blocking: call it in a thread); 400 otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)  # O_NONBLOCK: a FIFO's open cannot hang
    except OSError:
        raise ApiError(400, "file not readable", f"{what} is not a readable file inside --root") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ApiError(400, "not a file", f"{what} is not a regular file")
        if st.st_size > limit:
            raise ApiError(400, "file too large", f"{what} is {st.st_size} bytes; at most {limit} (FISH_SERVE_MAX_BODY_MB)")
        with os.fdopen(os.dup(fd), "rb") as f:
            return f.read(limit + 1)[:limit]
    finally:
        os.close(fd)


def check_job_paths(data: Any, root: str | None) -> Any:
    """A job body with each file path it names checked against the root and made absolute: speakers'
    reference_audio (unless a data URL) and prompt_tokens, legacy tasks' npy_file. Reference ids are names, left for
    the job loader."""
    if not isinstance(data, dict):
        return data
    out = dict(data)
    if isinstance(data.get("speakers"), dict):
        speakers = {}
        for sid, raw in data["speakers"].items():
            if isinstance(raw, dict):
                raw = dict(raw)
                for key in SPEAKER_PATH_KEYS:
                    value = raw.get(key)
                    if value is None or (key == "reference_audio" and isinstance(value, str)
                                         and value.startswith("data:")):
                        continue  # absent, or audio in the request (refstore decodes it; never opened as a path)
                    raw[key] = inside_root(root, value, f'speaker "{sid}": {key}')
            speakers[sid] = raw
        out["speakers"] = speakers
    if isinstance(data.get("tasks"), list):
        tasks = []
        for i, task in enumerate(data["tasks"]):
            if isinstance(task, dict) and task.get("npy_file") is not None:
                task = {**task, "npy_file": inside_root(root, task["npy_file"], f"tasks[{i}]: npy_file")}
            tasks.append(task)
        out["tasks"] = tasks
    return out
