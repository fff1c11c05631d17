"""Speaker references: prompt tokens from .npy files, or encoded from audio through an engine with a disk cache.

Cache entries live in `cache_dir/<sha256 of audio bytes>-<engine fingerprint>.npy`: a changed file or another
checkpoint misses. Writes go through fishmp.worker.files.atomic_write (a unique temp file in the same directory, renamed
into place), so concurrent workers never see a half-written entry, and entries get mode 0666 minus the umask like the
wavs (a cache directory shared by several users stays readable). A corrupt or malformed entry is ignored and rewritten.
An unusable cache directory (a file, read-only, full) is never a segment's fault: the tokens are used uncached.
"""

from __future__ import annotations

import hashlib
import json
import os
import re

import numpy as np

from ..engines.base import BadReferenceError, Engine
from .files import atomic_write, new_temp

NUM_CODEBOOKS = 10
# S1's codec: codes of the semantic codebook (row 0) are < 4096, of each of the 9 residual ones (rows 1-9) < 1024.
# The synthetic test engine makes codes in the same ranges.
S1_CODEBOOKS = (4096, 1024)


def codebook_sizes(settings: object) -> tuple[int, int]:
    """(semantic, residual): prompt codes must lie below these for the worker's checkpoint. A code beyond them
    indexes past the model's embeddings (a crash, or with a huge one a silently wrapped garbage prompt). Read from the
    checkpoint without torch: config.json's codebook_size (the LLM's embedding per codebook) and the codec's
    quantizer (fish-speech's packaged yaml with the checkpoint's overrides); S1's sizes when it cannot be read."""
    if getattr(settings, "engine", "fish") != "fish":
        return S1_CODEBOOKS
    from ..planning.memory import CheckpointReadError, codec_config

    directory = str(getattr(settings, "checkpoint_dir", ""))
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as f:
            llm = int(json.load(f)["codebook_size"])
        quantizer = codec_config(directory)["quantizer"]
        return (min(llm, int(quantizer["semantic_codebook_size"])), min(llm, int(quantizer["codebook_size"])))
    except (OSError, ValueError, KeyError, TypeError, CheckpointReadError):
        return S1_CODEBOOKS


def _check_tokens(tokens: object, source: str, sizes: tuple[int, int] | None = None) -> np.ndarray:
    if not isinstance(tokens, np.ndarray) or tokens.ndim != 2 or tokens.shape[0] != NUM_CODEBOOKS \
            or tokens.shape[1] == 0 or not np.issubdtype(tokens.dtype, np.integer):
        shape = getattr(tokens, "shape", None)
        dtype = getattr(tokens, "dtype", type(tokens).__name__)
        raise BadReferenceError(f"prompt tokens in {source}: shape {shape} dtype {dtype}, "
                                f"expected ({NUM_CODEBOOKS}, T>0) integers")
    if tokens.min() < 0:
        raise BadReferenceError(f"prompt tokens in {source}: negative codes")
    if sizes is None:
        return tokens
    for rows, size, what in ((tokens[:1], sizes[0], "semantic codebook (row 0)"),
                             (tokens[1:], sizes[1], "residual codebooks (rows 1-9)")):
        if (top := int(rows.max())) >= size:
            raise BadReferenceError(f"prompt tokens in {source}: code {top} in the {what} is beyond this checkpoint's "
                                    f"codebook (0 to {size - 1}): not codes of this model's codec")
    return tokens


def load_prompt_tokens(npy_path: str, sizes: tuple[int, int] | None = None) -> np.ndarray:
    """A (10, T) integer array saved with np.save (Fish Speech's prompt-token files), its codes checked against the
    codebook `sizes` (see codebook_sizes) when given; BadReferenceError otherwise."""
    if not os.path.isfile(npy_path):
        raise BadReferenceError(f"prompt tokens file not found: {npy_path}")
    try:
        tokens = np.load(npy_path, allow_pickle=False)
    except Exception as exc:  # ValueError / OSError / EOFError for truncated or non-npy files
        raise BadReferenceError(f"cannot read prompt tokens {npy_path}: {exc}") from exc
    return _check_tokens(tokens, npy_path, sizes)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def cache_path(audio_path: str, fingerprint: str, cache_dir: str) -> str:
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", fingerprint)
    return os.path.join(cache_dir, f"{file_sha256(audio_path)}-{safe}.npy")


