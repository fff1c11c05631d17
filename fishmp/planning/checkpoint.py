"""Checkpoint identity without torch: the main process needs it for resume decisions, workers for the cache."""

from __future__ import annotations

import hashlib
import os

from ..config import Settings

CHECKPOINT_FILES = ("config.json", "model.pth", "tokenizer.tiktoken", "special_tokens.json", "codec.pth")
_EDGE = 1 << 20  # hash the first and last MiB of big files: fast on GB weights, and any retrain changes them


def checkpoint_fingerprint(checkpoint_dir: str) -> str:
    """A stable hash of a checkpoint's content: small files whole, large ones by size + first and last MiB."""
    h = hashlib.sha256()
    for name in CHECKPOINT_FILES:
        path = os.path.join(checkpoint_dir, name)
        if not os.path.isfile(path):
            h.update(f"{name}:absent".encode())
            continue
        size = os.path.getsize(path)
        h.update(f"{name}:{size}".encode())
        with open(path, "rb") as f:
            if size <= 2 * _EDGE:
                h.update(f.read())
            else:
                h.update(f.read(_EDGE))
                f.seek(-_EDGE, os.SEEK_END)
                h.update(f.read(_EDGE))
    return h.hexdigest()[:32]


def engine_fingerprint(settings: Settings) -> str:
    """What produced the audio: the engine and, for Fish Speech, the checkpoint content and precision."""
    if settings.engine == "synthetic":
        return "synthetic"
    return f"fish:{checkpoint_fingerprint(settings.checkpoint_dir)}:{settings.precision}"
