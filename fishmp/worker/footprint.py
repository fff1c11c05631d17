"""FISH_MODEL_MEMORY_GB=auto inside a worker: measure its own footprint after a warm-up segment.

NVML free memory on its GPU before the engine loads (before the CUDA context), the warm-up segment after the load
(`plan --measure`'s: a synthetic 10 s reference, fishmp/planning/warmup.py), NVML free memory again: the drop is
sent in the worker's Ready (fishmp/running/autofill.py fills the GPU with it).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..planning.gpus import nvml_free_bytes
from ..planning.warmup import NEW_TOKENS, REFERENCE_S, REFERENCE_TEXT, TEXT


def write_reference(directory: str, reference_s: float) -> str:
    """The warm-up's synthetic voice: `reference_s` seconds of speech-like audio at 44.1 kHz."""
    import soundfile as sf

    from ..engines.audio import speech_like

    ref = os.path.join(directory, "reference.wav")
    sf.write(ref, speech_like(reference_s, 44100, 140.0, seed=1), 44100)
    return ref


# ---- FISH_MODEL_MEMORY_GB=auto: a worker measures itself ------------------------------------------------------
@dataclass(frozen=True)
class Footprint:
    """What a worker measured of itself after its warm-up, sent in its Ready (FISH_MODEL_MEMORY_GB=auto)."""

    bytes: int  # NVML free-memory drop on its GPU, CUDA context included; 0: no figure (`source` says why)
    frames: int  # frames the warm-up generated (the estimate of the same work needs them)
    source: str  # "NVML", "FISH_SYNTHETIC_FOOTPRINT_GB of the synthetic engine", or why there is no figure


class FootprintProbe:
    """In a worker: `start` before the engine loads (free memory before the CUDA context), `finish(engine)` after:
    runs the warm-up segment (as `plan --measure` does) and returns the Footprint. Only under auto, in a child
    process pinned to a GPU; `start` returns None otherwise, so the worker skips the warm-up."""

    def __init__(self, pin: str, before: int | None, why: str = "") -> None:
        self.pin, self.before, self.why = pin, before, why

    @classmethod
    def start(cls, settings: Settings, pin: str | None, child: bool) -> FootprintProbe | None:
        from ..planning.plan import is_auto

        if not (child and pin and is_auto(settings)):
            return None
        try:
            return cls(pin, nvml_free_bytes(pin))
        except Exception as exc:  # noqa: BLE001 - no NVML (a simulated GPU): the engine may still have a figure
            return cls(pin, None, f"NVML unavailable ({type(exc).__name__})")

    def finish(self, engine: Any) -> Footprint:
        frames = run_warm_up(engine)
        fixed = getattr(engine, "synthetic_footprint_bytes", None)
        if fixed:
            return Footprint(int(fixed), frames, "FISH_SYNTHETIC_FOOTPRINT_GB of the synthetic engine")
        if self.before is None:
            return Footprint(0, frames, self.why)
        try:
            return Footprint(max(0, self.before - nvml_free_bytes(self.pin)), frames, "NVML")
        except Exception as exc:  # noqa: BLE001
            return Footprint(0, frames, f"NVML unavailable ({type(exc).__name__})")


def run_warm_up(engine: Any, reference_s: float = REFERENCE_S, new_tokens: int = NEW_TOKENS) -> int:
    """`plan --measure`'s warm-up segment on a loaded engine: encode the synthetic reference, synthesize TEXT.
    Returns the frames generated."""
    from ..engines import SpeakerPrompt, SynthesisParams

    seconds = min(reference_s, float(getattr(engine, "max_reference_s", reference_s)))
    with tempfile.TemporaryDirectory(prefix="fishmp-warm-up-") as tmp:
        tokens = engine.encode_reference(write_reference(tmp, seconds))
    audio = engine.synthesize(TEXT, SpeakerPrompt("fishmp-warm-up", tokens, REFERENCE_TEXT),
                              SynthesisParams(max_new_tokens=new_tokens, seed=0))
    return int(audio.tokens)
