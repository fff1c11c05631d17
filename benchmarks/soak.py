"""Soak test (not in CI): a 2,000-segment synthetic job while a thread SIGKILLs a random worker every few seconds.

    .venv/bin/python benchmarks/soak.py                 # ~2 min on 2 cores
    .venv/bin/python benchmarks/soak.py --segments 300 --kill-every 1.5   # a short one
    .venv/bin/python benchmarks/soak.py --recycle-every 25   # + worker recycling (FISH_WORKER_MAX_SEGMENTS=25)

Worker pids come from `worker_ready` events (which carry `pid`); only pids that are children of this process are
killed (checked in /proc) so a recycled pid is never hit. Reported:
  - lost        segments that did not end done-with-a-readable-wav or failed-with-a-reason (must be 0); every wav
                is opened with soundfile and its length checked against the text (0.06 s per spoken character)
  - duplicated  segments with more than one segment_done event
  - failed      segments that ended failed (e.g. poison: their worker was killed FISH_MAX_ATTEMPTS times), by kind
  - kills, worker_died events, restarts (worker_ready events beyond the initial workers), requeues, wall time
  - recycled    worker_recycled events (with --recycle-every: workers replaced on purpose, not charged to the slot)
  - temp files left in the output directory and worker processes still alive after close (both must be 0)
Exit code 0 when lost == duplicated == leftovers == 0.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Recorder, make_job, markdown_table, replace_section, synthetic_env  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


def _parent_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _children() -> list[int]:
    """Live child processes of this one, except multiprocessing's resource tracker (started once by spawn)."""
    me = os.getpid()
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _parent_of(int(name)) == me:
            try:
                with open(f"/proc/{name}/stat") as f:
                    if f.read().split()[2] == "Z":
                        continue
                with open(f"/proc/{name}/cmdline", "rb") as f:
                    if b"resource_tracker" in f.read():
                        continue
            except OSError:
                continue
            out.append(int(name))
    return out


class Killer(threading.Thread):
    """SIGKILLs a random live worker every `every` seconds (jittered +-50%)."""

    def __init__(self, every: float, seed: int, kill_recycled_every: int = 0) -> None:
        super().__init__(name="soak-killer", daemon=True)
        self.every, self.rng = every, random.Random(seed)
        self.kill_recycled_every = kill_recycled_every  # SIGKILL every k-th worker that announced it is recycled
        self.recycled_seen = 0
        self.recycle_kills = 0
        self.live: dict[int, str] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.kills: list[tuple[float, int, str]] = []

    def on_event(self, ev: dict) -> None:
        with self.lock:
            if ev["event"] == "worker_ready":
                self.live[ev["pid"]] = ev["worker"]
            elif ev["event"] == "worker_died":
                self.live.pop(ev.get("pid"), None)
            elif ev["event"] == "worker_recycled":
                self.recycled_seen += 1
                if self.kill_recycled_every and self.recycled_seen % self.kill_recycled_every == 0:
                    if self._kill(ev["pid"], ev["worker"]):  # while it drains its rows: a death, not a recycle
                        self.recycle_kills += 1
                        self.live.pop(ev["pid"], None)

    def _kill(self, pid: int, worker: str) -> bool:
        if _parent_of(pid) != os.getpid():
            return False
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            return False
        self.kills.append((time.monotonic(), pid, worker))
        return True

    def run(self) -> None:
        while not self.stop.wait(self.every * self.rng.uniform(0.5, 1.5)):
            with self.lock:
                pids = [p for p in self.live if _parent_of(p) == os.getpid()]
                if not pids:
                    continue
                pid = self.rng.choice(pids)
                worker = self.live.pop(pid)
            self._kill(pid, worker)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--segments", type=int, default=2000)
    ap.add_argument("--speakers", type=int, default=12)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--kill-every", type=float, default=3.0, help="mean seconds between kills (default 3)")
    ap.add_argument("--seconds-per-char", type=float, default=0.006)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--keep", action="store_true", help="keep the output directory")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite README-results.md")
    ap.add_argument("--recycle-every", type=int, default=None, metavar="N",
                    help="FISH_WORKER_MAX_SEGMENTS=N: each worker is replaced after N segments (default: never)")
    ap.add_argument("--batch-size", type=int, default=1, help="FISH_BATCH_SIZE (default 1)")
    ap.add_argument("--kill-recycled-every", type=int, default=0, metavar="K",
                    help="also SIGKILL every K-th worker right after it announced it is being recycled")
    return ap.parse_args(argv)


