"""The messages between the main process and a worker: frozen dataclasses matched by id, failures as data.

Both sides import this module alone: the worker process (fishmp/worker/process.py, its lanes) and every worker pool
(fishmp/backends/: the local processes and the Ray actors) exchange exactly these classes. What each message means
in the conversation (lanes, Started/Done/Failed, Resized, Leaving) is told in fishmp/worker/process.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


# ---- messages (frozen dataclasses, matched by id) -------------------------------------------------------------
@dataclass(frozen=True)
class SpeakerRef:
    id: str
    reference_text: str
    reference_audio: str | None = None
    prompt_tokens: str | None = None
    # Content hash of the reference file + transcript: a pool reused across jobs must not mistake a new "speaker 3"
    # (dubbing backends reuse ids and paths per video) for the last job's.
    fingerprint: str = ""


@dataclass(frozen=True)
class SegmentTask:
    id: str
    text: str
    speaker: SpeakerRef
    params: dict[str, Any]  # SynthesisParams fields; absent = engine default
    output: str
    solo: bool = False  # run in a session of its own: an earlier attempt died with its worker (maybe in a batch)
    max_seconds: float | None = None  # the segment's subtitle slot: a longer take fails the take check
    # The fit (fishmp/job/fitting.py FitSettings fields, plus "slot" and "raw_output"): None = not fitted. The writer
    # keeps the raw take at raw_output and writes the fitted one (fishmp/worker/fit.py); the take check then judges
    # the slot through the fit-aware take choice instead of over_slot.
    fit: dict[str, Any] | None = None
    # Streamed (a line of fishmp serve that asked for streaming): the row sends AudioChunk messages as it decodes,
    # is never retaken (its audio has left) and its wav is the chunks put together.
    stream: bool = False


@dataclass(frozen=True)
class AudioChunk:
    """A streamed row's next piece of audio, sent before its Done: `index` counts from 0 per take, in order;
    `samples` float32 mono at `sample_rate` (a few thousand samples: small next to the pipe's throughput)."""

    worker: str
    task: str
    index: int
    samples: Any  # numpy float32 array
    sample_rate: int


@dataclass(frozen=True)
class Drop:
    """Main -> worker: the task's job was cancelled (a streamed line whose client left): free its row now. The worker
    answers Failed(kind "cancelled", input_error True) if it dropped something, nothing if the task was over."""

    task: str


@dataclass(frozen=True)
class EncodeTask:
    id: str
    audio_path: str
    output_npy: str


@dataclass(frozen=True)
class Ready:
    worker: str
    pid: int
    device: str
    load_seconds: float
    batch_size: int = 1  # lanes: the main process may have batch_size running + 1 queued tasks outstanding here
    footprint: Any = None  # FISH_MODEL_MEMORY_GB=auto: fishmp.worker.footprint.Footprint after a warm-up segment (autofill.py)


@dataclass(frozen=True)
class Resized:
    """The worker's batch shrank after running out of memory: it now offers `batch_size` lanes (for good)."""

    worker: str
    batch_size: int


@dataclass(frozen=True)
class Leaving:
    """Worker recycling (FISH_WORKER_MAX_SEGMENTS / FISH_WORKER_MAX_GROWTH_GB, fishmp/worker/recycle.py): the worker takes no
    new rows, finishes the ones it runs, hands back `handed_back` (tasks it will never start: requeue them without
    counting an attempt) and exits 0. Not a failure: the main process replaces it without charging the slot."""

    worker: str
    reason: str  # one line with the figures, e.g. "finished 50 segments (FISH_WORKER_MAX_SEGMENTS=50)"
    figures: dict[str, Any]  # segments, memory_kind, baseline_gib, current_gib, growth_gib
    handed_back: tuple[str, ...]


@dataclass(frozen=True)
class LoadFailed:
    worker: str
    kind: str
    message: str
    traceback: str


@dataclass(frozen=True)
class Started:
    worker: str
    task: str


@dataclass(frozen=True)
class Done:
    worker: str
    task: str
    path: str
    audio_seconds: float
    synthesis_seconds: float
    tokens: int
    # The take check (fishmp/worker/takes.py): {"tried", "kept", "seed", "suspect", "takes": [verdicts], "over_slot_s"?};
    # None when takes are not checked (FISH_TAKE_CHECK=false, encode tasks).
    take: dict[str, Any] | None = None
    # The fit's record (fishmp/worker/fit.py fit_line: slot_s, raw_s, trimmed_s, final_s, speed, loudness_before/after,
    # overrun?, raw, fit_ms); None when the segment is not fitted.
    fit: dict[str, Any] | None = None


@dataclass(frozen=True)
class Failed:
    worker: str
    task: str
    kind: str
    message: str
    traceback: str
    input_error: bool  # True: the input is bad (do not retry); False: the worker is leaving, requeue the task


INPUT_ERRORS = ("bad_reference", "text_too_long", "write_error", "out_of_memory")
