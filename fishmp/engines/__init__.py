"""Engines: `fish` (Fish Speech, real voice cloning) and `synthetic` (no model; a test engine for orchestration)."""

from __future__ import annotations

from ..config import Settings
from .base import (
    Audio,
    BadReferenceError,
    Engine,
    EngineError,
    EngineOutOfMemoryError,
    SpeakerPrompt,
    SynthesisParams,
    TextTooLongError,
)

__all__ = [
    "Audio", "BadReferenceError", "Engine", "EngineError", "EngineOutOfMemoryError", "SpeakerPrompt",
    "SynthesisParams", "TextTooLongError", "create_engine",
]


def create_engine(settings: Settings, device: str) -> Engine:
    """Build (not load) the engine named by settings.engine for `device` ('cpu' or 'cuda:0' after pinning)."""
    if settings.engine == "synthetic":
        from .synthetic import SyntheticEngine

        return SyntheticEngine(settings, device)
    from .fish import FishSpeechEngine

    return FishSpeechEngine(settings, device)
