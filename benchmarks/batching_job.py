"""Whole jobs through `python -m fishmp generate`: FISH_BATCH_SIZE=1 vs B with mixed voices (rows of any speakers)
vs B with single-voice sessions (FISH_BATCH_MIXED=0: a session holds one speaker at a time, fishmp before mixed
voices), optionally refill off too.

    .venv/bin/python benchmarks/batching_job.py [--engine fish|synthetic] [--checkpoint DIR] [--batch 8] [--rounds 2]
        [--shapes one,guide,voices] [--no-refill] [--frames 96] [--before DIR]

--before DIR: also run each configuration with another checkout's fishmp (e.g. `git worktree add /tmp/before
5e9d049`), interleaved with this one's (A B A B), and report this checkout's job time against it per round (the
median of the rounds' ratios, and their range): on a shared, noisy machine only interleaved ratios mean anything.

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


def job_shapes(ref_dir: str, names: list[str], frames: int = 96) -> dict[str, dict]:
    rng = np.random.default_rng(3)
    one = [("a", int(rng.integers(20, 120))) for _ in range(24)]
    guide = [(f"s{k}", int(rng.integers(20, 120))) for k, n in enumerate(GUIDE) for _ in range(n)]
    voices = [(f"v{k:02d}", int(rng.integers(20, 120))) for k in range(16) for _ in range(2)]
    shapes = {SHAPES["one"]: make_job(ref_dir, one, seed=1), SHAPES["guide"]: make_job(ref_dir, guide, seed=2),
              SHAPES["voices"]: make_job(ref_dir, voices, seed=3)}
    for job in shapes.values():
        job["params"] = {"max_new_tokens": frames, "seed": 5}
    return {SHAPES[n]: shapes[SHAPES[n]] for n in names}


def run_once(job_path: str, out_dir: str, env: dict[str, str], root: str = ROOT) -> dict:
    """One job through `root`'s fishmp (cwd and PYTHONPATH: `-m` imports from the cwd first)."""
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "fishmp", "generate", job_path, "-o", out_dir, "--progress", "jsonl",
                          "--no-resume"], env=dict(env, PYTHONPATH=root), capture_output=True, text=True, cwd=root)
    wall = time.monotonic() - t0
    events = [json.loads(line) for line in out.stdout.splitlines()[:-1]]
    done = [e for e in events if e["event"] == "segment_done"]
    finished = events[-1]
    if out.returncode != 0 or finished.get("failed"):
        raise SystemExit(f"run failed ({out.returncode}): {out.stderr[-2000:]}")
    ready = min(e["time"] for e in events if e["event"] == "worker_ready")
    return {"wall": wall, "job": finished["time"] - ready, "frames": sum(e.get("tokens") or 0 for e in done),
            "segments": len(done)}