def encode_cached(engine: Engine, audio_path: str, cache_dir: str,
                  sizes: tuple[int, int] | None = None) -> tuple[np.ndarray, bool]:
    """(prompt tokens, cache_hit) for a reference audio file, encoding it with `engine` on a miss."""
    if not os.path.isfile(audio_path):
        raise BadReferenceError(f"reference audio not found: {audio_path}")
    entry = cache_path(audio_path, engine.fingerprint(), cache_dir)
    if os.path.isfile(entry):
        try:
            return _check_tokens(np.load(entry, allow_pickle=False), entry, sizes), True
        except Exception:
            pass  # corrupt or foreign entry: encode again and overwrite it
    tokens = _check_tokens(np.asarray(engine.encode_reference(audio_path)), audio_path, sizes)
    try:
        atomic_write(entry, lambda tmp: np.save(tmp, tokens), suffix=".npy")  # not mkstemp: 0600 ignores the umask
    except OSError:
        pass  # an unusable cache (a file, read-only, full) only costs the next encode; the main process warned once
    return tokens, False


def cache_dir_problem(cache_dir: str) -> str | None:
    """Why FISH_CACHE_DIR cannot hold cache entries (not a directory, read-only, full), or None. Probed with a real
    write of a few KiB (an empty file still fits on a full disk), removed at once."""
    try:
        os.makedirs(cache_dir, exist_ok=True)
        probe = new_temp(cache_dir, ".npy")
        try:
            with open(probe, "wb") as f:
                f.write(b"\0" * 4096)
                f.flush()
                os.fsync(f.fileno())
        finally:
            os.unlink(probe)
    except OSError as exc:
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if getattr(exc, "filename", None) else "")
    return None


def speaker_key(tokens: np.ndarray, text: str) -> str:
    """Content hash of a voice (prompt tokens + transcript), used as SpeakerPrompt.key."""
    tokens = np.ascontiguousarray(tokens, dtype=np.int64)
    digest = hashlib.sha256(f"{tokens.shape}\0{text}\0".encode())
    digest.update(tokens.tobytes())
    return digest.hexdigest()[:32]


def engine_fingerprint(settings: object) -> str | None:
    """The fingerprint the worker's engine will report (Engine.fingerprint), computed without loading it: "fish-" +
    the checkpoint's content hash (fishmp.engines.fish), "synthetic" for the test engine; None when the checkpoint
    cannot be read (then nothing is reused)."""
    engine = getattr(settings, "engine", "fish")
    if engine == "synthetic":
        return "synthetic"
    if engine != "fish":
        return None
    from ..planning.checkpoint import checkpoint_fingerprint

    try:
        return "fish-" + checkpoint_fingerprint(str(getattr(settings, "checkpoint_dir", "")))
    except OSError:
        return None


def reuse_encoded(audio_path: str, output_npy: str, fingerprint: str | None, cache_dir: str,
                  sizes: tuple[int, int] | None = None) -> str | None:
    """An encode step's item from the reference cache, without a worker: None when the cache has no usable entry
    for this audio (the item is encoded as before); "unchanged" when `output_npy` already holds these tokens (the
    file is left as it is: same content, same mtime); "written" when it was (re)written from the cache."""
    if fingerprint is None or not os.path.isfile(audio_path):
        return None
    try:
        entry = cache_path(audio_path, fingerprint, cache_dir)
        tokens = _check_tokens(np.load(entry, allow_pickle=False), entry, sizes)
    except (OSError, ValueError, EOFError, BadReferenceError):
        return None  # no entry, or a corrupt / foreign one: the worker encodes again and overwrites it
    try:
        old = np.load(output_npy, allow_pickle=False)
        if old.dtype == tokens.dtype and np.array_equal(old, tokens):
            return "unchanged"
    except (OSError, ValueError, EOFError):
        pass  # missing or unreadable: written below
    atomic_write(output_npy, lambda tmp: np.save(tmp, tokens), suffix=".npy")
    return "written"
