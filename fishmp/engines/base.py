"""The engine interface a worker drives: load once -> encode references -> synthesize segments.

Engines raise typed errors so the orchestrator can tell a bad input (fail that segment or speaker, keep the worker)
from a broken worker (recycle it). Only engine modules import torch or fish_speech.
"""

from __future__ import annotations

from collections.abc import Callable
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


class BatchSession(Protocol):
    """Rows decoded together, one step at a time (batched decoding, FISH_BATCH_SIZE); each row has its own speaker
    (mixed voices: rows of different speakers and jobs share a step).

    The worker adds rows whenever some are free (continuous refill: a row that finished takes the next segment at
    the next step) and calls `step()` until no row is active. Each row is one segment: a long text split into chunks
    is decoded chunk after chunk inside its row. A row's audio must not depend on its batchmates (their texts,
    speakers, number or order): same text, params, seed and voice -> same tokens as `Engine.synthesize` (exact on
    CPU float32).
    """

    capacity: int  # rows this session can hold at once

    def free_rows(self) -> int:
        """Rows that `add` can take now."""

    def active(self) -> int:
        """Rows added and not yet returned by `step`."""

    def add(self, key: str, text: str, params: SynthesisParams, speaker: SpeakerPrompt | None = None) -> None:
        """Start a row for segment `key` in `speaker`'s voice. Input errors of this segment alone (TextTooLongError,
        ValueError for parameters, BadReferenceError for an unusable voice) are raised here and leave the other rows
        untouched."""

    def step(self) -> list[tuple[str, Audio]]:
        """Advance every active row (one or a few decode steps); return the rows that finished, as (key, audio).
        An error here (EngineOutOfMemoryError, EngineError) concerns the whole batch: the session is then unusable
        and the worker retries its rows in smaller batches / singly so one poison segment fails alone."""

    def close(self) -> None:
        """Drop every row and free the session's per-row memory (KV rows)."""


class SequentialSession:
    """A BatchSession of one row for engines without batched decoding: `step()` synthesizes the row whole."""

    capacity = 1

    def __init__(self, synthesize: Callable[[str, SpeakerPrompt | None, SynthesisParams], Audio]) -> None:
        self._synthesize = synthesize
        self._row: tuple[str, str, SynthesisParams, SpeakerPrompt | None] | None = None

    def free_rows(self) -> int:
        return 0 if self._row else 1

    def active(self) -> int:
        return 1 if self._row else 0

    def add(self, key: str, text: str, params: SynthesisParams, speaker: SpeakerPrompt | None = None) -> None:
        if self._row is not None:
            raise RuntimeError("SequentialSession holds one row")
        self._row = (key, text, params, speaker)

    def step(self) -> list[tuple[str, Audio]]:
        if self._row is None:
            return []
        key, text, params, speaker = self._row
        self._row = None
        return [(key, self._synthesize(text, speaker, params))]

    def close(self) -> None:
        self._row = None


class Engine(Protocol):
    name: str
    sample_rate: int

    def load(self) -> None:
        """Load the model once; raise EngineOutOfMemoryError / EngineError on failure."""

    def encode_reference(self, audio_path: str) -> np.ndarray:
        """Reference audio file (any rate, any channels) -> prompt tokens (10, T) int. BadReferenceError if unusable."""

    def synthesize(self, text: str, speaker: SpeakerPrompt | None, params: SynthesisParams) -> Audio:
        """One segment of text in the speaker's voice."""

    def open_batch(self, capacity: int) -> BatchSession:
        """A session decoding up to `capacity` rows together, each of its own speaker (engines without batching
        omit this method; the worker then wraps `synthesize` in a SequentialSession)."""

    def release_memory(self) -> None:
        """Free cached device memory after an out-of-memory error (called outside the except block)."""

    def fingerprint(self) -> str:
        """Identifies the loaded model (checkpoint content), for the reference cache and resume decisions."""
