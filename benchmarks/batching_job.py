"""Whole jobs through `python -m fishmp generate`: FISH_BATCH_SIZE=1 (fishmp before batching) vs B, refill on / off.

    .venv/bin/python benchmarks/batching_job.py [--engine fish|synthetic] [--checkpoint DIR] [--batch 8] [--rounds 2]

Two job shapes: one speaker x 24 segments, and the user guide's 6 speakers / 46 segments (12, 10, 8, 7, 5, 4). One
worker, one CPU thread per run, configurations interleaved round by round (this machine is noisy); the best round is
reported. `wall` is the whole command (process start, model load, job); `job` is from the first worker_ready event to
`finished` (what batching changes). With the Fish engine every wav of B is compared with B=1's: batching must not
change a segment's audio (CPU float32).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import soundfile as sf
from common import ROOT, make_job, markdown_table

GUIDE = [12, 10, 8, 7, 5, 4]  # segments per speaker in the user guide's 6-speaker / 46-segment job


def job_shapes(ref_dir: str) -> dict[str, dict]:
    rng = np.random.default_rng(3)
    one = [("a", int(rng.integers(20, 120))) for _ in range(24)]
    guide = [(f"s{k}", int(rng.integers(20, 120))) for k, n in enumerate(GUIDE) for _ in range(n)]
    shapes = {"1 speaker x 24": make_job(ref_dir, one, seed=1), "guide 6 speakers x 46": make_job(ref_dir, guide, seed=2)}
    for job in shapes.values():
        job["params"] = {"max_new_tokens": 96, "seed": 5}
    return shapes


def run_once(job_path: str, out_dir: str, env: dict[str, str]) -> dict:
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "fishmp", "generate", job_path, "-o", out_dir, "--progress", "jsonl",
                          "--no-resume"], env=env, capture_output=True, text=True, cwd=ROOT)
    wall = time.monotonic() - t0
    events = [json.loads(line) for line in out.stdout.splitlines()[:-1]]
    done = [e for e in events if e["event"] == "segment_done"]
    finished = events[-1]
    if out.returncode != 0 or finished.get("failed"):
        raise SystemExit(f"run failed ({out.returncode}): {out.stderr[-2000:]}")
    ready = min(e["time"] for e in events if e["event"] == "worker_ready")
    return {"wall": wall, "job": finished["time"] - ready, "frames": sum(e.get("tokens") or 0 for e in done),
            "segments": len(done)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("fish", "synthetic"), default="fish")
    p.add_argument("--checkpoint", default="/tmp/fishmp-bench-tiny", help="written with tiny-checkpoint if missing")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    tmp = tempfile.mkdtemp(prefix="fishmp-batchjob-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
    env.update(FISH_ENGINE=args.engine, FISH_CPU_WORKERS="1", FISH_MULTIPROCESS_MODE="true", FISH_DEVICES="cpu",
               FISH_CACHE_DIR=os.path.join(tmp, "cache"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if args.engine == "fish":
        if not os.path.isfile(os.path.join(args.checkpoint, "model.pth")):
            subprocess.run([sys.executable, "-m", "fishmp", "tiny-checkpoint", args.checkpoint], check=True, cwd=ROOT)
        env["FISH_CHECKPOINT_DIR"] = args.checkpoint
    configs = [("B=1", "1", "1"), (f"B={args.batch} refill", str(args.batch), "1"),
               (f"B={args.batch} no refill", str(args.batch), "0")]
    rows, identical = [], True
    for shape, job in job_shapes(os.path.join(tmp, "refs")).items():
        job_path = os.path.join(tmp, f"{len(rows)}.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        best: dict[str, dict] = {}
        for rnd in range(args.rounds):
            for name, b, refill in configs:
                out_dir = os.path.join(tmp, f"{len(rows)}-{b}-{refill}")
                r = run_once(job_path, out_dir, dict(env, FISH_BATCH_SIZE=b, FISH_BATCH_REFILL=refill))
                print(json.dumps({"shape": shape, "config": name, "round": rnd, **r}), flush=True)
                if name not in best or r["job"] < best[name]["job"]:
                    best[name] = dict(r, out=out_dir)
        base = best["B=1"]
        for name, _, _ in configs:
            r = best[name]
            rows.append([shape, name, f"{r['wall']:.2f}", f"{r['job']:.2f}", f"{r['frames'] / r['job']:.1f}",
                         f"{base['job'] / r['job']:.2f}x"])
            if args.engine == "fish":
                for seg in job["segments"]:
                    a, _ = sf.read(os.path.join(base["out"], f"{seg['id']}.wav"))
                    c, _ = sf.read(os.path.join(r["out"], f"{seg['id']}.wav"))
                    identical &= bool(np.array_equal(a, c))
    print(markdown_table(["job", "config", "wall s", "job s", "frames/s", "job vs B=1"], rows))
    if args.engine == "fish":
        print(f"every wav identical to B=1's: {identical}")


if __name__ == "__main__":
    main()