def soak(args: argparse.Namespace) -> tuple[dict, list[str]]:
    """Run the soak once: the summary (lost, duplicated, ... as in the module docstring) and notes on failures."""
    import logging

    import numpy as np
    import soundfile as sf

    from fishmp.api import Pool
    from fishmp.engines.synthetic import MARKER, SAMPLE_RATE, SECONDS_PER_CHAR

    logging.getLogger("fishmp").setLevel(logging.ERROR)
    tmp = tempfile.mkdtemp(prefix="fishmp-soak-")
    synthetic_env(args.seconds_per_char, load_s=0.5, cache_dir=os.path.join(tmp, "cache"))
    rng = np.random.default_rng(args.seed)
    segs = [(f"spk{int(rng.integers(args.speakers)):02d}", int(rng.integers(10, 61))) for _ in range(args.segments)]
    job = make_job(os.path.join(tmp, "refs"), segs, seed=args.seed)
    texts = {s["id"]: s["text"] for s in job["segments"]}
    out_dir = os.path.join(tmp, "out")
    killer = Killer(args.kill_every, args.seed, args.kill_recycled_every)
    rec = Recorder(also=killer.on_event)

    t0 = time.monotonic()
    pool = Pool(None, engine="synthetic", multiprocess_mode="true", devices="cpu", cpu_workers=args.workers,
                max_restarts=100_000, worker_max_segments=args.recycle_every, batch_size=args.batch_size)
    try:
        killer.start()
        res = pool.generate(job, output_dir=out_dir, on_event=rec, resume=False)
    finally:
        killer.stop.set()
        killer.join()
        pool.close()
    wall = time.monotonic() - t0
    time.sleep(0.5)
    leftover_procs = _children()

    # -- verify -------------------------------------------------------------------------------------------------------
    done_counts = Counter(e["id"] for e in rec.of("segment_done") if not e.get("skipped"))
    duplicated = sorted(i for i, c in done_counts.items() if c > 1)
    lost, bad_wav, failed = [], [], Counter()
    for sid in texts:
        r = res.records.get(sid)
        if r is None or r.status == "pending":
            lost.append(sid)
        elif r.status == "failed":
            if not r.error:
                lost.append(sid)
            failed[r.error_kind or "?"] += 1
        else:
            try:
                info = sf.info(r.path)
                expected = round(len(MARKER.sub("", texts[sid]).strip()) * SECONDS_PER_CHAR * SAMPLE_RATE)
                if info.frames != expected or info.samplerate != SAMPLE_RATE:
                    raise ValueError(f"{info.frames} frames, expected {expected}")
                sf.read(r.path, frames=16)
            except Exception as exc:  # noqa: BLE001
                bad_wav.append((sid, str(exc)))
                lost.append(sid)
    temp_left = [f for f in os.listdir(out_dir) if f.startswith(".fishmp-tmp-")]
    ready = rec.of("worker_ready")
    died = rec.of("worker_died")
    requeued = rec.of("segment_requeued")
    summary = {
        "segments": len(texts), "workers": args.workers, "kills": len(killer.kills), "worker_died": len(died),
        "restarts": len(ready) - args.workers - len(rec.of("worker_recycled")),
        "recycled": len(rec.of("worker_recycled")), "recycle_kills": killer.recycle_kills,
        "requeued": len(requeued), "done": res.count("done"),
        "failed": sum(failed.values()), "failed_kinds": dict(failed), "lost": len(lost), "bad_wavs": len(bad_wav),
        "duplicated": len(duplicated), "temp_files_left": len(temp_left), "processes_left": len(leftover_procs),
        "wall_s": round(wall, 1), "job_wall_s": round(res.wall_seconds, 1),
        "work_s": round(sum(c for _, c in segs) * args.seconds_per_char, 1),
    }
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}")
    summary["ok"] = summary["lost"] == 0 and summary["duplicated"] == 0 and not temp_left and not leftover_procs
    notes = [f"failed by kind: {dict(failed) or 'none'}"]
    if bad_wav:
        notes.append(f"bad wavs: {bad_wav[:5]}")
    if duplicated:
        notes.append(f"duplicated ids: {duplicated[:10]}")
    if lost:
        notes.append(f"lost ids: {lost[:10]}")
    return summary, notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    summary, notes = soak(args)
    ok = summary["ok"]
    header = ["segments", "workers", "kills", "worker_died", "restarts", "recycled", "requeued", "done", "failed",
              "lost", "duplicated", "temp files left", "processes left", "wall s", "work s (1 worker)"]
    row = [summary[k] for k in ("segments", "workers", "kills", "worker_died", "restarts", "recycled", "requeued",
                                "done", "failed", "lost", "duplicated", "temp_files_left", "processes_left", "wall_s",
                                "work_s")]
    md = markdown_table(header, [row])
    print(md)
    print("\n".join(notes))
    print("PASS" if ok else "FAIL")
    if not args.no_write:
        cmd = " ".join([".venv/bin/python benchmarks/soak.py", *(argv if argv is not None else sys.argv[1:])])
        body = (f"## Soak (random SIGKILLs)\n\n`{cmd}` — {args.segments} segments, {args.speakers} speakers, "
                f"{args.workers} CPU workers, synthetic engine (FISH_SYNTHETIC_SECONDS_PER_CHAR={args.seconds_per_char:g}), "
                f"one worker SIGKILLed every ~{args.kill_every:g} s (uniform 0.5-1.5x), FISH_MAX_RESTARTS=100000, "
                f"FISH_MAX_ATTEMPTS default (3), FISH_WORKER_MAX_SEGMENTS={args.recycle_every or 'none'}, "
                f"FISH_BATCH_SIZE={args.batch_size}. Result: **{'PASS' if ok else 'FAIL'}**.\n\n{md}\n\n"
                + "\n".join(f"- {n}" for n in notes) + "\n")
        replace_section(os.path.join(HERE, "README-results.md"), "soak", body)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
