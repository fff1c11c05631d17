"""The fit of one line into its subtitle slot, run by the worker's writer thread (off the decode loop): trim, shorten
pauses, time-stretch, normalise loudness. numpy plus well-kept libraries, no torch.

- Time-stretch: Signalsmith Stretch (python-stretch, MIT), pitch-preserving, in-process. Rubber Band (the `rubberband`
  command, GPL, a separate process) was compared on espeak-ng speech at 1.1/1.25/1.5x (docs/dubbing.md): both keep
  pitch and duration; Signalsmith needs no process per line and no GPL tool, and was faster.
- Loudness: pyloudnorm (ITU-R BS.1770-4 integrated loudness, EBU R128 gating); the true peak is read on a 4x
  oversampled copy (soxr), and the gain is lowered so that it stays under the ceiling.
The policy (which speed, when a line overruns) is fishmp/job/fitting.py; silence is fishmp/worker/silence.py.
"""

from __future__ import annotations

import math
import time
from typing import Any

import numpy as np

from ..job.fitting import applied_speed, settings_from, wanted_speed
from .silence import shape

BLOCK_S = 0.4  # BS.1770's gating block: shorter lines are measured padded with silence to one block
CUT_FADE_S = 0.05  # the fade-out of a line cut at its slot (fit.cut)


def stretch(x: np.ndarray, sr: int, speed: float) -> np.ndarray:
    """`x` played `speed` times faster at the same pitch (Signalsmith Stretch; seeded: the same input gives the
    same output)."""
    from python_stretch.Signalsmith import Stretch

    s = Stretch(0)
    s.preset(1, float(sr))
    s.setTimeFactor(float(speed))
    return np.asarray(s.process(np.ascontiguousarray(x, dtype=np.float32)[None, :])[0], dtype=np.float32)


def to_length(x: np.ndarray, n: int) -> np.ndarray:
    """Exactly n samples: the stretcher's last few samples (silence pad) cut, or silence added."""
    if len(x) >= n:
        return x[:n]
    return np.concatenate([x, np.zeros(n - len(x), dtype=x.dtype)])


def loudness(x: np.ndarray, sr: int) -> float:
    """Integrated loudness in LUFS (-inf for silence)."""
    import pyloudnorm

    n = max(len(x), math.ceil(BLOCK_S * sr) + 1)
    padded = np.zeros(n, dtype=np.float64)
    padded[: len(x)] = x
    with np.errstate(divide="ignore"):
        return float(pyloudnorm.Meter(sr).integrated_loudness(padded))


def true_peak_db(x: np.ndarray, sr: int) -> float:
    """The true peak in dBTP: the sample peak of a 4x oversampled copy (BS.1770's method)."""
    import soxr

    if not len(x):
        return -math.inf
    up = soxr.resample(np.asarray(x, dtype=np.float64), sr, sr * 4)
    peak = float(np.max(np.abs(up))) if len(up) else 0.0
    return 20 * math.log10(peak) if peak > 0 else -math.inf


