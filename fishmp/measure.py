"""`plan --measure`: one real worker per GPU model present, its real footprint next to the estimate.

Per GPU model (the first GPU of each name): NVML free memory before, a Pool with a one-slot plan on that GPU (the
worker is a child process: the CUDA context is its own, and this process never imports torch), one warm-up segment
on a synthetic 10 s reference, NVML free memory again while the worker is still alive. The drop is the worker's real
footprint: weights, caches, the caching allocator's reserve after the warm-up's peak, and the CUDA context.
The estimate beside it is computed for the same work (the warm-up's reference, prompt and generated frames).
No GPU: nothing to measure; the command says so and exits 0.

Throughput: the warm-up's frames/s at batch 1 and, with FISH_BATCH_SIZE = B > 1, a second worker's B rows of the same
speaker decoded together, are kept in FISH_CACHE_DIR/throughput.json (keyed by GPU name, checkpoint content and
precision, max_seq_len and FISH_COMPILE) for `plan --explain` to show next to its alternatives.

FISH_MODEL_MEMORY_GB=auto reuses the warm-up inside the worker (FootprintProbe): NVML free memory on its GPU before
the engine loads, the same warm-up segment after, the drop sent in its Ready (fishmp/running/autofill.py fills the GPU).
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

from .config import Settings
from .planning.gpus import GIB, GPU, nvml_free_bytes
from .planning.memory import estimate
from .planning.throughput import record_throughput
from .planning.warmup import NEW_TOKENS, REFERENCE_S, REFERENCE_TEXT, TEXT, warm_up_workload
from .worker.footprint import write_reference

log = logging.getLogger("fishmp")


def _warm_up_job(tmp: str, reference_s: float, new_tokens: int, rows: int = 1) -> dict[str, Any]:
    ref = write_reference(tmp, reference_s)
    segments = [{"id": "warm-up" if i == 0 else f"warm-up-{i}", "speaker": "ref", "text": TEXT} for i in range(rows)]
    return {"speakers": {"ref": {"reference_audio": ref, "reference_text": REFERENCE_TEXT}},
            "segments": segments, "params": {"max_new_tokens": new_tokens, "seed": 0}}


def _run_warm_up(gpu: GPU, plan: Any, settings: Settings, tmp: str, reference_s: float, new_tokens: int,
                 rows: int) -> tuple[Any, int]:
    """One pool of one worker at `rows` rows, `rows` warm-up segments of one speaker; (result, NVML drop)."""
    from .api import Pool

    free = (lambda: 0) if gpu.index < 0 else (lambda: nvml_free_bytes(gpu.index))
    from .planning.plan import is_auto

    # A number instead of auto: this pool's one worker must not run auto's own warm-up, nor be grown (autofill.py).
    run_settings = settings.replace(multiprocess_mode="true", max_restarts=0, batch_size=rows,
                                    cache_dir=os.path.join(tmp, "cache"), segment_timeout_s=600.0,
                                    model_memory_gb=8.0 if is_auto(settings) else settings.model_memory_gb)
    job = _warm_up_job(tmp, reference_s, new_tokens, rows)
    before = free()
    with Pool(run_settings, plan=plan) as pool:
        result = pool.generate(job, output_dir=os.path.join(tmp, f"out-{rows}"), resume=False)
        after = free()  # the worker is still alive, its allocator's reserve held
    return result, before - after


def _frames_per_s(records: list[Any]) -> float | None:
    """Rows of one batch start together: all their frames over the longest row's time."""
    seconds = max((r.synthesis_seconds or 0.0 for r in records), default=0.0)
    return round(sum(int(r.tokens or 0) for r in records) / seconds, 2) if seconds > 0 else None


