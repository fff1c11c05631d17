"""Files named by a request are the server's own disk: refused (400) unless the server runs with --root DIR and the
path, symlinks resolved, lies inside it. Reference audio travels in the request instead (base64, data URLs) or is
stored once (/v1/references/add)."""

from __future__ import annotations

import os
from typing import Any

from .errors import ApiError

SPEAKER_PATH_KEYS = ("reference_audio", "prompt_tokens")


def inside_root(root: str | None, raw: str, what: str) -> str:
    """The absolute path `raw` names (relative ones against the root), if the root allows it."""
    if root is None:
        raise ApiError(400, "file paths not allowed", f"{what} is a path on the server ({raw!r}); this server reads "
                       "no files named by requests (start it with --root DIR to allow paths inside DIR); send the "
                       "audio itself (a data: URL or base64) or a stored reference_id")
    real_root = os.path.realpath(root)
    path = os.path.realpath(os.path.join(real_root, raw))
    if os.path.commonpath([path, real_root]) != real_root:
        raise ApiError(400, "path outside the root", f"{what} {raw!r} resolves to {path}, outside --root {real_root}")
    return path


def check_job_paths(data: Any, root: str | None) -> dict:
    """A job body with each speaker's file path checked against the root and made absolute (data URLs and
    reference_id are left for the job loader)."""
    if not isinstance(data, dict) or not isinstance(data.get("speakers"), dict):
        return data
    speakers = {}
    for sid, raw in data["speakers"].items():
        if isinstance(raw, dict):
            raw = dict(raw)
            for key in SPEAKER_PATH_KEYS:
                value = raw.get(key)
                if isinstance(value, str) and value.strip() and not value.startswith("data:"):
                    raw[key] = inside_root(root, value, f'speaker "{sid}": {key}')
        speakers[sid] = raw
    return {**data, "speakers": speakers}