def limit(x: np.ndarray, sr: int, ceiling_db: float) -> tuple[np.ndarray, float]:
    """`x` with its true peaks brought under `ceiling_db` by a smooth gain (5 ms attack and release around each peak;
    no library at hand limits: pyloudnorm measures only, pedalboard's limiter is GPL). The gain curve is a minimum
    filter of the gain each sample needs, averaged over half its width, so it never exceeds what a peak needs.
    Returns (limited samples, the deepest gain reduction in dB)."""
    import soxr
    from scipy.ndimage import minimum_filter1d, uniform_filter1d

    ceiling = 10 ** (ceiling_db / 20)
    up = np.abs(soxr.resample(np.asarray(x, dtype=np.float64), sr, sr * 4))
    env = np.zeros(len(x))
    n = min(len(x), len(up) // 4)
    env[:n] = up[: n * 4].reshape(n, 4).max(axis=1)
    env = np.maximum(env, np.abs(x))
    need = np.minimum(1.0, ceiling / np.maximum(env, 1e-12))
    w = max(1, round(0.005 * sr))
    gain = uniform_filter1d(minimum_filter1d(need, 2 * w + 1, mode="nearest"), w + 1, mode="nearest")
    return (x * gain).astype(np.float32), round(-20 * math.log10(max(float(gain.min()), 1e-12)), 2)


def normalise(x: np.ndarray, sr: int, target_lufs: float, ceiling_db: float) -> tuple[np.ndarray, dict[str, Any]]:
    """Gain to `target_lufs`; where that would put a true peak over `ceiling_db`, the peaks are limited (and the gain
    made up, a few rounds, so the line still reaches its loudness). Silence is left alone."""
    before = loudness(x, sr)
    if not math.isfinite(before):
        return x, {"loudness_before": None, "loudness_after": None, "gain_db": 0.0}
    gain, reduced = target_lufs - before, 0.0
    margin = 0.1  # under the ceiling: the written 16-bit samples round, the limiter's curve is measured 4x
    for _ in range(6):
        y = (x * 10 ** (gain / 20)).astype(np.float32)
        if true_peak_db(y, sr) <= ceiling_db - margin:
            break
        y, reduced = limit(y, sr, ceiling_db - margin)
        after = loudness(y, sr)
        if abs(after - target_lufs) < 0.1:
            break
        gain += target_lufs - after
    peak = true_peak_db(y, sr)
    if peak > ceiling_db - margin / 2:  # the limiter's last rounding: never over the ceiling
        y = (y * 10 ** ((ceiling_db - margin - peak) / 20)).astype(np.float32)
    out = {"loudness_before": round(before, 2), "loudness_after": round(loudness(y, sr), 2), "gain_db": round(gain, 2),
           "true_peak_db": round(true_peak_db(y, sr), 2)}
    if reduced:
        out["limited_db"] = reduced  # the deepest gain reduction of the peak limiter
    return y, out


def fit_line(x: np.ndarray, sr: int, fit: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """Fit one take to `fit["slot"]` seconds: (the fitted samples, the record the manifest keeps). A line that needs
    more than max_speed is stretched by max_speed and marked `overrun` with the speed it would have needed (cut at
    the slot with a fade only when `cut` is set)."""
    settings, slot = settings_from(fit), float(fit["slot"])
    shaped = shape(x, sr, slot, settings.pad_s, settings.max_pause_s)
    y, seconds = shaped.samples, shaped.seconds
    need = wanted_speed(seconds, slot, settings)
    speed = applied_speed(need, settings)
    if speed != 1.0:
        target = round(slot * sr) if speed == need else round(len(y) / speed)
        y = to_length(stretch(y, sr, speed), target)
    record: dict[str, Any] = {"slot_s": round(slot, 3), "raw_s": round(shaped.raw_s, 3),
                              "trimmed_s": round(shaped.trimmed_s, 3), "shortened_s": round(seconds, 3),
                              "pauses_shortened": shaped.pauses_shortened, "speed": round(speed, 4),
                              "speed_needed": round(seconds / slot, 4)}
    if need > settings.max_speed:
        record["overrun"] = {"needed_speed": round(need, 3), "over_s": round(len(y) / sr - slot, 3)}
        if settings.cut:
            n, fade = round(slot * sr), round(CUT_FADE_S * sr)
            y = y[:n].copy()
            y[max(0, n - fade):] *= np.linspace(1.0, 0.0, min(fade, n), dtype=np.float32)
            record["cut"] = True
    if settings.loudness_lufs is not None:
        y, levels = normalise(y, sr, settings.loudness_lufs, settings.true_peak_db)
        record.update(levels)
    record["final_s"] = round(len(y) / sr, 3)
    return y, record


def fit_take(samples: np.ndarray, sr: int, fit: dict[str, Any]) -> tuple[np.ndarray, dict[str, Any]]:
    """The writer's step for a fitted segment: keep the raw take at fit["raw_output"] (written atomically, for review
    and for a later refit), then fit it. Returns (fitted samples, the record with `raw` and `fit_ms`)."""
    from .files import write_wav

    t0 = time.perf_counter()
    write_wav(fit["raw_output"], samples, sr)
    fitted, record = fit_line(np.asarray(samples, dtype=np.float32), sr, fit)
    record["raw"] = fit["raw_output"]
    record["fit_ms"] = round((time.perf_counter() - t0) * 1000, 1)
    return fitted, record
