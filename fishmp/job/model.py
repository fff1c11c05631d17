"""What a loaded job is: frozen dataclasses (speakers, segments, the job) and the fingerprints resume uses."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Protocol

from .fitting import FitSettings
from .params import Params

# A stored voice's name (fishmp serve's reference store): a name, never a path (upstream had a traversal through it).
REFERENCE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class VoiceSource(Protocol):
    """Where a job's `reference_id` and data-URL `reference_audio` speakers come from (fishmp serve's reference
    store, fishmp/server/refstore.py): the job layer names them, the source turns them into files."""

    def reference(self, reference_id: str) -> tuple[str, str]:
        """(absolute audio path, transcript) of a stored voice; LookupError with a one-line message if unknown."""

    def data_url(self, url: str) -> str:
        """Store a `data:audio/...;base64,...` reference and return its absolute path; ValueError if unusable."""


@dataclass(frozen=True)
class Speaker:
    id: str
    reference_text: str
    reference_audio: str | None = None  # absolute path
    prompt_tokens: str | None = None  # absolute path to a pre-encoded .npy (10, T)
    reference_id: str | None = None  # the stored voice reference_audio was resolved from, if any

    @property
    def reference_path(self) -> str | None:
        return self.prompt_tokens if self.prompt_tokens is not None else self.reference_audio


@dataclass(frozen=True)
class Segment:
    id: str
    speaker: str
    text: str  # normalised (NFC, no control characters, stripped), never empty
    output: str  # absolute path, guaranteed inside Job.output_dir
    params: Params  # already merged with the job's params
    order: int  # position in the job file (0-based)
    legacy_index: int | None = None  # segment_index of the legacy generate config
    max_seconds: float | None = None  # subtitle slot: a longer take fails the take check (fishmp/worker/takes.py)
    start: float | None = None  # where the line starts in the video (seconds); the film's track places it there
    end: float | None = None  # where the original line ends: end - start is the slot when max_seconds is not given
    fit: FitSettings | None = None  # None: not fitted (no slot, fitting off, a legacy config); else the settings...
    slot: float | None = None  # ...and the slot it is fitted to (seconds; borrow_gap may extend it)

    @property
    def raw_output(self) -> str | None:
        """Where a fitted segment's raw take is kept, beside the fitted wav (None when not fitted)."""
        return raw_take_path(self.output) if self.fit is not None else None


def raw_take_path(output: str) -> str:
    """`x.wav` -> `x.raw.wav`: the raw take of a fitted line, kept for review."""
    return output[: -len(".wav")] + ".raw.wav"


@dataclass(frozen=True)
class Job:
    speakers: dict[str, Speaker]
    segments: tuple[Segment, ...]
    output_dir: str  # absolute
    checkpoint_dir: str | None = None  # from legacy configs
    legacy: str | None = None  # None (fishmp format) | "generate"
    source: str | None = None  # the job file path
    skipped: tuple[str, ...] = ()  # problems of the items left out when loaded with skip_invalid
    items: int | None = None  # segments (tasks) the file lists, skipped ones included; None: len(segments)
    # The same, one entry per problem for manifest.json's "invalid": {"id", "index", "speaker", "reason"} (keys known)
    invalid: tuple[dict[str, Any], ...] = ()
    video_seconds: float | None = None  # the film's length: the track (track.wav) is at least this long


@dataclass(frozen=True)
class EncodeItem:
    speaker_id: int | str
    reference_audio: str  # absolute path
    reference_text: str
    output_npy: str  # absolute path, guaranteed inside EncodeJob.output_dir


@dataclass(frozen=True)
class EncodeJob:
    items: tuple[EncodeItem, ...]
    output_dir: str  # absolute
    checkpoint_dir: str | None = None
    source: str | None = None
    legacy: str = "encode"
    skipped: tuple[str, ...] = ()  # problems of the speakers left out when loaded with skip_invalid
    listed: int | None = None  # speakers the file lists, skipped ones included; None: len(items)


def reference_fingerprint(speaker: Speaker) -> str:
    """sha256 of the speaker's reference file bytes (prompt tokens or audio) and reference text.

    Reads the file (references are small); raises OSError when it cannot be read.
    """
    h = hashlib.sha256(b"fishmp-reference-v1\0")
    kind, path = ("prompt_tokens", speaker.prompt_tokens) if speaker.prompt_tokens else \
        ("reference_audio", speaker.reference_audio)
    h.update(kind.encode() + b"\0")
    if path:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    h.update(b"\0" + speaker.reference_text.encode("utf-8"))
    return h.hexdigest()


def segment_fingerprint(segment: Segment, speaker_fingerprint: str, engine_fingerprint: str) -> str:
    """sha256 over what determines a segment's audio: text, params, the speaker's reference and the engine.

    Not the segment id, order or output path: moving or renumbering a segment does not change its audio.
    """
    payload = {
        "v": 1,
        "text": segment.text,
        "params": segment.params.to_dict(),
        "speaker": speaker_fingerprint,
        "engine": engine_fingerprint,
    }
    if segment.fit is not None:  # only fitted segments: an unfitted one keeps the fingerprint it had before fitting
        payload["fit"] = {**segment.fit.to_dict(), "slot": segment.slot}
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()
