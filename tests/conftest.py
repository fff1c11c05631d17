"""Shared fixtures. Keep each fixture small and documented; append new ones below."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
import soundfile as sf


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A seeded random Fish Speech checkpoint (openaudio-s1-mini layout, ~10 MB), written once per session."""
    from fishmp.engines.tiny import write_checkpoint

    path = str(tmp_path_factory.mktemp("tiny-checkpoint"))
    write_checkpoint(path, "tiny")
    return path


@pytest.fixture
def make_wav() -> Callable[..., str]:
    """make_wav(path, seconds, sample_rate=44100, channels=1, kind='speech-like'|'silent') -> path.

    'speech-like': a 140 Hz voice with harmonics, syllable-rate amplitude modulation and a little noise (seeded)."""

    def make(path: str, seconds: float, sample_rate: int = 44100, channels: int = 1,
             kind: str = "speech-like") -> str:
        n = int(round(seconds * sample_rate))
        if kind == "silent":
            mono = np.zeros(n, np.float32)
        elif kind == "speech-like":
            t = np.arange(n) / sample_rate
            rng = np.random.default_rng(n + sample_rate)
            voice = sum(np.sin(2 * np.pi * 140 * k * t) / k for k in range(1, 6))
            envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
            mono = (0.2 * voice * envelope + 0.01 * rng.standard_normal(n)).astype(np.float32)
        else:
            raise ValueError(f"kind must be 'speech-like' or 'silent', not {kind!r}")
        sf.write(path, np.repeat(mono[:, None], channels, axis=1), sample_rate)
        return path

    return make
