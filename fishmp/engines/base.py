"""The engine interface a worker drives: load once -> encode references -> synthesize segments.

Engines raise typed errors so the orchestrator can tell a bad input (fail that segment or speaker, keep the worker)
from a broken worker (recycle it). Only engine modules import torch or fish_speech.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class EngineError(Exception):
    """The engine failed for a reason that is not the input's fault; the worker should be recycled."""

    kind = "engine_error"


class BadReferenceError(EngineError):
    """The speaker's reference (audio or prompt tokens) cannot be used: fail that speaker's segments."""

    kind = "bad_reference"


class TextTooLongError(EngineError):
    """The text does not fit the model even after sentence splitting: fail that segment."""

    kind = "text_too_long"


class EngineOutOfMemoryError(EngineError):
    """The device ran out of memory. The worker frees what it can and retries once."""

    kind = "out_of_memory"


@dataclass(frozen=True)
class SynthesisParams:
    temperature: float = 0.8
    top_p: float = 0.8
    repetition_penalty: float = 1.1
    max_new_tokens: int = 1024
    seed: int | None = None


@dataclass(frozen=True)
class SpeakerPrompt:
    """A speaker's voice: prompt tokens (10, T) int from its reference audio, and the reference transcript.

    `key` identifies the voice (content hash); engines may keep prepared tensors for the last key they saw.
    """

    key: str
    tokens: np.ndarray
    text: str


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # mono float32, in [-1, 1]
    sample_rate: int
    tokens: int = 0  # semantic frames generated (tokens/s = tokens / synthesis seconds)

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.sample_rate


class Engine(Protocol):
    name: str
    sample_rate: int

    def load(self) -> None:
        """Load the model once; raise EngineOutOfMemoryError / EngineError on failure."""

    def encode_reference(self, audio_path: str) -> np.ndarray:
        """Reference audio file (any rate, any channels) -> prompt tokens (10, T) int. BadReferenceError if unusable."""

    def synthesize(self, text: str, speaker: SpeakerPrompt | None, params: SynthesisParams) -> Audio:
        """One segment of text in the speaker's voice."""

    def release_memory(self) -> None:
        """Free cached device memory after an out-of-memory error (called outside the except block)."""

    def fingerprint(self) -> str:
        """Identifies the loaded model (checkpoint content), for the reference cache and resume decisions."""
