"""The fit on a film-like job: how many lines fit their slots within the cap, the speeds applied, with and without the
fit-aware take choice, and what the fit costs next to the decode (docs/dubbing.md quotes the output).

Synthetic engine (`--lines`, default 300): lines of 10-84 characters (two subtitle rows), three speakers, one after
another with short gaps like an SRT's cues. The slot of each line is its natural length divided by r, r drawn
log-normally around 0.97 (sigma 0.2): most lines fit as they are, about a fifth need a speed-up, some more than the
cap. Autoregressive takes vary in length from seed to seed; the synthetic engine does not, so each line carries
`@@pace:...@@` factors drawn log-normally (sigma 0.12) for seeds 0-3: a model of that variation, said as such.

Tiny checkpoint (`--tiny N`, default 16 lines): the real Fish Speech code path on a random ~10 MB model (CPU,
float32); its takes run to max_new_tokens (no end token), so only the cost is measured: the fit's ms per second of
audio against the decode's. The take check is off there (every tiny take fails it).

    .venv/bin/python benchmarks/fit.py [--lines 300] [--tiny 16]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("where were you last night i waited for hours and nobody called me back the door was open so i came in "
         "tell me what happened before the train left we have to go now they are coming").split()


def _voice(path: Path, freq: float) -> None:
    import soundfile as sf

    t = np.arange(16000) / 16000
    sf.write(str(path), (0.2 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000)


def _line(rng: np.random.Generator) -> str:
    target = int(rng.integers(10, 85))
    words: list[str] = []
    while len(" ".join(words)) < target:
        words.append(str(rng.choice(WORDS)))
    return " ".join(words).capitalize() + "."


def film(tmp: Path, lines: int, seed: int = 7, paced: bool = True, seconds_per_char: float = 0.06) -> dict:
    rng = np.random.default_rng(seed)
    speakers = {}
    for i, name in enumerate(("anna", "bob", "carl")):
        _voice(tmp / f"{name}.wav", 140.0 + 60 * i)
        speakers[name] = {"reference_audio": f"{name}.wav", "reference_text": f"I am {name}."}
    segments, at = [], 1.0
    for i in range(lines):
        text = _line(rng)
        natural = len(text) * seconds_per_char
        slot = natural / float(np.exp(rng.normal(np.log(0.97), 0.2)))
        if paced:
            factors = np.exp(rng.normal(0.0, 0.12, size=4))
            text = f"@@pace:{'/'.join(f'{f:.3f}' for f in factors)}@@ {text}"
        segments.append({"id": f"{i + 1:04d}", "speaker": ("anna", "bob", "carl")[i % 3], "text": text,
                         "start": round(at, 3), "end": round(at + slot, 3)})
        at += slot + float(rng.uniform(0.2, 1.5))
    return {"speakers": speakers, "segments": segments}


def run(tmp: Path, job: dict, name: str, env: dict[str, str]) -> tuple[dict, float]:
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(job))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "fishmp", "generate", str(path), "-o", str(tmp / name)], cwd=tmp,
                         env={**os.environ, "PYTHONPATH": str(ROOT), **env}, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if res.returncode not in (0, 4):
        sys.exit(f"{name}: exit {res.returncode}\n{res.stderr[-3000:]}")
    with open(tmp / name / "manifest.json") as f:
        return json.load(f), wall


def summary(manifest: dict, wall: float) -> dict:
    recs = [r for r in manifest["segments"].values() if r.get("fit")]
    fits = [r["fit"] for r in recs]
    speeds = np.array([f["speed"] for f in fits])
    raw = sum(f["raw_s"] for f in fits)
    return {"lines": len(fits), "fit": sum(1 for f in fits if "overrun" not in f) / len(fits),
            "sped_up": float(np.mean(speeds > 1.0)), "mean_speed": float(speeds.mean()),
            "mean_speed_up": float(speeds[speeds > 1.0].mean()) if (speeds > 1.0).any() else 1.0,
            "max_speed": float(speeds.max()),
            "max_needed": max(f.get("overrun", {}).get("needed_speed", f["speed_needed"]) for f in fits),
            "takes": float(np.mean([len(r.get("takes") or [1]) for r in recs])),
            "fit_ms_per_s": sum(f["fit_ms"] for f in fits) / raw,
            "decode_ms_per_s": sum(r["synthesis_seconds"] for r in recs) * 1000 / raw, "wall": wall,
            "overlaps": len(manifest.get("summary", {}).get("track", {}).get("overlaps", []))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=300)
    ap.add_argument("--tiny", type=int, default=16)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fishmp-fit-"))
    env = {"FISH_ENGINE": "synthetic", "FISH_CPU_WORKERS": "2", "FISH_MULTIPROCESS_MODE": "true",
           "FISH_BATCH_SIZE": "4", "FISH_SYNTHETIC_SECONDS_PER_CHAR": "0.0005", "FISH_SYNTHETIC_LOAD_S": "0.2",
           "FISH_CACHE_DIR": str(tmp / "cache")}
    rows = []
    for choose in (True, False):
        job = film(tmp, args.lines)
        job["fit"] = {"choose_take": choose}
        rows.append((f"synthetic, take choice {'on' if choose else 'off'}",
                     summary(*run(tmp, job, f"synthetic-{choose}", env))))
    if args.tiny:
        from fishmp.engines.tiny import write_checkpoint

        ckpt = tmp / "tiny"
        write_checkpoint(str(ckpt), "tiny")
        job = film(tmp, args.tiny, paced=False, seconds_per_char=2.0 / 40)
        job["params"] = {"max_new_tokens": 48, "seed": 1}
        tiny_env = {"FISH_ENGINE": "fish", "FISH_CHECKPOINT_DIR": str(ckpt), "FISH_CPU_WORKERS": "1",
                    "FISH_MULTIPROCESS_MODE": "true", "FISH_PRECISION": "float32", "FISH_TAKE_CHECK": "false",
                    "FISH_CACHE_DIR": str(tmp / "cache")}
        rows.append(("tiny checkpoint (CPU), take check off", summary(*run(tmp, job, "tiny", tiny_env))))
    print(f"lines: {args.lines} synthetic (2 CPU workers, batch 4), {args.tiny} tiny; max_speed 1.25 (default)\n")
    print("| run | lines | fit within cap | sped up | mean speed-up | max speed | max needed | takes per line "
          "| fit ms per s audio | decode ms per s audio | wall s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, s in rows:
        print(f"| {name} | {s['lines']} | {s['fit']:.1%} | {s['sped_up']:.1%} | {s['mean_speed_up']:.3f} "
              f"| {s['max_speed']:.3f} | {s['max_needed']:.2f} | {s['takes']:.2f} | {s['fit_ms_per_s']:.1f} "
              f"| {s['decode_ms_per_s']:.1f} | {s['wall']:.1f} |")


if __name__ == "__main__":
    main()
