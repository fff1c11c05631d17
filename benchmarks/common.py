"""Shared helpers for the benchmarks: reference wavs, job dicts, a warmed-up Pool, event recording and analysis.

Nothing here is imported by fishmp; benchmarks are run by hand (`.venv/bin/python benchmarks/<name>.py`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def make_reference_wav(path: str, seconds: float = 3.0, sample_rate: int = 44100, seed: int = 0) -> str:
    """A speech-like mono wav (140 Hz voice with harmonics and syllable-rate modulation), like the tests' make_wav."""
    import soundfile as sf

    n = int(round(seconds * sample_rate))
    t = np.arange(n) / sample_rate
    rng = np.random.default_rng(seed)
    f0 = 110 + 15 * seed % 90
    voice = sum(np.sin(2 * np.pi * f0 * k * t) / k for k in range(1, 6))
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t) ** 2
    mono = (0.2 * voice * envelope + 0.01 * rng.standard_normal(n)).astype(np.float32)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    sf.write(path, mono, sample_rate)
    return path


def words(n_chars: int, rng: np.random.Generator) -> str:
    """Plain text of exactly n_chars characters (letters and spaces)."""
    letters = "abcdefghijklmnopqrstuvwxyz"
    out = []
    while sum(len(w) + 1 for w in out) < n_chars:
        out.append("".join(rng.choice(list(letters), size=int(rng.integers(2, 9)))))
    return " ".join(out)[:n_chars].rstrip().ljust(n_chars, "a")


def make_job(ref_dir: str, segments: list[tuple[str, int]], seed: int = 0,
             text_fn: Callable[[int, np.random.Generator], str] | None = None) -> dict:
    """A fishmp job dict: `segments` is a list of (speaker, characters); one reference wav per speaker."""
    rng = np.random.default_rng(seed)
    speakers: dict[str, dict] = {}
    segs = []
    for i, (spk, n) in enumerate(segments):
        if spk not in speakers:
            wav = os.path.join(ref_dir, f"{spk}.wav")
            if not os.path.exists(wav):
                make_reference_wav(wav, seed=len(speakers))
            speakers[spk] = {"reference_audio": wav, "reference_text": f"reference of {spk}"}
        segs.append({"id": f"{i:05d}", "speaker": spk, "text": (text_fn or words)(n, rng)})
    return {"speakers": speakers, "segments": segs}


class Recorder:
    """An on_event callback that keeps every event (thread-safe) and lets others wait for kinds of event."""

    def __init__(self, also: Callable[[dict], None] | None = None) -> None:
        self.events: list[dict] = []
        self.lock = threading.Lock()
        self.also = also

    def __call__(self, ev: dict) -> None:
        ev = dict(ev, t_mono=time.monotonic())
        with self.lock:
            self.events.append(ev)
        if self.also:
            self.also(ev)

    def of(self, kind: str) -> list[dict]:
        with self.lock:
            return [e for e in self.events if e["event"] == kind]


def synthetic_env(seconds_per_char: float, load_s: float = 0.5, cache_dir: str | None = None) -> None:
    """Set the synthetic engine's knobs in os.environ (spawned workers inherit them)."""
    os.environ["FISH_ENGINE"] = "synthetic"
    os.environ["FISH_SYNTHETIC_SECONDS_PER_CHAR"] = repr(seconds_per_char)
    os.environ["FISH_SYNTHETIC_LOAD_S"] = repr(load_s)
    if cache_dir:
        os.environ["FISH_CACHE_DIR"] = cache_dir


def start_pool(n_workers: int, warm_dir: str, ref_wav: str, timeout_s: float = 120.0,
               **settings: Any) -> tuple[Any, float, list[dict]]:
    """A CPU-worker Pool with `n_workers` workers, returned only once every worker has reported ready.

    Ready messages are only read while a job runs, so tiny one-segment warm-up jobs are run until all `n_workers`
    worker_ready events have been seen. Returns (pool, seconds from Pool() to all ready, worker_ready events)."""
    from fishmp.api import Pool

    t0 = time.monotonic()
    pool = Pool(None, engine="synthetic", multiprocess_mode="true", devices="cpu", cpu_workers=n_workers,
                **settings)
    rec = Recorder()
    job = {"speakers": {"warm": {"reference_audio": ref_wav, "reference_text": "warm up"}},
           "segments": [{"id": "w", "speaker": "warm", "text": "hi"}]}
    i = 0
    while len(rec.of("worker_ready")) < n_workers:
        if time.monotonic() - t0 > timeout_s:
            pool.close(0)
            raise RuntimeError(f"only {len(rec.of('worker_ready'))}/{n_workers} workers ready after {timeout_s}s")
        res = pool.generate(job, output_dir=os.path.join(warm_dir, f"warm{i}"), on_event=rec, resume=False)
        if res.error:
            pool.close(0)
            raise RuntimeError(res.error)
        i += 1
        if len(rec.of("worker_ready")) < n_workers:
            time.sleep(0.05)
    return pool, time.monotonic() - t0, rec.of("worker_ready")


def worker_gaps(events: list[dict]) -> tuple[list[float], dict[str, float]]:
    """Idle time between consecutive segments of each worker, from segment_done events.

    For consecutive segments i, i+1 of one worker: gap = done_time[i+1] - done_time[i] - synthesis_seconds[i+1].
    synthesis_seconds is the worker's own busy time for a segment (prompt + synthesize, measured in the worker), so the
    gap is the time the worker was not synthesizing between two segments: message round trips, the main loop's
    reaction time, and any wait for the next task (the wav write runs on a separate thread and cancels out over a
    run). Returns (all gaps in seconds, per-worker busy seconds)."""
    by_worker: dict[str, list[dict]] = defaultdict(list)
    for e in events:
        if e["event"] == "segment_done" and not e.get("skipped"):
            by_worker[e["worker"]].append(e)
    gaps: list[float] = []
    busy: dict[str, float] = {}
    for w, evs in by_worker.items():
        evs.sort(key=lambda e: e["t_mono"])
        busy[w] = sum(e["synthesis_seconds"] for e in evs)
        for a, b in zip(evs, evs[1:], strict=False):
            gaps.append(b["t_mono"] - a["t_mono"] - b["synthesis_seconds"])
    return gaps, busy


def static_split_makespan(costs_by_speaker: dict[str, float], counts_by_speaker: dict[str, int], workers: int) -> float:
    """The original script's static split: speakers sorted by segment count (most first), each given to the worker
    with the fewest segments so far; the makespan is the largest sum of segment costs on one worker."""
    count = [0] * workers
    cost = [0.0] * workers
    for spk in sorted(counts_by_speaker, key=lambda s: (-counts_by_speaker[s], s)):
        i = min(range(workers), key=lambda k: (count[k], k))
        count[i] += counts_by_speaker[spk]
        cost[i] += costs_by_speaker[spk]
    return max(cost)


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def replace_section(path: str, name: str, body: str) -> None:
    """Replace (or append) the section between <!-- BEGIN name --> and <!-- END name --> in a markdown file."""
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else (
        "# Benchmark results\n\nGenerated by the scripts in benchmarks/; each section is rewritten by its script.\n")
    block = f"{begin}\n{body.rstrip()}\n{end}"
    if begin in text and end in text:
        pre, rest = text.split(begin, 1)
        _, post = rest.split(end, 1)
        text = pre + block + post
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
