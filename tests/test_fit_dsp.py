"""The fit's DSP on real speech (espeak-ng, Debian): durations at 1.1x and 1.25x, pitch kept, pauses shortened
without losing a word, loudness at its target under the peak ceiling, overrun. Skipped, saying why, without
espeak-ng (scripts/setup.sh installs it where apt-get can)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fishmp.job.fitting import FitSettings
from fishmp.worker.fit import fit_line, loudness, true_peak_db
from fishmp.worker.silence import _runs, active_frames, shape

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None,
                                reason="espeak-ng is not installed (apt-get install espeak-ng; scripts/setup.sh does)")


def speak(tmp: Path, text: str, ssml: bool = False) -> tuple[np.ndarray, int]:
    path = tmp / f"speech{abs(hash(text))}.wav"
    subprocess.run(["espeak-ng", *(["-m"] if ssml else []), "-w", str(path), text], check=True, timeout=60)
    x, sr = sf.read(str(path), dtype="float32")
    return x, sr


@pytest.fixture(scope="module")
def line(tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, int]:
    return speak(tmp_path_factory.mktemp("espeak"), "The quick brown fox jumps over the lazy dog, then it rests.")


def fit_of(slot: float, **settings: object) -> dict:
    return {**FitSettings(**settings).to_dict(), "slot": slot, "raw_output": "unused.raw.wav"}


def median_f0(x: np.ndarray, sr: int) -> float:
    """Median fundamental frequency of the loud (voiced) 40 ms frames, each from its autocorrelation's peak in the
    60-400 Hz lags, refined by parabolic interpolation (librosa's pitch trackers take 25 s to JIT-compile here)."""
    n, hop = round(0.04 * sr), round(0.01 * sr)
    frames = np.lib.stride_tricks.sliding_window_view(x.astype(np.float64), n)[::hop]
    rms = np.sqrt((frames ** 2).mean(axis=1))
    lo, hi = int(sr / 400), int(sr / 60)
    f0 = []
    for frame in frames[rms > 0.3 * rms.max()]:
        frame = frame - frame.mean()
        ac = np.fft.irfft(np.abs(np.fft.rfft(frame, 2 * n)) ** 2)[: hi + 2]
        k = lo + int(np.argmax(ac[lo:hi]))
        a, b, c = ac[k - 1], ac[k], ac[k + 1]
        shift = 0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c else 0.0
        f0.append(sr / (k + shift))
    return float(np.median(f0))


@pytest.mark.parametrize("speed", [1.1, 1.25])
def test_fitted_duration_hits_the_slot(line: tuple[np.ndarray, int], speed: float) -> None:
    x, sr = line
    shaped = shape(x, sr, 0.1, 0.05, 0.3)  # what the fit stretches: the take trimmed, pauses shortened
    slot = shaped.seconds / speed
    y, rec = fit_line(x, sr, fit_of(slot))
    assert abs(len(y) / sr - slot) <= max(0.01 * slot, 0.010)
    assert rec["speed"] == pytest.approx(speed, abs=1e-3) and "overrun" not in rec
    assert rec["raw_s"] == pytest.approx(len(x) / sr, abs=1e-3) and rec["final_s"] == pytest.approx(slot, abs=1e-3)


def test_pitch_is_kept_at_125x(line: tuple[np.ndarray, int]) -> None:
    x, sr = line
    shaped = shape(x, sr, 0.1, 0.05, 0.3)
    y, rec = fit_line(x, sr, fit_of(shaped.seconds / 1.25, loudness_lufs=None))
    assert rec["speed"] == pytest.approx(1.25, abs=1e-3)
    before, after = median_f0(shaped.samples, sr), median_f0(y, sr)
    assert abs(after / before - 1) < 0.03, (before, after)


def word_energies(x: np.ndarray, sr: int) -> list[float]:
    """The energy of each word: runs of speech frames separated by at least 150 ms of silence."""
    active, frame = active_frames(x, sr)
    words, cur, gap = [], 0.0, 0
    for i, on in enumerate(active):
        if on:
            cur += float(np.sum(x[i * frame:(i + 1) * frame].astype(np.float64) ** 2))
            gap = 0
        else:
            gap += 1
            if gap == 15 and cur:
                words.append(cur)
                cur = 0.0
    return [*words, cur] if cur else words


def test_long_pauses_are_shortened_and_every_word_keeps_its_energy(tmp_path: Path) -> None:
    x, sr = speak(tmp_path, 'One. <break time="900ms"/> Two more words. <break time="800ms"/> And three.', ssml=True)
    silence = np.zeros(int(0.6 * sr), dtype=np.float32)
    x = np.concatenate([silence, x, silence])  # leading and trailing silence to trim
    shaped = shape(x, sr, 1.0, 0.05, 0.3)
    assert shaped.pauses_shortened == 2
    assert shaped.trimmed_s < len(x) / sr - 1.0 and shaped.seconds < shaped.trimmed_s - 1.0
    raw_words, kept_words = word_energies(x, sr), word_energies(shaped.samples, sr)
    assert len(raw_words) == len(kept_words) == 3
    for raw, kept in zip(raw_words, kept_words, strict=True):
        assert kept == pytest.approx(raw, rel=0.01)
    active = active_frames(shaped.samples, sr)[0]
    inner = [(b - a) * 0.01 for a, b in _runs(active) if a > 0 and b < len(active)]
    assert max(inner) <= 0.3 + 0.011  # no pause inside is longer than max_pause_s (one frame of slack)


@pytest.mark.parametrize("target", [-23.0, -16.0])
def test_loudness_reaches_its_target_under_the_ceiling(line: tuple[np.ndarray, int], target: float) -> None:
    x, sr = line
    for gain in (0.05, 1.0):  # a quiet take and a loud one end at the same loudness
        y, rec = fit_line(x * gain, sr, fit_of(10.0, loudness_lufs=target, true_peak_db=-1.0))
        assert abs(loudness(y, sr) - target) < 0.5 and rec["loudness_after"] == pytest.approx(target, abs=0.5)
        assert true_peak_db(y, sr) <= -1.0 and rec["loudness_before"] < target + 30


def test_peaks_are_limited_to_reach_a_loud_target(line: tuple[np.ndarray, int]) -> None:
    x, sr = line
    y, rec = fit_line(x, sr, fit_of(10.0, loudness_lufs=-16.0, true_peak_db=-2.0))
    assert rec["limited_db"] > 1.0 and true_peak_db(y, sr) <= -2.0 and abs(loudness(y, sr) + 16.0) < 0.5


def test_a_line_needing_more_than_the_cap_overruns_with_the_speed_it_needed(line: tuple[np.ndarray, int]) -> None:
    x, sr = line
    shaped = shape(x, sr, 0.1, 0.05, 0.3)
    y, rec = fit_line(x, sr, fit_of(shaped.seconds / 1.6))
    assert rec["overrun"]["needed_speed"] == pytest.approx(1.6, abs=0.01) and rec["speed"] == 1.25
    assert len(y) / sr == pytest.approx(shaped.seconds / 1.25, abs=0.01)  # never cut silently
    y, rec = fit_line(x, sr, fit_of(shaped.seconds / 1.6, cut=True))  # cut only when asked
    assert rec["cut"] and len(y) / sr == pytest.approx(shaped.seconds / 1.6, abs=0.001)


def test_a_short_line_is_left_alone_unless_it_may_slow_down(line: tuple[np.ndarray, int]) -> None:
    x, sr = line
    seconds = shape(x, sr, 0.1, 0.05, 0.3).seconds
    y, rec = fit_line(x, sr, fit_of(seconds * 1.5, loudness_lufs=None))
    assert rec["speed"] == 1.0 and len(y) / sr == pytest.approx(seconds, abs=0.001)
    y, rec = fit_line(x, sr, fit_of(seconds * 1.1, loudness_lufs=None, slow_down=True))
    assert rec["speed"] == pytest.approx(1 / 1.1, abs=1e-3) and len(y) / sr == pytest.approx(seconds * 1.1, abs=0.01)
