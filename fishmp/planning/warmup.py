"""The warm-up segment `plan --measure` and FISH_MODEL_MEMORY_GB=auto run, and the estimate of the same work (pure).

A synthetic 10 s reference voice (fishmp/worker/footprint.py writes it) and one fixed sentence decoded for up to
NEW_TOKENS frames: the memory estimate (fishmp/planning/memory.py) is computed for exactly this work, so a measured
footprint and its estimate can be compared.
"""

from __future__ import annotations

from .memory import Workload

REFERENCE_S = 10.0


TEXT = "The quick brown fox jumps over the lazy dog while the orchestra tunes its instruments."


NEW_TOKENS = 200  # S1-mini decodes ~15 frames/s eager on a big GPU: a warm-up of about 15 s


REFERENCE_TEXT = "A synthetic reference voice."


def warm_up_workload(frames: int, reference_s: float = REFERENCE_S) -> Workload:
    """What the warm-up segment asks of a worker, for the estimate of the same work."""
    prompt = int(reference_s * 44100 / 2048) + 1 + len(TEXT) + 64 + len(REFERENCE_TEXT)
    return Workload(reference_s=reference_s, prompt_tokens=prompt, new_tokens=max(frames, 1))
