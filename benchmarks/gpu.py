"""GPU benchmark (needs a GPU; without one it prints why and exits 0): real memory per worker, tokens/s and real-time
factor per worker and in total for 1..k workers on one GPU, and the FISH_MODEL_MEMORY_GB to use on that GPU.

    .venv/bin/python benchmarks/gpu.py                              # random S1-mini-sized checkpoint (written to a temp dir)
    .venv/bin/python benchmarks/gpu.py --checkpoint checkpoints/openaudio-s1-mini --max-workers 6
    .venv/bin/python benchmarks/gpu.py --allow-cpu                  # logic check on CPU with the tiny checkpoint

Per worker count k (1, 2, ... up to --max-workers, or until the next worker would not fit in the free memory):
  1. NVML free memory of the GPU is read (`free_before`), a Pool of k workers on that GPU is started (an explicit
     plan, so the memory formula does not cap k), and tiny warm-up jobs run until every worker reported ready and
     every worker synthesized at least one warm-up segment (the allocator has then reserved its working set).
  2. memory per worker = (free_before - free_after_warm_up) / k: what a worker really costs, CUDA context included
     (torch's own counters miss the context). Measured again after the timed job; the larger value is reported.
  3. the timed job: k x --segments-per-worker (x --batch-size) segments of one speaker with fixed text,
     max_new_tokens and seed. With --batch-size B > 1 a worker's segments overlap, so only the totals count.
     From segment_done events: per worker tokens/s = tokens / synthesis_seconds and RTF = synthesis_seconds /
     audio_seconds (below 1 = faster than real time), averaged over workers; in total tokens/s = all tokens / wall
     and RTF = wall / all audio seconds.
Recommendation: FISH_MODEL_MEMORY_GB = max measured per-worker memory x 1.2, rounded up to 0.5 GiB; the table also
shows how many workers the guide's formula then plans on this GPU (floor(total x (1 - 0.10) / that)).
A random checkpoint's tokens are random: its speed is the real model's speed per token, its audio is noise, and it
may stop early at a random end token (tokens are counted, not assumed).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import Recorder, make_reference_wav, markdown_table, replace_section  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = ("The quick brown fox jumps over the lazy dog while the orchestra tunes its instruments, and somewhere "
        "in the distance a train whistles twice before the evening settles in.")


def gpu_available() -> tuple[bool, str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        count = pynvml.nvmlDeviceGetCount()
    except Exception as exc:  # noqa: BLE001 - no driver, no library: no GPU
        return False, f"NVML unavailable ({type(exc).__name__}: {exc})"
    if count == 0:
        return False, "NVML sees no GPU"
    try:
        import torch

        if not torch.cuda.is_available():
            return False, "torch.cuda.is_available() is False"
    except ImportError as exc:
        return False, f"torch missing ({exc})"
    return True, f"{count} GPU(s)"


def nvml_free_gib(index: int) -> tuple[float, float, str]:
    """(free GiB, total GiB, name) of GPU `index` (NVML numbering)."""
    import pynvml

    pynvml.nvmlInit()
    h = pynvml.nvmlDeviceGetHandleByIndex(index)
    info = pynvml.nvmlDeviceGetMemoryInfo(h)
    name = pynvml.nvmlDeviceGetName(h)
    return info.free / 1024**3, info.total / 1024**3, name.decode() if isinstance(name, bytes) else name


def make_pool(k: int, args: argparse.Namespace, ckpt: str, cache_dir: str):  # noqa: ANN201
    from fishmp.api import Pool

    common = dict(engine="fish", checkpoint_dir=ckpt, cache_dir=cache_dir, multiprocess_mode="true",
                  precision=args.precision, max_restarts=0, segment_timeout_s=600.0,
                  batch_size=args.batch_size, compile=args.compile,
                  take_check=False)  # a random model's takes fail the take check: retries would be uncounted work
    if args.cpu:
        return Pool(None, devices="cpu", cpu_workers=k, **common)
    from fishmp.planning.gpus import nvml_inventory
    from fishmp.planning.plan import GpuPlan, Plan

    gpu = next(g for g in nvml_inventory() if g.index == args.gpu)
    plan = Plan(mode="multiprocess", gpus=(GpuPlan(gpu, gpu.total_gib * 0.9, k, k),), cpu_workers=0)
    return Pool(None, plan=plan, devices=str(args.gpu), **common)


def job(ref_wav: str, n: int, max_new_tokens: int, prefix: str) -> dict:
    return {"speakers": {"voice": {"reference_audio": ref_wav, "reference_text": "A short reference sentence."}},
            "params": {"max_new_tokens": max_new_tokens, "seed": 1234, "temperature": 0.8, "top_p": 0.8},
            "segments": [{"id": f"{prefix}{i:03d}", "speaker": "voice", "text": TEXT} for i in range(n)]}


def warm_up(pool, k: int, ref_wav: str, out: str, timeout_s: float,  # noqa: ANN001
            rows: int = 1) -> tuple[float, list[dict]]:
    """Run warm-up jobs until all k workers are ready and each has synthesized a segment. Returns (seconds, ready events)."""
    t0 = time.monotonic()
    rec = Recorder()
    warmed: set[str] = set()
    i = 0
    while len(rec.of("worker_ready")) < k or len(warmed) < k:
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"warm-up: {len(rec.of('worker_ready'))}/{k} ready, {len(warmed)}/{k} warmed "
                               f"after {timeout_s:.0f}s")
        res = pool.generate(job(ref_wav, 2 * k * rows, 16, "warm"), output_dir=os.path.join(out, f"warm{i}"), on_event=rec,
                            resume=False)
        if res.error or res.count("failed"):
            fails = [r.error for r in res.records.values() if r.status == "failed"][:2]
            raise RuntimeError(f"warm-up failed: {res.error or fails}")
        warmed |= {e["worker"] for e in rec.of("segment_done") if e.get("worker")}
        i += 1
    return time.monotonic() - t0, rec.of("worker_ready")


def measure(k: int, args: argparse.Namespace, ckpt: str, ref_wav: str, tmp: str) -> dict:
    import numpy as np

    free_before = nvml_free_gib(args.gpu)[0] if not args.cpu else None
    pool = make_pool(k, args, ckpt, os.path.join(tmp, "cache"))
    try:
        warm_s, ready = warm_up(pool, k, ref_wav, os.path.join(tmp, f"warm-{k}"), args.load_timeout, args.batch_size)
        free_warm = nvml_free_gib(args.gpu)[0] if not args.cpu else None
        rec = Recorder()
        n = k * args.segments_per_worker * args.batch_size
        t0 = time.monotonic()
        res = pool.generate(job(ref_wav, n, args.max_new_tokens, "seg"), output_dir=os.path.join(tmp, f"out-{k}"),
                            on_event=rec, resume=False)
        wall = time.monotonic() - t0
        free_after = nvml_free_gib(args.gpu)[0] if not args.cpu else None
    finally:
        pool.close()
    shutil.rmtree(os.path.join(tmp, f"out-{k}"), ignore_errors=True)
    if res.error or res.count("failed"):
        fails = [f"{r.error_kind}: {r.error}" for r in res.records.values() if r.status == "failed"][:2]
        raise RuntimeError(f"{k} workers: {res.error or fails}")
    done = [e for e in rec.of("segment_done") if not e.get("skipped")]
    per_worker: dict[str, dict[str, float]] = {}
    for e in done:
        w = per_worker.setdefault(e["worker"], {"tokens": 0, "synth": 0.0, "audio": 0.0, "n": 0})
        w["tokens"] += e.get("tokens") or 0
        w["synth"] += e["synthesis_seconds"]
        w["audio"] += e["audio_seconds"]
        w["n"] += 1
    tokens = sum(w["tokens"] for w in per_worker.values())
    audio = sum(w["audio"] for w in per_worker.values())
    mem = None
    if free_before is not None:
        mem = max(free_before - free_warm, free_before - free_after) / k
    return {
        "workers": k, "batch_size": args.batch_size, "compile": args.compile, "segments": len(done), "wall": wall,
        "warm_s": warm_s,
        "load_s": float(np.mean([e["load_seconds"] for e in ready])) if ready else float("nan"),
        "mem_gib": mem, "used_gib": (free_before - min(free_warm, free_after)) if free_before is not None else None,
        "tps_worker": float(np.mean([w["tokens"] / w["synth"] for w in per_worker.values() if w["synth"] > 0])),
        "rtf_worker": float(np.mean([w["synth"] / w["audio"] for w in per_worker.values() if w["audio"] > 0])),
        "tps_total": tokens / wall, "rtf_total": wall / audio if audio else float("nan"),
        "tokens": tokens, "audio_s": audio, "workers_used": len(per_worker),
    }


def recommend(rows: list[dict], total_gib: float) -> tuple[float, int] | None:
    mems = [r["mem_gib"] for r in rows if r["mem_gib"] is not None]
    if not mems:
        return None
    rec = math.ceil(max(mems) * 1.2 * 2) / 2
    return rec, math.floor(total_gib * 0.9 / rec + 1e-9)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="a real checkpoint directory (default: write a random one)")
    ap.add_argument("--size", choices=("s1-mini", "tiny"), default=None,
                    help="random checkpoint size (default s1-mini on GPU, tiny with --allow-cpu)")
    ap.add_argument("--max-workers", type=int, default=None, help="largest worker count (default: GPU 8, CPU 2)")
    ap.add_argument("--workers", default=None,
                    help="comma-separated worker counts to measure instead of 1..--max-workers (e.g. 1,2,4)")
    ap.add_argument("--json-out", help="append one JSON line per worker count as it is measured")
    ap.add_argument("--segments-per-worker", type=int, default=None, help="timed segments per worker (GPU 4, CPU 2)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="per segment (GPU 512, CPU 24)")
    ap.add_argument("--gpu", type=int, default=0, help="NVML index of the GPU to measure")
    ap.add_argument("--precision", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--load-timeout", type=float, default=900.0)
    ap.add_argument("--allow-cpu", action="store_true", help="without a GPU, check the logic on CPU workers")
    ap.add_argument("--no-write", action="store_true", help="do not rewrite README-results.md")
    ap.add_argument("--batch-size", type=int, default=1,
                    help="FISH_BATCH_SIZE of every worker (timed segments per worker scale with it)")
    ap.add_argument("--compile", action="store_true", help="FISH_COMPILE=true (compiled at worker load, untimed)")
    args = ap.parse_args(argv)

    ok, why = gpu_available()
    if not ok and not args.allow_cpu:
        print(f"benchmarks/gpu.py: no usable GPU ({why}); skipping (use --allow-cpu to check the logic on CPU)")
        return 0
    args.cpu = not ok
    size = args.size or ("tiny" if args.cpu else "s1-mini")
    max_workers = args.max_workers or (2 if args.cpu else 8)
    args.segments_per_worker = args.segments_per_worker or (2 if args.cpu else 4)
    args.max_new_tokens = args.max_new_tokens or (24 if args.cpu else 512)

    import logging

    logging.getLogger("fishmp").setLevel(logging.WARNING)
    tmp = tempfile.mkdtemp(prefix="fishmp-gpu-")
    t_all = time.monotonic()
    try:
        ckpt = args.checkpoint
        if not ckpt:
            from fishmp.engines.tiny import write_checkpoint

            ckpt = os.path.join(tmp, f"ckpt-{size}")
            t = time.monotonic()
            write_checkpoint(ckpt, size)
            print(f"wrote a random {size} checkpoint in {time.monotonic() - t:.0f}s")
        ref_wav = make_reference_wav(os.path.join(tmp, "ref.wav"), seconds=5.0)
        device = "CPU (logic check; memory n/a)"
        total_gib = None
        if not args.cpu:
            free, total_gib, name = nvml_free_gib(args.gpu)
            device = f"GPU {args.gpu}: {name}, {total_gib:.1f} GiB total, {free:.1f} GiB free at start"
        print(device)
        rows: list[dict] = []
        counts = [int(x) for x in args.workers.split(",")] if args.workers else range(1, max_workers + 1)
        for k in counts:
            if rows and not args.cpu:
                free = nvml_free_gib(args.gpu)[0]
                need = max(r["mem_gib"] for r in rows) * k * 1.05
                if need > free:
                    print(f"stopping before {k} workers: they would need ~{need:.1f} GiB, {free:.1f} GiB free")
                    break
            try:
                r = measure(k, args, ckpt, ref_wav, tmp)
            except RuntimeError as exc:
                print(f"stopping at {k} workers: {exc}")
                break
            rows.append(r)
            if args.json_out:  # as it goes: a run cut short still keeps what it measured
                with open(args.json_out, "a") as fh:
                    fh.write(json.dumps({"device": device, **r}) + "\n")
            mem = f"{r['mem_gib']:.2f} GiB/worker" if r["mem_gib"] is not None else "memory n/a"
            print(f"{k} workers: {mem}, {r['tps_worker']:.1f} tok/s per worker, {r['tps_total']:.1f} tok/s total, "
                  f"RTF {r['rtf_worker']:.3f} per worker / {r['rtf_total']:.3f} total, wall {r['wall']:.1f}s "
                  f"(load {r['load_s']:.1f}s)", flush=True)
            time.sleep(1.0)  # let the driver return the closed workers' memory before the next baseline
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    total = time.monotonic() - t_all

    def f(x: float | None, fmt: str) -> str:
        return "n/a" if x is None else format(x, fmt)

    header = ["workers", "memory / worker GiB", "GPU memory used GiB", "tokens/s per worker", "tokens/s total",
              "RTF per worker", "RTF total", "segments", "tokens", "wall s", "load s"]
    body = [[r["workers"], f(r["mem_gib"], ".2f"), f(r["used_gib"], ".2f"), f"{r['tps_worker']:.1f}",
             f"{r['tps_total']:.1f}", f"{r['rtf_worker']:.3f}", f"{r['rtf_total']:.3f}", r["segments"], r["tokens"],
             f"{r['wall']:.1f}", f"{r['load_s']:.1f}"] for r in rows]
    md = markdown_table(header, body)
    rec = recommend(rows, total_gib) if total_gib else None
    advice = (f"Recommended FISH_MODEL_MEMORY_GB={rec[0]:g} for this GPU (max measured {max(r['mem_gib'] for r in rows):.2f} "
              f"GiB/worker x 1.2, rounded up to 0.5): the plan then starts {rec[1]} worker(s) on it."
              if rec else "No recommendation: memory is not measured on CPU.")
    print()
    print(md)
    print()
    print(advice)
    print(f"benchmark wall time: {total:.0f} s")
    if not args.cpu and not args.no_write and rows:
        cmd = " ".join([".venv/bin/python benchmarks/gpu.py", *(argv if argv is not None else sys.argv[1:])])
        body_md = (f"## GPU workers\n\n`{cmd}` — {device}; checkpoint: {args.checkpoint or 'random ' + size}; "
                   f"{args.segments_per_worker} segments/worker, max_new_tokens={args.max_new_tokens}, "
                   f"{args.precision}; benchmark wall time {total:.0f} s.\n\n{md}\n\n{advice}\n")
        replace_section(os.path.join(HERE, "README-results.md"), "gpu", body_md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
