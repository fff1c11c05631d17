"""Reading and validating reference audio, shared by every engine (numpy + soundfile only: no torch here).

A reference is rejected with BadReferenceError, whose message names the file, when it is missing, unreadable or
corrupt, shorter than MIN_REFERENCE_S, not finite, or silent (peak below SILENCE_PEAK after the mono downmix).
"""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf

from .base import BadReferenceError

MIN_REFERENCE_S = 0.5
SILENCE_PEAK = 1e-4


def read_reference(path: str) -> tuple[np.ndarray, int]:
    """Reference file (any format soundfile reads, any channels) -> (mono float32 samples, native sample rate)."""
    if not os.path.isfile(path):
        raise BadReferenceError(f"reference audio not found: {path}")
    try:
        data, rate = sf.read(path, dtype="float32", always_2d=True)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError for corrupt input
        raise BadReferenceError(f"cannot read reference audio {path}: {exc}") from exc
    if rate <= 0 or data.size == 0:
        raise BadReferenceError(f"reference audio {path} is empty")
    mono = data.mean(axis=1, dtype=np.float32)  # downmix: the codec takes one channel
    seconds = len(mono) / rate
    if seconds < MIN_REFERENCE_S:
        raise BadReferenceError(f"reference audio {path} is {seconds:.2f} s long; at least {MIN_REFERENCE_S} s needed")
    if not np.isfinite(mono).all():
        raise BadReferenceError(f"reference audio {path} contains NaN or infinite samples")
    peak = float(np.abs(mono).max())
    if peak < SILENCE_PEAK:
        raise BadReferenceError(f"reference audio {path} is silent (peak {peak:.2e} < {SILENCE_PEAK:g})")
    return mono, int(rate)


def speech_like(seconds: float, sample_rate: int = 44100, pitch_hz: float = 140.0, seed: int = 0) -> np.ndarray:
    """A voice-like test signal: harmonics of `pitch_hz`, syllable-rate amplitude modulation and a little noise."""
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    voice = sum(np.sin(2 * np.pi * pitch_hz * k * t) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    noise = np.random.default_rng(seed).standard_normal(n)
    return (0.2 * voice * envelope + 0.01 * noise).astype(np.float32)
