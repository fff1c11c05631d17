"""Silence in a take, found by energy: trim the ends, shorten long pauses. Pure numpy (no torch, no processes).

Why energy and not a VAD model (silero-vad): a take is clean synthesized speech with no background, so its pauses are
near digital silence and a frame's energy separates them reliably; an energy pass costs microseconds per second of
audio, where silero would put a model and torch on the writer thread of every worker. The threshold is relative to the
take's loudest frame (`SILENCE_DB` below it), so quiet and loud voices are cut alike, with an absolute floor for
takes that are nearly silent throughout. Speech is never cut: only frames below the threshold are removed, and
`pad_s` / half of `max_pause_s` of silence stay on each side of every word.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FRAME_S = 0.01  # 10 ms analysis frames
SILENCE_DB = 40.0  # a frame this far below the loudest frame is silence
FLOOR_RMS = 1e-4  # and always below this (about -80 dBFS)
XFADE_S = 0.004  # joins inside a shortened pause are crossfaded over this long (no click)


@dataclass(frozen=True)
class Shaped:
    """A take after trimming and pause shortening, with the durations the manifest records."""

    samples: np.ndarray
    raw_s: float
    trimmed_s: float  # after the ends were trimmed
    pauses_shortened: int  # pauses longer than max_pause_s that were shortened
    rate: int

    @property
    def seconds(self) -> float:
        return len(self.samples) / self.rate


def active_frames(x: np.ndarray, sr: int) -> tuple[np.ndarray, int]:
    """(one bool per FRAME_S frame: speech, frame length in samples)."""
    frame = max(1, round(FRAME_S * sr))
    n = -(-len(x) // frame)
    padded = np.zeros(n * frame, dtype=np.float64)
    padded[: len(x)] = np.nan_to_num(np.asarray(x, dtype=np.float64))
    rms = np.sqrt(np.mean(padded.reshape(n, frame) ** 2, axis=1)) if n else np.zeros(0)
    if not n:
        return rms > 0, frame
    level = max(FLOOR_RMS, float(rms.max()) * 10 ** (-SILENCE_DB / 20))
    return rms >= level, frame


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of False (silence) in `mask`."""
    edges = np.diff(np.concatenate([[1], mask.astype(np.int8), [1]]))
    return list(zip(np.flatnonzero(edges == -1).tolist(), np.flatnonzero(edges == 1).tolist(), strict=True))


def trim(x: np.ndarray, sr: int, pad_s: float) -> np.ndarray:
    """`x` without its leading and trailing silence beyond `pad_s` seconds (unchanged when it has no speech)."""
    active, frame = active_frames(x, sr)
    idx = np.flatnonzero(active)
    if not idx.size:
        return x
    pad = round(pad_s * sr)
    first, last = idx[0] * frame, min(len(x), (idx[-1] + 1) * frame)
    return x[max(0, first - pad): min(len(x), last + pad)]


def shorten_pauses(x: np.ndarray, sr: int, max_pause_s: float) -> tuple[np.ndarray, int]:
    """`x` with every pause between words longer than `max_pause_s` shortened to it (the middle of the pause is
    removed, the joint crossfaded), and how many were shortened. The ends are left alone (see `trim`)."""
    active, frame = active_frames(x, sr)
    keep = round(max_pause_s * sr)
    pieces: list[np.ndarray] = []
    at, shortened = 0, 0
    for a, b in _runs(active):
        if a == 0 or b == len(active):
            continue  # leading or trailing silence
        start, end = a * frame, min(len(x), b * frame)
        if end - start <= keep:
            continue
        cut_from, cut_to = start + keep // 2, end - (keep - keep // 2)
        pieces.append(x[at:cut_from])
        at = cut_to
        shortened += 1
    if not shortened:
        return x, 0
    pieces.append(x[at:])
    return _join(pieces, round(XFADE_S * sr)), shortened


def _join(pieces: list[np.ndarray], fade: int) -> np.ndarray:
    out = pieces[0].astype(np.float32, copy=True)
    for piece in pieces[1:]:
        n = min(fade, len(out), len(piece))
        if n:
            ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
            joint = out[len(out) - n:] * (1 - ramp) + piece[:n] * ramp
            out = np.concatenate([out[: len(out) - n], joint, piece[n:]])
        else:
            out = np.concatenate([out, piece])
    return out


def shape(x: np.ndarray, sr: int, slot_s: float, pad_s: float, max_pause_s: float) -> Shaped:
    """Steps 1 and 2 of the fit: trim the ends; if still over the slot, shorten the long pauses."""
    raw_s = len(x) / sr
    y = trim(np.asarray(x, dtype=np.float32), sr, pad_s)
    trimmed_s = len(y) / sr
    n = 0
    if trimmed_s > slot_s:
        y, n = shorten_pauses(y, sr, max_pause_s)
    return Shaped(y, raw_s, trimmed_s, n, sr)
