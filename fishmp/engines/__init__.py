"""Layer 4, engines: `fish` (Fish Speech, real voice cloning) and `synthetic` (no model; a test engine for orchestration).
May import: fishmp.config, fishmp.job, fishmp.planning. The only layer that imports torch or fish_speech.

Modules: `base` (the Engine and BatchSession contracts), `fish` (the Fish Speech engine: loading, references, a
segment as a session of one row, fish-speech's own path), `fish_common` (what it shares with the batch sessions),
`batched` (batch sessions: rows of any speakers, refill, stop), `batched_model` (the batched model math),
`sampling` (counter-based sampling), `prefix_cache` (speaker prefixes' KV, kept per worker), `codec` (codes to audio,
on a thread of its own), `batched_compile` (FISH_COMPILE's compiled steps), `synthetic` (the test engine), `tiny`
(random checkpoints), `audio` (reading references; a speech-like test signal).
"""

from __future__ import annotations

import os

from ..config import Settings
from .base import (
    Audio,
    BadReferenceError,
    BatchSession,
    Engine,
    EngineError,
    EngineOutOfMemoryError,
    SequentialSession,
    SpeakerPrompt,
    SynthesisParams,
    TextTooLongError,
)

__all__ = [
    "Audio", "BadReferenceError", "BatchSession", "Engine", "EngineError", "EngineOutOfMemoryError",
    "SequentialSession", "SpeakerPrompt", "SynthesisParams", "TextTooLongError", "create_engine",
]


def torch_device_for(pin: str) -> str:
    """The torch device of the GPU pinned as `pin` (an NVML UUID or index) when the worker cannot narrow
    CUDA_VISIBLE_DEVICES (in-process mode): torch numbers GPUs in its own order, so match by UUID."""
    import torch

    if pin.isdigit():
        return f"cuda:{pin}"
    want = pin.removeprefix("GPU-").lower()
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid).lower().removeprefix("gpu-") == want:
            return f"cuda:{i}"
    raise EngineError(f"GPU {pin} is not visible to torch (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')})")


def create_engine(settings: Settings, device: str) -> Engine:
    """Build (not load) the engine named by settings.engine for `device` ('cpu' or 'cuda:0' after pinning)."""
    if settings.engine == "synthetic":
        from .synthetic import SyntheticEngine

        return SyntheticEngine(settings, device)
    from .fish import FishSpeechEngine

    return FishSpeechEngine(settings, device)
