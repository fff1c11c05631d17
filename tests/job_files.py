"""Shared by the tests/test_job_*.py files: reference files, job dicts and problem collectors (real files in
tmp_path). Not a test module."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fishmp.job import (
    JobError,
    load_job,
)

# ------------------------------------------------------------------------------------------------ fixtures


def write_wav(path: Path, seconds: float = 0.1, freq: float = 220.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * freq * t)).astype("float32"), 16000)
    return path


def write_npy(path: Path, frames: int = 20, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(seed).integers(0, 1024, size=(10, frames), dtype=np.int64))
    return path


def make_proj(tmp_path: Path) -> Path:
    """A project directory with refs/alice.wav and refs/bob.npy next to where job files are written (each test
    module's `proj` fixture)."""
    write_wav(tmp_path / "refs" / "alice.wav")
    write_npy(tmp_path / "refs" / "bob.npy")
    return tmp_path


def new_job() -> dict:
    return {
        "speakers": {
            "alice": {"reference_audio": "refs/alice.wav", "reference_text": "Hello, I am Alice."},
            "bob": {"prompt_tokens": "refs/bob.npy", "reference_text": "Bob here."},
        },
        "segments": [
            {"id": "0001", "speaker": "alice", "text": "First line.", "output": "0001.wav"},
            {"id": "0002", "speaker": "bob", "text": "Second line.", "params": {"temperature": 0.5, "seed": 7}},
            {"speaker": "alice", "text": "Third line.", "output": "alice/third.wav"},
        ],
        "params": {"temperature": 0.7, "top_p": 0.8},
    }


def write_job(directory: Path, data: object, name: str = "job.json") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def problems_of(directory: Path, data: object, output_dir: Path | None = None) -> list[str]:
    path = write_job(directory, data)
    with pytest.raises(JobError) as info:
        load_job(str(path), str(output_dir or directory / "out"))
    assert info.value.problems, "JobError without problems"
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def one_problem(directory: Path, data: object, *needles: str, output_dir: Path | None = None) -> str:
    """Exactly one problem, containing every needle."""
    problems = problems_of(directory, data, output_dir)
    assert len(problems) == 1, problems
    for needle in needles:
        assert needle in problems[0], (needle, problems[0])
    return problems[0]


def legacy_generate(proj: Path) -> dict:
    write_npy(proj / "legacy" / "speaker_3.npy", seed=3)
    write_npy(proj / "legacy" / "speaker_5.npy", seed=5)
    return {
        "mode": "generate",
        "checkpoint_dir": "checkpoints/openaudio-s1-mini",
        "output_dir": "legacy",
        "temperature": 0.6,
        "tasks": [
            {"segment_index": 4, "speaker_id": 3, "target_text": "Hola.", "npy_file": "legacy/speaker_3.npy",
             "reference_text": "Ref three.", "output_file": "seg_4.wav"},
            {"segment_index": 0, "speaker_id": 5, "target_text": "Adios.", "npy_file": "legacy/speaker_5.npy",
             "reference_text": "Ref five.", "output_file": "seg_0.wav", "top_p": 0.9, "seed": 11},
            {"segment_index": 9, "speaker_id": 3, "target_text": "Otra vez.", "npy_file": "legacy/speaker_3.npy",
             "reference_text": "Ref three.", "output_file": str(proj / "legacy" / "wavs" / "seg_9.wav"),
             "extra_backend_field": {"ignored": True}},
        ],
    }

def legacy_encode(proj: Path) -> dict:
    write_wav(proj / "voices" / "three.wav")
    write_wav(proj / "voices" / "five.wav", freq=330)
    return {
        "mode": "encode",
        "checkpoint_dir": "/models/s1-mini",
        "output_dir": "npys",
        "speakers": [
            {"speaker_id": 3, "reference_audio": "voices/three.wav", "reference_text": "Three.",
             "output_npy": "s3.npy"},
            {"speaker_id": "five", "reference_audio": "voices/five.wav", "reference_text": "Five.\n"},
        ],
    }
