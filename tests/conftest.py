"""Shared fixtures. Keep each fixture small and documented; append new ones below."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fishmp.engines.audio import speech_like


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
        if kind == "silent":
            mono = np.zeros(int(round(seconds * sample_rate)), np.float32)
        elif kind == "speech-like":
            mono = speech_like(seconds, sample_rate, 140.0, seed=int(round(seconds * sample_rate)) + sample_rate)
        else:
            raise ValueError(f"kind must be 'speech-like' or 'silent', not {kind!r}")
        sf.write(path, np.repeat(mono[:, None], channels, axis=1), sample_rate)
        return path

    return make


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    """A project directory with reference files (tests/job_files.py), for the job-file tests."""
    from job_files import make_proj

    return make_proj(tmp_path)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No FISH_* variable from the environment running the tests leaks into a Pool's settings."""
    for k in [k for k in os.environ if k.startswith("FISH_")]:
        monkeypatch.delenv(k)


def run_fishmp(args: list[str], cwd: str, env: dict[str, str] | None = None, timeout: float = 240,
               **kwargs: object) -> subprocess.CompletedProcess:
    """`python -m fishmp ARGS` as a real subprocess, with FISH_* from the outer environment removed."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
    full.update(env or {})
    return subprocess.run([sys.executable, "-m", "fishmp", *args], cwd=cwd, env=full, capture_output=True, text=True,
                          timeout=timeout, **kwargs)


@pytest.fixture
def fishmp_cli() -> Callable[..., subprocess.CompletedProcess]:
    """fishmp_cli(args, cwd, env=None, timeout=240) -> CompletedProcess of `python -m fishmp`."""
    return run_fishmp


@pytest.fixture
def synthetic_job(tmp_path, make_wav) -> Callable[..., str]:
    """synthetic_job(texts_by_speaker, **top) -> path of a new-format job.json with generated reference wavs."""

    def make(texts: dict[str, list[str]], **top: object) -> str:
        speakers, segments = {}, []
        for name, lines in texts.items():
            make_wav(str(tmp_path / f"{name}.wav"), 1.0, 16000)
            speakers[name] = {"reference_audio": f"{name}.wav", "reference_text": f"I am {name}."}
            segments += [{"id": f"{name}-{i:03d}", "speaker": name, "text": t} for i, t in enumerate(lines)]
        path = tmp_path / "job.json"
        path.write_text(json.dumps({"speakers": speakers, "segments": segments, **top}))
        return str(path)

    return make


def synthetic_env(tmp_path, **extra: str) -> dict[str, str]:
    """Environment for a fast synthetic-engine run with 2 CPU workers in child processes."""
    env = {"FISH_ENGINE": "synthetic", "FISH_CPU_WORKERS": "2", "FISH_MULTIPROCESS_MODE": "true",
           "FISH_SYNTHETIC_LOAD_S": "0.2", "FISH_CACHE_DIR": str(tmp_path / "cache"),
           "FISH_SYNTHETIC_STATE_DIR": str(tmp_path / "state")}
    os.makedirs(env["FISH_SYNTHETIC_STATE_DIR"], exist_ok=True)
    env.update(extra)
    return env


def jsonl_events(stdout: str) -> list[dict]:
    """Every stdout line but the last (the result line) is one JSON event."""
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    return [json.loads(ln) for ln in lines[:-1]]
