"""GPU telemetry and worker recycling on a real GPU (issue 15), in one short run for the device machine:

    .venv/bin/python benchmarks/telemetry_check.py                  # tiny Fish Speech checkpoint on GPU 0
    .venv/bin/python benchmarks/telemetry_check.py --segments 24 --workers 2 --recycle-every 5 --growth-gb 0.5

Runs a real job through `python -m fishmp generate --progress jsonl` (the CLI, as a backend would) with the real Fish
Speech engine on a tiny random checkpoint, pinned to one GPU (FISH_DEVICES), FISH_TELEMETRY_INTERVAL_S=1 and
FISH_WORKER_MAX_SEGMENTS, then prints: every `gpu` event (memory, utilisation, per-worker memory), the `finished`
event's per-GPU peak/mean, the manifest's summary, every `worker_recycled` event (figures: segments, memory kind,
baseline/current/growth GiB) and the checks (each segment done exactly once, recycled with no worker_died, gpu events
present when a GPU is used, worker ids in workers_gib). Without a GPU it says so and checks that nothing about GPUs
was emitted. Exit 0 when every check holds. `--engine synthetic` runs the orchestration alone (no model).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import ROOT, make_job  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segments", type=int, default=24)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--device", default="0", help="FISH_DEVICES (default 0; 'cpu' for the no-GPU path)")
    ap.add_argument("--recycle-every", type=int, default=5, help="FISH_WORKER_MAX_SEGMENTS")
    ap.add_argument("--growth-gb", type=float, default=None, help="FISH_WORKER_MAX_GROWTH_GB (default: none)")
    ap.add_argument("--engine", default="fish", choices=("fish", "synthetic"))
    ap.add_argument("--chars", type=int, default=40, help="characters per segment")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="frames per take at most (the tiny model babbles)")
    args = ap.parse_args(argv)

    tmp = tempfile.mkdtemp(prefix="fishmp-telemetry-")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
    env.update(FISH_ENGINE=args.engine, FISH_DEVICES=args.device, FISH_MAX_WORKERS=str(args.workers),
               FISH_CPU_WORKERS=str(args.workers), FISH_TELEMETRY_INTERVAL_S="1",
               FISH_WORKER_MAX_SEGMENTS=str(args.recycle_every), FISH_CACHE_DIR=os.path.join(tmp, "cache"),
               FISH_MODEL_MEMORY_GB="2", FISH_PRECISION="float32", FISH_SYNTHETIC_SECONDS_PER_CHAR="0.02",
               FISH_TAKE_CHECK="false")  # a random model's takes never pass: retries would only slow this down
    if args.growth_gb is not None:
        env["FISH_WORKER_MAX_GROWTH_GB"] = str(args.growth_gb)
    if args.engine == "fish":
        from fishmp.engines.tiny import write_checkpoint

        ckpt = os.path.join(tmp, "tiny")
        write_checkpoint(ckpt, "tiny")
        env["FISH_CHECKPOINT_DIR"] = ckpt
    speakers = [f"spk{i % 2}" for i in range(args.segments)]
    job = make_job(os.path.join(tmp, "refs"), [(s, args.chars) for s in speakers])
    job["params"] = {"max_new_tokens": args.max_new_tokens, "seed": 1}
    job_path = os.path.join(tmp, "job.json")
    with open(job_path, "w") as f:
        json.dump(job, f)
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "fishmp", "generate", job_path, "-o", os.path.join(tmp, "out"),
                        "--progress", "jsonl", "--no-resume"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=900)
    wall = time.monotonic() - t0
    lines = [ln for ln in r.stdout.splitlines() if ln.strip()]
    events = [json.loads(ln) for ln in lines[:-1]]
    print(f"exit {r.returncode} in {wall:.1f}s; stderr tail:\n" + "\n".join(r.stderr.splitlines()[-12:]))
    kinds = Counter(e["event"] for e in events)
    print("events:", dict(kinds))
    plan = next((e for e in events if e["event"] == "plan"), {})
    on_gpu = any(str(w.get("device", "")).startswith("cuda") for w in events if w["event"] == "worker_ready")
    print("plan mode:", plan.get("mode"), "| workers on a GPU:", on_gpu)
    for e in events:
        if e["event"] == "gpu":
            print("gpu", json.dumps(e["gpus"]))
        elif e["event"] == "worker_recycled":
            print("recycled", json.dumps({k: v for k, v in e.items() if k not in ("event", "time")}))
    finished = events[-1] if events else {}
    print("finished gpus:", json.dumps(finished.get("gpus")))
    try:
        with open(os.path.join(tmp, "out", "manifest.json")) as f:
            print("manifest summary:", json.dumps(json.load(f).get("summary")))
    except OSError as exc:
        print("no manifest:", exc)

    done = Counter(e["id"] for e in events if e["event"] == "segment_done")
    ready_ids = {e["worker"] for e in events if e["event"] == "worker_ready"}
    seen_workers = {w for e in events if e["event"] == "gpu" for g in e["gpus"] for w in g.get("workers_gib", {})}
    checks = {
        "exit 0": r.returncode == 0,
        "each segment done once": len(done) == args.segments and set(done.values()) == {1},
        "recycled, no worker_died": kinds["worker_recycled"] >= 1 and kinds["worker_died"] == 0,
    }
    if on_gpu:
        checks["gpu events"] = kinds["gpu"] >= 1
        checks["finished has gpus"] = bool(finished.get("gpus"))
        checks["workers_gib names fishmp workers (where NVML gives per-process memory)"] = seen_workers <= ready_ids
        checks["recycled on a GPU measures cuda memory (fish engine)"] = args.engine != "fish" or all(
            e["memory_kind"] == "cuda" and e["baseline_gib"] is not None
            for e in events if e["event"] == "worker_recycled")
    else:
        checks["no gpu events without a GPU"] = kinds["gpu"] == 0 and "gpus" not in finished
    for name, ok in checks.items():
        print(("PASS " if ok else "FAIL ") + name)
    print(f"per-process memory seen for workers: {sorted(seen_workers) or 'none (NVML gave none)'}")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
