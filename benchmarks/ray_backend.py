"""What the Ray backend costs over the local one: the same synthetic job on 2 CPU workers, each backend warm.

    .venv/bin/python benchmarks/ray_backend.py [--segments 100] [--chars 40] [--workers 2]

Runs a local Ray instance (RAY_AUTH_MODE=disabled, no dashboard). Per backend: seconds from Pool() to every worker
ready (Ray: actor start-up included), then one job of N segments of one speaker (the synthetic engine sleeps 2 ms per
character, so the work is known), measured warm: wall, ideal (work / workers), efficiency, and each worker's idle gap
between two segments (message round trips, wav bytes shipped back and written by the main process on Ray).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from common import Recorder, make_job, make_reference_wav, markdown_table, start_pool, synthetic_env, worker_gaps  # noqa: E402

SECONDS_PER_CHAR = 0.002


def run(backend: str, args: argparse.Namespace, tmp: str) -> list[object]:
    ref = make_reference_wav(os.path.join(tmp, "ref.wav"))
    pool, ready_s, _ = start_pool(args.workers, os.path.join(tmp, f"warm-{backend}"), ref, backend=backend,
                                  cache_dir=os.path.join(tmp, "cache"))
    try:
        job = make_job(tmp, [("s", args.chars)] * args.segments)
        rec = Recorder()
        t0 = time.monotonic()
        result = pool.generate(job, output_dir=os.path.join(tmp, f"out-{backend}"), on_event=rec, resume=False)
        wall = time.monotonic() - t0
    finally:
        pool.close()
    assert result.count("done") == args.segments, result.error
    work = args.segments * args.chars * SECONDS_PER_CHAR
    ideal = work / args.workers
    gaps, _ = worker_gaps(rec.events)
    gaps_ms = sorted(g * 1000 for g in gaps)
    p95 = gaps_ms[int(0.95 * (len(gaps_ms) - 1))]
    return [backend, f"{ready_s:.2f}", f"{wall:.2f}", f"{ideal:.2f}", f"{ideal / wall:.3f}",
            f"{statistics.median(gaps_ms):.1f}", f"{p95:.1f}"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--segments", type=int, default=100)
    ap.add_argument("--chars", type=int, default=40)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    synthetic_env(SECONDS_PER_CHAR, load_s=0.2)
    import ray

    ray.init(num_cpus=max(2, args.workers), include_dashboard=False, log_to_driver=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        rows.append(run("local", args, tmp))
        rows.append(run("ray", args, tmp))
    ray.shutdown()
    print(f"{args.segments} segments x {args.chars} chars, 1 speaker, {args.workers} CPU workers, "
          f"{SECONDS_PER_CHAR * 1000:g} ms/char")
    print(markdown_table(["backend", "Pool() to ready s", "wall s", "ideal s", "efficiency", "gap ms median",
                          "gap ms p95"], rows))


if __name__ == "__main__":
    main()
