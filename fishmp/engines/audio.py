"""Reading and validating reference audio, shared by every engine (numpy + soundfile only: no torch here).

A reference is rejected with BadReferenceError, whose message names the file, when it is missing, unreadable or
corrupt, declares more than MAX_REFERENCE_CHANNELS, MAX_REFERENCE_RATE or its length cap (judged from the header,
before decoding), is shorter than MIN_REFERENCE_S, not finite, or silent (peak below SILENCE_PEAK after the mono
downmix).
"""

from __future__ import annotations

import os

import numpy as np
import soundfile as sf

from .base import BadReferenceError

MIN_REFERENCE_S = 0.5
SILENCE_PEAK = 1e-4
# What a reference may declare before any of it is decoded; MAX_REFERENCE_S bounds what is decoded (the fish engine
# refuses more than its codec takes anyway, and fishmp serve has its own FISH_SERVE_MAX_REFERENCE_S).
MAX_REFERENCE_S = 300.0
MAX_REFERENCE_RATE = 96000
MAX_REFERENCE_CHANNELS = 8
BLOCK_FRAMES = 65536


def read_reference(path: str, max_seconds: float = MAX_REFERENCE_S) -> tuple[np.ndarray, int]:
    """Reference file (any format soundfile reads, any channels) -> (mono float32 samples, native sample rate).

    The header is judged before any sample is decoded (a 100 KB FLAC can declare minutes of 8 channels at 192 kHz:
    hundreds of MiB decoded), and at most `max_seconds` are decoded, block by block into the mono result, so a file
    that lies about its length costs no more than an honest one."""
    if not os.path.isfile(path):
        raise BadReferenceError(f"reference audio not found: {path}")
    try:
        info = sf.info(path)
    except Exception as exc:  # soundfile raises LibsndfileError / RuntimeError / TypeError for corrupt input
        raise BadReferenceError(f"cannot read reference audio {path}: {exc}") from exc
    rate, channels = int(info.samplerate), int(info.channels)
    if rate <= 0 or channels <= 0:
        raise BadReferenceError(f"reference audio {path} is empty")
    if rate > MAX_REFERENCE_RATE or channels > MAX_REFERENCE_CHANNELS:
        raise BadReferenceError(f"reference audio {path} is {channels} channel(s) at {rate} Hz; a reference is at most "
                                f"{MAX_REFERENCE_CHANNELS} channels at {MAX_REFERENCE_RATE} Hz (a voice recording)")
    keep = int(max_seconds * rate)
    if info.frames > keep:
        raise BadReferenceError(f"reference audio {path} is {info.frames / rate:.1f} s long; at most {max_seconds:g} s "
                                "(10-30 s is plenty for cloning)")
    mono = np.empty(min(info.frames, keep) if info.frames > 0 else keep, dtype=np.float32)
    n = 0
    try:
        for block in sf.blocks(path, blocksize=BLOCK_FRAMES, dtype="float32", always_2d=True, frames=keep + 1):
            if n + len(block) > keep:
                raise BadReferenceError(f"reference audio {path} is longer than {max_seconds:g} s")
            if n + len(block) > len(mono):  # the header understated the length (it may, for some formats)
                mono = np.resize(mono, min(keep, max(n + len(block), 2 * len(mono))))
            mono[n:n + len(block)] = block.mean(axis=1, dtype=np.float32)  # downmix: the codec takes one channel
            n += len(block)
    except BadReferenceError:
        raise
    except Exception as exc:
        raise BadReferenceError(f"cannot read reference audio {path}: {exc}") from exc
    mono = mono[:n]
    if mono.size == 0:
        raise BadReferenceError(f"reference audio {path} is empty")
    seconds = len(mono) / rate
    if seconds < MIN_REFERENCE_S:
        raise BadReferenceError(f"reference audio {path} is {seconds:.2f} s long; at least {MIN_REFERENCE_S} s needed")
    if not np.isfinite(mono).all():
        raise BadReferenceError(f"reference audio {path} contains NaN or infinite samples")
    peak = float(np.abs(mono).max())
    if peak < SILENCE_PEAK:
        raise BadReferenceError(f"reference audio {path} is silent (peak {peak:.2e} < {SILENCE_PEAK:g})")
    return mono, rate


def speech_like(seconds: float, sample_rate: int = 44100, pitch_hz: float = 140.0, seed: int = 0) -> np.ndarray:
    """A voice-like test signal: harmonics of `pitch_hz`, syllable-rate amplitude modulation and a little noise."""
    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    voice = sum(np.sin(2 * np.pi * pitch_hz * k * t) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    noise = np.random.default_rng(seed).standard_normal(n)
    return (0.2 * voice * envelope + 0.01 * noise).astype(np.float32)
