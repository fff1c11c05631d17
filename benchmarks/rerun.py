"""What a re-run of a finished job costs: `python -m fishmp generate` on a job whose every segment is done.

    .venv/bin/python benchmarks/rerun.py [--segments 20] [--rounds 3] [--before PATH]

The real Fish Speech engine on the tiny random checkpoint (FISH_TAKE_CHECK=false, max_new_tokens 8), one CPU worker.
The job is generated once; then, interleaved over `--rounds` rounds, the wall time of the whole command for:
  nothing-left   the job again, every segment resumed (fishmp starts no worker and loads no model);
  one-left       the job again after deleting one wav (a worker starts and loads the model: what nothing-left cost
                 before fishmp skipped the workers);
  before         with --before PATH: nothing-left run with the fishmp found at PATH (an older checkout) instead.
Prints the median of each and the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(args: list[str], cwd: str, env: dict[str, str], pythonpath: str) -> float:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "fishmp", *args], cwd=cwd, env={**env, "PYTHONPATH": pythonpath},
                         capture_output=True, text=True, timeout=600)
    took = time.monotonic() - t0
    if out.returncode != 0:
        raise SystemExit(f"fishmp failed ({out.returncode}): {out.stderr[-2000:]}")
    return took


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--segments", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--before", metavar="PATH", help="a checkout whose fishmp to time nothing-left with")
    args = ap.parse_args()
    sys.path.insert(0, HERE)
    import numpy as np
    import soundfile as sf

    from fishmp.engines.tiny import write_checkpoint

    with tempfile.TemporaryDirectory(prefix="fishmp-rerun-") as tmp:
        ckpt = os.path.join(tmp, "ckpt")
        write_checkpoint(ckpt, "tiny")
        t = np.arange(44100) / 44100
        sf.write(os.path.join(tmp, "v.wav"), (0.1 * np.sin(2 * np.pi * 140 * t)).astype("float32"), 44100)
        job = {"speakers": {"v": {"reference_audio": "v.wav", "reference_text": "A voice."}},
               "segments": [{"id": f"s{i:04d}", "speaker": "v", "text": f"Line number {i}.",
                             "params": {"max_new_tokens": 8, "seed": 1}} for i in range(args.segments)]}
        with open(os.path.join(tmp, "job.json"), "w") as f:
            json.dump(job, f)
        env = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
        env.update(FISH_CHECKPOINT_DIR=ckpt, FISH_DEVICES="cpu", FISH_PRECISION="float32", FISH_TAKE_CHECK="false",
                   FISH_CACHE_DIR=os.path.join(tmp, "cache"), FISH_CPU_WORKERS="1")
        cmd = ["generate", "job.json", "-o", "out", "--progress", "none"]
        _cli(cmd, tmp, env, HERE)  # the first run does the work
        times: dict[str, list[float]] = {"nothing-left": [], "one-left": [], "before": []}
        for _ in range(args.rounds):
            times["nothing-left"].append(_cli(cmd, tmp, env, HERE))
            if args.before:
                times["before"].append(_cli(cmd, tmp, env, os.path.abspath(args.before)))
            os.unlink(os.path.join(tmp, "out", "s0000.wav"))
            times["one-left"].append(_cli(cmd, tmp, env, HERE))
        med = {k: statistics.median(v) for k, v in times.items() if v}
        for k, v in times.items():
            if v:
                print(f"{k:13s} median {med[k]:6.2f} s  ({', '.join(f'{x:.2f}' for x in v)})")
        for k in ("one-left", "before"):
            if k in med:
                print(f"nothing-left / {k}: {med['nothing-left'] / med[k]:.2f}x")


if __name__ == "__main__":
    main()
