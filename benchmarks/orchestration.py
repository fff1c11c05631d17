"""Orchestration benchmark on the synthetic engine (no model, any machine): how close is fishmp's pull scheduler to
the ideal, and how much better than the original static split of speakers to workers?

    .venv/bin/python benchmarks/orchestration.py            # full run (~3-4 min on 2 cores)
    .venv/bin/python benchmarks/orchestration.py --quick    # ~1 min, smaller per-character cost

Workloads (seeded, deterministic):
  a-guide   the user guide's 6 speakers / 46 segments (counts 12,10,8,7,5,4; 60-240 characters)
  b-skewed  one speaker with most of the text (60 segments, 10-900 characters, log-normal) + 7 tiny speakers
  c-1spk    1 speaker x 200 segments (20-80 characters)
  d-30x1000 30 speakers x 1,000 segments (Zipf-like counts; 5-25 characters)

Method, per workload and worker count (1, 2, 4, 8 CPU workers; FISH_ENGINE=synthetic, FISH_MULTIPROCESS_MODE=true):
  - The Pool is started first and warm-up jobs (one 2-character segment each) are run until every worker has
    reported ready, so model load (FISH_SYNTHETIC_LOAD_S) and process start-up are EXCLUDED from `wall`; they are
    reported apart as `start s` (Pool() -> all workers ready). The ideal and the static split exclude load too.
  - wall     = the time `pool.generate(job)` takes (includes job validation, manifest writes and the last wav).
  - work     = each segment's synthesis_seconds from its segment_done event: the worker's own busy time for it
               (prompt lookup + engine.synthesize, measured inside the worker). This is the engine cost the
               orchestrator has to schedule; it includes the synthetic engine's sine generation (~50 us/character
               of CPU on top of the FISH_SYNTHETIC_SECONDS_PER_CHAR sleep).
  - ideal    = max(sum(work) / workers, max(work))            (no load; same costs as the run)
  - eff      = ideal / wall
  - eff nom  = the same with work = FISH_SYNTHETIC_SECONDS_PER_CHAR x characters (the sleep alone), so it also
               charges the engine's own CPU cost and CPU contention on this machine to the orchestrator.
  - gap ms   = dispatch overhead per segment from event timestamps: for consecutive segments i, i+1 of one worker,
               done_time[i+1] - done_time[i] - synthesis_seconds[i+1], i.e. time the worker was not synthesizing
               between two segments (mean over all pairs; p95 also given).
  - ovh ms   = (wall - ideal) / (segments / workers): everything lost, per segment a worker ran, incl. the tail.
  - static s = makespan of the original script's static split on the same per-segment work: speakers sorted by
               segment count, each to the worker with the fewest segments so far; max over workers of sum(work).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import (  # noqa: E402
    Recorder,
    make_job,
    markdown_table,
    replace_section,
    start_pool,
    static_split_makespan,
    synthetic_env,
    worker_gaps,
)

HERE = os.path.dirname(os.path.abspath(__file__))
WORKERS = (1, 2, 4, 8)
TARGETS = {"a-guide": 0.90, "b-skewed": 0.90, "c-1spk": 0.90, "d-30x1000": 0.95}


def workloads() -> dict[str, list[tuple[str, int]]]:
    import numpy as np

    rng = np.random.default_rng(2024)
    out: dict[str, list[tuple[str, int]]] = {}
    # (a) the guide's benchmark: 6 speakers / 46 segments
    segs = []
    for k, count in enumerate((12, 10, 8, 7, 5, 4)):
        segs += [(f"spk{k}", int(rng.integers(60, 241))) for _ in range(count)]
    out["a-guide"] = segs
    # (b) skewed: one big speaker with very uneven lengths, several tiny speakers
    lengths = np.clip(rng.lognormal(mean=4.4, sigma=1.0, size=60), 10, 900).astype(int)
    segs = [("big", int(n)) for n in lengths]
    for k in range(7):
        segs += [(f"tiny{k}", int(rng.integers(10, 41))) for _ in range(int(rng.integers(1, 4)))]
    out["b-skewed"] = segs
    # (c) one speaker x 200 segments
    out["c-1spk"] = [("solo", int(rng.integers(20, 81))) for _ in range(200)]
    # (d) 30 speakers x 1,000 segments, Zipf-like segment counts per speaker
    weights = 1.0 / np.arange(1, 31) ** 0.8
    speakers = rng.choice(30, size=1000, p=weights / weights.sum())
    out["d-30x1000"] = [(f"s{int(s):02d}", int(rng.integers(5, 26))) for s in speakers]
    return out


def run_one(name: str, segs: list[tuple[str, int]], n: int, spc: float, tmp: str) -> dict:
    import numpy as np

    ref_dir = os.path.join(tmp, "refs")
    job = make_job(ref_dir, segs, seed=zlib.crc32(name.encode()) % 1000)
    pool, start_s, _ = start_pool(n, os.path.join(tmp, "warm"), os.path.join(ref_dir, f"{segs[0][0]}.wav"))
    rec = Recorder()
    out_dir = os.path.join(tmp, f"out-{name}-{n}")
    try:
        t0 = time.monotonic()
        res = pool.generate(job, output_dir=out_dir, on_event=rec, resume=False)
        wall = time.monotonic() - t0
    finally:
        pool.close()
    shutil.rmtree(out_dir, ignore_errors=True)
    if not res.ok:
        raise RuntimeError(f"{name} x{n}: {res.count('failed')} failed, {res.count('pending')} pending, {res.error}")
    done = {e["id"]: e for e in rec.of("segment_done")}
    spk_of = {f"{i:05d}": s for i, (s, _) in enumerate(segs)}
    work = {i: done[i]["synthesis_seconds"] for i in done}
    nominal = {f"{i:05d}": spc * c for i, (_, c) in enumerate(segs)}

    def ideal(cost: dict[str, float]) -> float:
        return max(sum(cost.values()) / n, max(cost.values()))

    def static(cost: dict[str, float]) -> float:
        by_cost: dict[str, float] = {}
        by_count: dict[str, int] = {}
        for i, c in cost.items():
            by_cost[spk_of[i]] = by_cost.get(spk_of[i], 0.0) + c
            by_count[spk_of[i]] = by_count.get(spk_of[i], 0) + 1
        return static_split_makespan(by_cost, by_count, n)

    gaps, busy = worker_gaps(rec.events)
    ideal_s, ideal_nom = ideal(work), ideal(nominal)
    return {
        "workload": name, "workers": n, "segments": len(segs), "speakers": len({s for s, _ in segs}),
        "wall": wall, "ideal": ideal_s, "eff": ideal_s / wall, "eff_nom": ideal_nom / wall,
        "gap_ms": 1000 * float(np.mean(gaps)) if gaps else 0.0,
        "gap_p95_ms": 1000 * float(np.percentile(gaps, 95)) if gaps else 0.0,
        "ovh_ms": 1000 * (wall - ideal_s) / (len(segs) / n),
        "static": static(work), "static_nom": static(nominal), "start": start_s,
        "work": sum(work.values()), "work_nom": sum(nominal.values()),
        "worker_busy": {w: round(b, 3) for w, b in sorted(busy.items())},
    }


def table(rows: list[dict]) -> str:
    header = ["workload", "workers", "wall s", "ideal s", "eff", "eff nom", "gap ms/seg (mean/p95)", "ovh ms/seg",
              "static split s", "wall / static", "start s"]
    body = [[r["workload"], r["workers"], f"{r['wall']:.2f}", f"{r['ideal']:.2f}", f"{r['eff']:.3f}",
             f"{r['eff_nom']:.3f}", f"{r['gap_ms']:.2f} / {r['gap_p95_ms']:.2f}", f"{r['ovh_ms']:.2f}",
             f"{r['static']:.2f}", f"{r['wall'] / r['static']:.2f}", f"{r['start']:.2f}"] for r in rows]
    return markdown_table(header, body)


def checks(rows: list[dict]) -> list[str]:
    by = {(r["workload"], r["workers"]): r for r in rows}
    lines = []

    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    for wl, target in TARGETS.items():
        r = by.get((wl, 4))
        if r:
            lines.append(f"- {wl}, 4 workers: eff {r['eff']:.3f} (nominal {r['eff_nom']:.3f}) vs target >= {target:.2f}: "
                         f"{verdict(r['eff'] >= target)} (nominal: {verdict(r['eff_nom'] >= target)})")
    r = by.get(("b-skewed", 4))
    if r:
        ratio = r["wall"] / r["static"]
        lines.append(f"- b-skewed, 4 workers: wall {r['wall']:.2f} s = {ratio:.2f} x static split {r['static']:.2f} s "
                     f"vs target <= 0.75: {verdict(ratio <= 0.75)}")
    r1, r4 = by.get(("c-1spk", 1)), by.get(("c-1spk", 4))
    if r1 and r4:
        ratio = r4["wall"] / r1["wall"]
        lines.append(f"- c-1spk: wall 4 workers / 1 worker = {r4['wall']:.2f} / {r1['wall']:.2f} = {ratio:.3f} "
                     f"vs target <= 0.35: {verdict(ratio <= 0.35)}")
    worst = max((r for r in rows if r["workers"] == 4), key=lambda r: r["gap_ms"], default=None)
    if worst:
        lines.append(f"- dispatch gap, 4 workers: worst mean {worst['gap_ms']:.2f} ms/segment ({worst['workload']}) "
                     f"vs target < 5 ms: {verdict(worst['gap_ms'] < 5)}")
    worst = max(rows, key=lambda r: r["gap_ms"], default=None)
    if worst:
        lines.append(f"- dispatch gap, any worker count: worst mean {worst['gap_ms']:.2f} ms/segment "
                     f"({worst['workload']} x{worst['workers']}) vs target < 5 ms: {verdict(worst['gap_ms'] < 5)}")
    return lines


def chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    for wl in dict.fromkeys(r["workload"] for r in rows):
        rs = [r for r in rows if r["workload"] == wl]
        line, = ax1.plot([r["workers"] for r in rs], [r["eff"] for r in rs], marker="o", label=wl)
        ax1.plot([r["workers"] for r in rs], [r["eff_nom"] for r in rs], ls=":", color=line.get_color())
        ax2.plot([r["workers"] for r in rs], [r["wall"] / r["static"] for r in rs], marker="o", label=wl)
    ax1.axhline(0.90, color="grey", lw=0.8, ls="--")
    ax1.axhline(0.95, color="grey", lw=0.8, ls="--")
    ax1.set(xscale="log", xticks=WORKERS, xticklabels=WORKERS, xlabel="workers", ylabel="efficiency = ideal / wall",
            ylim=(0.5, 1.02), title="Pull scheduler efficiency (solid: measured work, dotted: nominal)")
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.axhline(0.75, color="grey", lw=0.8, ls="--")
    ax2.set(xscale="log", xticks=WORKERS, xticklabels=WORKERS, xlabel="workers", ylabel="wall / static-split makespan",
            title="vs the original static split (lower is better)")
    for ax in (ax1, ax2):
        ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a quarter of the per-character cost (~1 min)")
    ap.add_argument("--workers", default=",".join(map(str, WORKERS)), help="comma-separated worker counts")
    ap.add_argument("--only", default="", help="comma-separated workload names (default: all)")
    ap.add_argument("--seconds-per-char", type=float, default=None,
                    help="FISH_SYNTHETIC_SECONDS_PER_CHAR (default 0.002, --quick 0.0005)")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite README-results.md and the PNG")
    args = ap.parse_args(argv)
    spc = args.seconds_per_char or (0.0005 if args.quick else 0.002)
    counts = [int(x) for x in args.workers.split(",")]
    wls = workloads()
    if args.only:
        wls = {k: v for k, v in wls.items() if k in args.only.split(",")}
    import logging

    logging.getLogger("fishmp").setLevel(logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="fishmp-bench-")
    synthetic_env(spc, load_s=0.5, cache_dir=os.path.join(tmp, "cache"))
    t_all = time.monotonic()
    rows = []
    try:
        for name, segs in wls.items():
            for n in counts:
                r = run_one(name, segs, n, spc, tmp)
                rows.append(r)
                print(f"{name:10s} x{n}: wall {r['wall']:6.2f}s ideal {r['ideal']:6.2f}s eff {r['eff']:.3f} "
                      f"(nominal {r['eff_nom']:.3f}) gap {r['gap_ms']:.2f} ms static {r['static']:6.2f}s "
                      f"start {r['start']:.2f}s busy {r['worker_busy']}", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.monotonic() - t_all
    md = table(rows)
    summary = "\n".join(checks(rows))
    desc = ", ".join(f"{k}: {len({s for s, _ in v})} speakers / {len(v)} segments / {sum(c for _, c in v)} chars"
                     for k, v in wls.items())
    body = (f"## Orchestration (synthetic engine)\n\n"
            f"`.venv/bin/python benchmarks/orchestration.py{' --quick' if args.quick else ''}` — "
            f"FISH_SYNTHETIC_SECONDS_PER_CHAR={spc:g}, FISH_SYNTHETIC_LOAD_S=0.5, CPU workers, {os.cpu_count()} cores; "
            f"benchmark wall time {total:.0f} s. Workloads: {desc}.\n\n"
            "Load is excluded from `wall`, `ideal` and `static split` alike (the pool is warmed up first; `start s` is "
            "Pool() -> all workers ready). `eff` = ideal / wall with ideal = max(sum(work)/workers, max(work)) and work = "
            "each segment's measured synthesis_seconds; `eff nom` uses the nominal sleep (spc x chars) instead. "
            "`gap` = per worker, done[i+1] - done[i] - synthesis_seconds[i+1] (idle time between segments); `ovh` = "
            "(wall - ideal) / (segments / workers). See the module docstring.\n\n"
            f"{md}\n\nTargets:\n\n{summary}\n\n![efficiency](orchestration.png)\n")
    print()
    print(md)
    print()
    print(summary)
    print(f"\nbenchmark wall time: {total:.0f} s")
    if not args.no_write:
        chart(rows, os.path.join(HERE, "orchestration.png"))
        replace_section(os.path.join(HERE, "README-results.md"), "orchestration", body)
        print(f"wrote {os.path.join(HERE, 'README-results.md')} and {os.path.join(HERE, 'orchestration.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
