"""Speaker references: prompt tokens from .npy files, or encoded from audio through an engine with a disk cache.

Cache entries live in `cache_dir/<sha256 of audio bytes>-<engine fingerprint>.npy`: a changed file or another
checkpoint misses. Writes go through fishmp.worker.files.atomic_write (a unique temp file in the same directory, renamed
into place), so concurrent workers never see a half-written entry, and entries get mode 0666 minus the umask like the
wavs (a cache directory shared by several users stays readable). A corrupt or malformed entry is ignored and rewritten.
"""

from __future__ import annotations

import hashlib
import os
import re

import numpy as np

from ..engines.base import BadReferenceError, Engine
from .files import atomic_write

NUM_CODEBOOKS = 10


def _check_tokens(tokens: object, source: str) -> np.ndarray:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 2 or tokens.shape[0] != NUM_CODEBOOKS \
            or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
        shape = getattr(tokens, "shape", None)
        dtype = getattr(tokens, "dtype", type(tokens).__name__)
        raise BadReferenceError(f"prompt tokens in {source}: shape {shape} dtype {dtype}, "
                                f"expected ({NUM_CODEBOOKS}, T>0) integers")
    if tokens.min() < 0:
        raise BadReferenceError(f"prompt tokens in {source}: negative codes")
    return tokens


def load_prompt_tokens(npy_path: str) -> np.ndarray:
    """A (10, T) integer array saved with np.save (Fish Speech's prompt-token files); BadReferenceError otherwise."""
    if not os.path.isfile(npy_path):
        raise BadReferenceError(f"prompt tokens file not found: {npy_path}")
    try:
        tokens = np.load(npy_path, allow_pickle=False)
    except Exception as exc:  # ValueError / OSError / EOFError for truncated or non-npy files
        raise BadReferenceError(f"cannot read prompt tokens {npy_path}: {exc}") from exc
    return _check_tokens(tokens, npy_path)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_path(audio_path: str, fingerprint: str, cache_dir: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", fingerprint)
    return os.path.join(cache_dir, f"{file_sha256(audio_path)}-{safe}.npy")


def encode_cached(engine: Engine, audio_path: str, cache_dir: str) -> tuple[np.ndarray, bool]:
    """(prompt tokens, cache_hit) for a reference audio file, encoding it with `engine` on a miss."""
    if not os.path.isfile(audio_path):
        raise BadReferenceError(f"reference audio not found: {audio_path}")
    entry = cache_path(audio_path, engine.fingerprint(), cache_dir)
    if os.path.isfile(entry):
        try:
            return _check_tokens(np.load(entry, allow_pickle=False), entry), True
        except Exception:
            pass  # corrupt or foreign entry: encode again and overwrite it
    tokens = _check_tokens(np.asarray(engine.encode_reference(audio_path)), audio_path)
    atomic_write(entry, lambda tmp: np.save(tmp, tokens), suffix=".npy")  # not mkstemp: its 0600 ignores the umask
    return tokens, False


def speaker_key(tokens: np.ndarray, text: str) -> str:
    """Content hash of a voice (prompt tokens + transcript), used as SpeakerPrompt.key."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    digest = hashlib.sha256(f"{tokens.shape}\0{text}\0".encode())
    digest.update(tokens.tobytes())
    return digest.hexdigest()[:32]