def ratio_text(ratios: list[float]) -> str:
    """Per-round ratios as 'median (min-max)'."""
    if not ratios:
        return ""
    return f"{float(np.median(ratios)):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", choices=("fish", "synthetic"), default="fish")
    p.add_argument("--checkpoint", default="/tmp/fishmp-bench-tiny", help="written with tiny-checkpoint if missing")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--shapes", default="one,guide,voices", help="comma-separated: " + ", ".join(SHAPES))
    p.add_argument("--no-refill", action="store_true", help="also B with refill off (waves of B)")
    p.add_argument("--frames", type=int, default=96, help="max_new_tokens of every segment (default 96)")
    p.add_argument("--before", metavar="DIR", help="another checkout of fishmp to run interleaved with this one")
    args = p.parse_args()
    names = [n.strip() for n in args.shapes.split(",") if n.strip()]
    if not names or any(n not in SHAPES for n in names):
        p.error(f"--shapes takes {', '.join(SHAPES)}")
    if args.before and not os.path.isfile(os.path.join(args.before, "fishmp", "__init__.py")):
        p.error(f"--before {args.before}: no fishmp/__init__.py there")
    tmp = tempfile.mkdtemp(prefix="fishmp-batchjob-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
    env.update(FISH_ENGINE=args.engine, FISH_CPU_WORKERS="1", FISH_MULTIPROCESS_MODE="true", FISH_DEVICES="cpu",
               FISH_TAKE_CHECK="false",
               FISH_CACHE_DIR=os.path.join(tmp, "cache"), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    if args.engine == "fish":
        if not os.path.isfile(os.path.join(args.checkpoint, "model.pth")):
            subprocess.run([sys.executable, "-m", "fishmp", "tiny-checkpoint", args.checkpoint], check=True, cwd=ROOT,
                           env=dict(env, PYTHONPATH=ROOT))
        env["FISH_CHECKPOINT_DIR"] = args.checkpoint
    b = str(args.batch)
    # (name, FISH_BATCH_SIZE, FISH_BATCH_REFILL, FISH_BATCH_MIXED, checkout)
    configs = [("B=1", "1", "1", "1", ROOT), (f"B={b} mixed voices", b, "1", "1", ROOT)]
    if args.before:  # the old checkout has no mixed voices: its B is single-voice sessions
        configs = [("before B=1", "1", "1", "1", args.before), configs[0],
                   (f"before B={b}", b, "1", "1", args.before), configs[1]]
    else:
        configs.append((f"B={b} single-voice", b, "1", "0", ROOT))
    if args.no_refill:
        configs.append((f"B={b} mixed, no refill", b, "0", "1", ROOT))
    rows, identical = [], True
    print(f"load average before: {os.getloadavg()}", flush=True)
    for shape, job in job_shapes(os.path.join(tmp, "refs"), names, args.frames).items():
        job_path = os.path.join(tmp, f"{len(rows)}.json")
        with open(job_path, "w") as f:
            json.dump(job, f)
        best: dict[str, dict] = {}
        runs: dict[str, list[float]] = {}
        for rnd in range(args.rounds):
            for k, (name, size, refill, mixed, root) in enumerate(configs):
                out_dir = os.path.join(tmp, f"{len(rows)}-{k}")
                r = run_once(job_path, out_dir, dict(env, FISH_BATCH_SIZE=size, FISH_BATCH_REFILL=refill,
                                                     FISH_BATCH_MIXED=mixed), root)
                print(json.dumps({"shape": shape, "config": name, "round": rnd, **r,
                                  "load": round(os.getloadavg()[0], 2)}), flush=True)
                runs.setdefault(name, []).append(r["job"])
                if name not in best or r["job"] < best[name]["job"]:
                    best[name] = dict(r, out=out_dir)
        base = best["B=1"]
        other = configs[0][0] if args.before else configs[2][0]  # what the last column compares with
        for name, _, _, _, root in configs:
            r = best[name]
            if args.before:
                old = runs[f"before {name.split()[0]}"] if root == ROOT else runs[name]
                last = ratio_text([o / n for o, n in zip(old, runs[name], strict=True)])
            else:
                last = f"{best[other]['job'] / r['job']:.2f}x"
            rows.append([shape, name, f"{r['wall']:.2f}", f"{r['job']:.2f}", f"{r['frames'] / r['job']:.1f}",
                         f"{base['job'] / r['job']:.2f}x", last])
            if args.engine == "fish" and root == ROOT:  # the old checkout samples differently
                for seg in job["segments"]:
                    a, _ = sf.read(os.path.join(base["out"], f"{seg['id']}.wav"))
                    c, _ = sf.read(os.path.join(r["out"], f"{seg['id']}.wav"))
                    identical &= bool(np.array_equal(a, c))
    last_header = "before / this, per round: median (range)" if args.before else "vs single-voice"
    print(markdown_table(["job", "config", "wall s", "best job s", "frames/s", "job vs B=1", last_header], rows))
    print(f"load average after: {os.getloadavg()}")
    if args.engine == "fish":
        print(f"every wav of this checkout identical to its B=1's: {identical}")


if __name__ == "__main__":
    main()
