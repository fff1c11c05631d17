"""What a backend saves by keeping one warm `fishmp.Pool` for many jobs instead of a fresh pool per job.

    .venv/bin/python benchmarks/pool_sharing.py [--load-s 3] [--workers 2] [--segments 12] [--rounds 2]

Synthetic engine (no model), CPU workers. Two jobs of `--segments` segments each (2 speakers), run two ways, the
ways interleaved over `--rounds` rounds:
  fresh   one after the other, each in its own pool (`with Pool() as p: p.generate(job)`, what `fishmp.generate`
          does): every job pays worker start-up and model load (FISH_SYNTHETIC_LOAD_S = --load-s) and shutdown.
  shared  one pool for both (`with Pool() as p:` submit both, wait for both): start-up and load once, and the two
          jobs divide the workers between them.
Wall clock from the first Pool() to the end of the last `with` block (shutdown included in both). Orchestration
costs within a warm pool are measured by benchmarks/orchestration.py; this one measures what start-up adds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import make_job, synthetic_env  # noqa: E402

from fishmp import JobResult  # noqa: E402

SECONDS_PER_CHAR = 0.002  # a 60-character segment sleeps 0.12 s


def _jobs(ref_dir: str, segments: int) -> list[dict]:
    half = segments // 2
    return [make_job(ref_dir, [(f"{name}-a", 60)] * half + [(f"{name}-b", 60)] * (segments - half), seed=i)
            for i, name in enumerate(("film", "trailer"))]


def fresh(jobs: list[dict], out: str, settings: dict) -> float:
    from fishmp import Pool

    t0 = time.monotonic()
    for i, job in enumerate(jobs):
        with Pool(None, **settings) as pool:
            _check(pool.generate(job, output_dir=os.path.join(out, f"job{i}"), resume=False))
    return time.monotonic() - t0


def shared(jobs: list[dict], out: str, settings: dict) -> float:
    from fishmp import Pool

    t0 = time.monotonic()
    with Pool(None, **settings) as pool:
        handles = [pool.submit(job, output_dir=os.path.join(out, f"job{i}"), resume=False) for i, job in enumerate(jobs)]
        for h in handles:
            _check(h.result())
    return time.monotonic() - t0


def _check(result: JobResult) -> None:
    if not result.ok:
        raise RuntimeError(f"a job did not finish: {result}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--load-s", type=float, default=3.0, help="synthetic model load per worker, seconds")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--segments", type=int, default=12, help="segments per job")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="fishmp-pool-sharing-") as tmp:
        synthetic_env(SECONDS_PER_CHAR, load_s=args.load_s, cache_dir=os.path.join(tmp, "cache"))
        jobs = _jobs(os.path.join(tmp, "refs"), args.segments)
        settings = {"engine": "synthetic", "devices": "cpu", "cpu_workers": args.workers}
        times: dict[str, list[float]] = {"fresh": [], "shared": []}
        for r in range(args.rounds):
            order = ("fresh", "shared") if r % 2 == 0 else ("shared", "fresh")
            for way in order:
                fn = fresh if way == "fresh" else shared
                times[way].append(fn(jobs, os.path.join(tmp, f"out-{way}-{r}"), settings))
                print(f"round {r}: {way:6s} {times[way][-1]:.2f} s", flush=True)
    work = 2 * args.segments * 60 * SECONDS_PER_CHAR / args.workers
    f, s = statistics.median(times["fresh"]), statistics.median(times["shared"])
    print(f"2 jobs x {args.segments} segments, {args.workers} workers, load {args.load_s:g} s, "
          f"work {work:.2f} s per worker; median of {args.rounds} (load average {os.getloadavg()[0]:.1f})")
    print(f"fresh pool per job {f:.2f} s | one shared pool {s:.2f} s | shared / fresh = {s / f:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
