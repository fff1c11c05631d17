"""Compare time-stretchers for the fit on real speech (espeak-ng): Signalsmith Stretch (python-stretch, MIT,
in-process) against Rubber Band (pyrubberband driving Debian's `rubberband` command, GPL, one process per line).

For each speed (1.1, 1.25, 1.5) and each of a few lines (two voices): time per second of input audio, the output's
duration error against len / speed, and its median F0 against the input's (autocorrelation on the loud frames, as
tests/test_fit_dsp.py measures it). Prints a Markdown table (docs/dubbing.md quotes it).

    .venv/bin/python benchmarks/stretchers.py
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from fishmp.worker.fit import stretch  # noqa: E402

LINES = [("en", "The quick brown fox jumps over the lazy dog, then it rests under the old oak tree."),
         ("en+f3", "Where were you last night? I waited for hours, and nobody called me back."),
         ("de", "Ich habe dich gestern Abend überall gesucht, aber niemand wusste, wo du warst.")]
SPEEDS = (1.1, 1.25, 1.5)


def median_f0(x: np.ndarray, sr: int) -> float:
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
        f0.append(sr / (k + (0.5 * (a - c) / (a - 2 * b + c) if a - 2 * b + c else 0.0)))
    return float(np.median(f0))


def rubberband(x: np.ndarray, sr: int, speed: float) -> np.ndarray:
    import pyrubberband

    return pyrubberband.time_stretch(x, sr, speed)


def main() -> None:
    if not shutil.which("espeak-ng") or not shutil.which("rubberband"):
        sys.exit("needs espeak-ng and rubberband (apt-get install espeak-ng rubberband-cli)")
    tmp = Path(tempfile.mkdtemp())
    speech = []
    for i, (voice, text) in enumerate(LINES):
        path = tmp / f"{i}.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-w", str(path), text], check=True)
        x, sr = sf.read(str(path), dtype="float32")
        speech.append((x, sr))
    total = sum(len(x) / sr for x, sr in speech)
    rows = []
    for name, fn in (("Signalsmith (python-stretch)", stretch), ("Rubber Band (pyrubberband + CLI)", rubberband)):
        fn(speech[0][0], speech[0][1], 1.25)  # warm-up (imports)
        for speed in SPEEDS:
            t0, errs, pitch = time.perf_counter(), [], []
            for x, sr in speech:
                y = fn(x, sr, speed)
                errs.append(abs(len(y) / sr - len(x) / sr / speed) * 1000)
                pitch.append(median_f0(y, sr) / median_f0(x, sr) - 1)
            elapsed = time.perf_counter() - t0
            rows.append((name, speed, elapsed / total * 1000, max(errs), max(abs(p) for p in pitch) * 100))
    print(f"{len(LINES)} espeak-ng lines, {total:.1f} s of speech at {speech[0][1]} Hz, one core\n")
    print("| stretcher | speed | ms per s of audio | max duration error ms | max F0 change % |")
    print("|---|---|---|---|---|")
    for name, speed, ms, err, f0 in rows:
        print(f"| {name} | {speed} | {ms:.1f} | {err:.1f} | {f0:.2f} |")


if __name__ == "__main__":
    main()
