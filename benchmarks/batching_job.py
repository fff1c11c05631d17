"""Whole jobs through `python -m fishmp generate`: FISH_BATCH_SIZE=1 vs B with mixed voices (rows of any speakers)
vs B with single-voice sessions (FISH_BATCH_MIXED=0: a session holds one speaker at a time, fishmp before mixed
voices), optionally refill off too.

    .venv/bin/python benchmarks/batching_job.py [--engine fish|synthetic] [--checkpoint DIR] [--batch 8] [--rounds 2]
        [--shapes one,guide,voices] [--no-refill]

Job shapes: one speaker x 24 segments, the user guide's 6 speakers / 46 segments (12, 10, 8, 7, 5, 4), and many
voices: 16 speakers x 2 segments. One worker, one CPU thread per run, configurations interleaved round by round
(this machine is noisy); the best round is reported, with its ratio to B=1 and to single-voice sessions. `wall` is
the whole command (process start, model load, job); `job` is from the first worker_ready event to `finished` (what
batching changes). With the Fish engine every wav is compared with B=1's: neither the batch size nor the mix of
voices may change a segment's audio (CPU float32). The take check is off (FISH_TAKE_CHECK=false): random weights
run every take to max_new_tokens, so it would retry every segment twice in every configuration alike.
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
SHAPES = {"one": "1 speaker x 24", "guide": "guide 6 speakers x 46", "voices": "16 voices x 2"}


def job_shapes(ref_dir: str, names: list[str]) -> dict[str, dict]:
    rng = np.random.default_rng(3)
    one = [("a", int(rng.integers(20, 120))) for _ in range(24)]
    guide = [(f"s{k}", int(rng.integers(20, 120))) for k, n in enumerate(GUIDE) for _ in range(n)]
    voices = [(f"v{k:02d}", int(rng.integers(20, 120))) for k in range(16) for _ in range(2)]
    shapes = {SHAPES["one"]: make_job(ref_dir, one, seed=1), SHAPES["guide"]: make_job(ref_dir, guide, seed=2),
              SHAPES["voices"]: make_job(ref_dir, voices, seed=3)}
    for job in shapes.values():
        job["params"] = {"max_new_tokens": 96, "seed": 5}
    return {SHAPES[n]: shapes[SHAPES[n]] for n in names}


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
    p.add_argument("--shapes", default="one,guide,voices", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--no-refill", action="store_true", help="also B with refill off (waves of B)")
    args = p.parse_args()
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    if not names or any(n not in SHAPES for n in names):
        p.error(f"--shapes takes {', '.join(SHAPES)}")
    tmp = tempfile.mkdtemp(prefix="fishmp-batchjob-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
    env.update(FISH_ENGINE=args.engine, FISH_CPU_WORKERS="1", FISH_MULTIPROCESS_MODE="true", FISH_DEVICES="cpu",
               FISH_TAKE_CHECK="false",
               FISH_CACHE_DIR=os.path.join(tmp, "cache"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if args.engine == "fish":
        if not os.path.isfile(os.path.join(args.checkpoint, "model.pth")):
            subprocess.run([sys.executable, "-m", "fishmp", "tiny-checkpoint", args.checkpoint], check=True, cwd=ROOT)
        env["FISH_CHECKPOINT_DIR"] = args.checkpoint
    b = str(args.batch)
    # (name, FISH_BATCH_SIZE, FISH_BATCH_REFILL, FISH_BATCH_MIXED)
    configs = [("B=1", "1", "1", "1"), (f"B={b} mixed voices", b, "1", "1"), (f"B={b} single-voice", b, "1", "0")]
    if args.no_refill:
        configs.append((f"B={b} mixed, no refill", b, "0", "1"))
    rows, identical = [], True
    print(f"load average before: {os.getloadavg()}", flush=True)
    for shape, job in job_shapes(os.path.join(tmp, "refs"), names).items():
        job_path = os.path.join(tmp, f"{len(rows)}.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        best: dict[str, dict] = {}
        for rnd in range(args.rounds):
            for name, size, refill, mixed in configs:
                out_dir = os.path.join(tmp, f"{len(rows)}-{size}-{refill}-{mixed}")
                r = run_once(job_path, out_dir, dict(env, FISH_BATCH_SIZE=size, FISH_BATCH_REFILL=refill,
                                                     FISH_BATCH_MIXED=mixed))
                print(json.dumps({"shape": shape, "config": name, "round": rnd, **r,
                                  "load": round(os.getloadavg()[0], 2)}), flush=True)
                if name not in best or r["job"] < best[name]["job"]:
                    best[name] = dict(r, out=out_dir)
        base, single = best["B=1"], best[configs[2][0]]
        for name, *_ in configs:
            r = best[name]
            rows.append([shape, name, f"{r['wall']:.2f}", f"{r['job']:.2f}", f"{r['frames'] / r['job']:.1f}",
                         f"{base['job'] / r['job']:.2f}x", f"{single['job'] / r['job']:.2f}x"])
            if args.engine == "fish":
                for seg in job["segments"]:
                    a, _ = sf.read(os.path.join(base["out"], f"{seg['id']}.wav"))
                    c, _ = sf.read(os.path.join(r["out"], f"{seg['id']}.wav"))
                    identical &= bool(np.array_equal(a, c))
    print(markdown_table(["job", "config", "wall s", "job s", "frames/s", "job vs B=1", "vs single-voice"], rows))
    print(f"load average after: {os.getloadavg()}")
    if args.engine == "fish":
        print(f"every wav identical to B=1's: {identical}")


if __name__ == "__main__":
    main()