def measure_gpu(gpu: GPU | None, settings: Settings, max_seq_len: int, reference_s: float = REFERENCE_S,
                new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    """Start one worker on `gpu`, run the warm-up, return the NVML drop and the estimate for the same work, and the
    frames/s at batch 1 (and at FISH_BATCH_SIZE rows, a second worker, when that is > 1), also kept in the cache.
    `gpu=None` runs the same worker on the CPU (no NVML figure): the path tests can take without a GPU."""
    from .planning.plan import GpuPlan, Plan

    if gpu is None:
        gpu = GPU(-1, "cpu", 0.0, 0.0)
        plan = Plan(mode="cpu", gpus=(), cpu_workers=1)
    else:
        available = gpu.total_gib * (1 - settings.memory_reserve)
        plan = Plan(mode="multiprocess", gpus=(GpuPlan(gpu, available, 1, 1),), cpu_workers=0)
    settings = settings.replace(max_seq_len=max_seq_len)
    rows = max(1, int(getattr(settings, "batch_size", 1) or 1))
    throughput: list[dict[str, Any]] = []
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fishmp-measure-") as tmp:
        result, measured = _run_warm_up(gpu, plan, settings, tmp, reference_s, new_tokens, 1)
        record = result.records.get("warm-up")
        if record is None or record.status != "done":
            why = (record.error if record else None) or result.error or "no result"
            return {"index": gpu.index, "name": gpu.name, "error": f"the warm-up segment failed: {why}"}
        throughput.append({"rows": 1, "frames_per_s": _frames_per_s([record]), "measured_gib": round(measured / GIB, 3)})
        if rows > 1:
            batched, drop = _run_warm_up(gpu, plan, settings, tmp, reference_s, new_tokens, rows)
            done = [r for r in batched.records.values() if r.status == "done"]
            if len(done) == rows:
                throughput.append({"rows": rows, "frames_per_s": _frames_per_s(done),
                                   "measured_gib": round(drop / GIB, 3)})
    seconds = time.monotonic() - start
    record_throughput(settings, gpu.name, throughput)
    tokens = int(record.tokens or 0)
    est = estimate(settings.checkpoint_dir, settings.precision, max_seq_len,
                   workload=warm_up_workload(tokens, reference_s))
    from .planning.plan import gpu_capacity

    per_worker = math.ceil(measured / GIB * 10) / 10  # GiB, rounded up to 0.1
    expected = est.total_bytes - est.component("safety margin")  # the margin is a planning buffer, not a prediction
    return {"index": gpu.index, "name": gpu.name, "total_gib": round(gpu.total_gib, 2),
            "measured_bytes": measured, "measured_gib": round(measured / GIB, 3),
            "estimate_bytes": est.total_bytes, "estimate_gib": round(est.total_gib, 3),
            "expected_bytes": expected, "expected_gib": round(expected / GIB, 3),
            "expected_over_measured": round(expected / measured, 3) if measured > 0 else None,
            "model_memory_gb": per_worker if measured > 0 else None,
            "workers_at_measured": gpu_capacity(gpu.total_gib, per_worker, settings.memory_reserve) if measured > 0 else None,
            "tokens": tokens, "synthesis_seconds": record.synthesis_seconds, "seconds": round(seconds, 1),
            "throughput": throughput, "estimate": est.to_dict()}


def measure(gpus: list[GPU], settings: Settings, max_seq_len: int) -> list[dict[str, Any]]:
    """One measurement per GPU model among `gpus` (the first GPU of each name)."""
    firsts: dict[str, GPU] = {}
    for g in gpus:
        firsts.setdefault(g.name, g)
    out = []
    for g in firsts.values():
        log.info("[Measure] GPU %d %s: starting one worker and a warm-up segment...", g.index, g.name)
        out.append(measure_gpu(g, settings, max_seq_len))
    return out


def measure_lines(results: list[dict[str, Any]]) -> list[str]:
    lines = []
    for r in results:
        if "error" in r:
            lines.append(f"[Measure] GPU {r['index']} {r['name']}: {r['error']}")
            continue
        ratio = r["expected_over_measured"]
        lines.append(f"[Measure] GPU {r['index']} {r['name']}: one worker takes {r['measured_gib']:.2f} GB (NVML free "
                     f"memory drop after a {r['tokens']}-frame warm-up, CUDA context included); the estimate for the "
                     f"same work is {r['expected_gib']:.2f} GB before its safety margin"
                     + (f" ({ratio:.2f}x the measurement)" if ratio else "") + f", {r['estimate_gib']:.2f} GB with it")
        if r.get("model_memory_gb"):
            lines.append(f"[Measure] GPU {r['index']}: for segments like the warm-up, FISH_MODEL_MEMORY_GB="
                         f"{r['model_memory_gb']:.1f} runs {r['workers_at_measured']} workers on this GPU "
                         f"({r['total_gib']:.2f} GB, FISH_MEMORY_RESERVE kept); longer outputs need more (plan --explain)")
        for t in r.get("throughput", []):
            lines.append(f"[Measure] GPU {r['index']}: {t['rows']} row(s) decode {t['frames_per_s'] or 0:.1f} frames/s "
                         f"per worker ({t['measured_gib']:.2f} GB measured); kept for plan --explain")
        for c in r["estimate"]["components"]:
            lines.append(f"[Measure]   {c['name']:<16} {c['gib']:7.3f} GB")
    return lines
