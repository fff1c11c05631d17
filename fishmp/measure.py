"""`plan --measure`: one real worker per GPU model present, its real footprint next to the estimate.

Per GPU model (the first GPU of each name): NVML free memory before, a Pool with a one-slot plan on that GPU (the
worker is a child process: the CUDA context is its own, and this process never imports torch), one warm-up segment
on a synthetic 10 s reference, NVML free memory again while the worker is still alive. The drop is the worker's real
footprint: weights, caches, the caching allocator's reserve after the warm-up's peak, and the CUDA context.
The estimate beside it is computed for the same work (the warm-up's reference, prompt and generated frames).
No GPU: nothing to measure; the command says so and exits 0.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from typing import Any

from .config import Settings
from .gpus import GIB, GPU
from .memory import Workload, estimate

log = logging.getLogger("fishmp")

REFERENCE_S = 10.0
TEXT = "The quick brown fox jumps over the lazy dog while the orchestra tunes its instruments."
NEW_TOKENS = 200  # S1-mini decodes ~15 frames/s eager on a big GPU: a warm-up of about 15 s


def nvml_free_bytes(index: int) -> int:
    import pynvml

    pynvml.nvmlInit()
    try:
        return int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index)).free)
    finally:
        pynvml.nvmlShutdown()


def _warm_up_job(tmp: str, reference_s: float, new_tokens: int) -> dict[str, Any]:
    import soundfile as sf

    from .demo import speech_like

    ref = os.path.join(tmp, "reference.wav")
    sf.write(ref, speech_like(reference_s, 44100, 140.0, seed=1), 44100)
    return {"speakers": {"ref": {"reference_audio": ref, "reference_text": "A synthetic reference voice."}},
            "segments": [{"id": "warm-up", "speaker": "ref", "text": TEXT}],
            "params": {"max_new_tokens": new_tokens, "seed": 0}}


def measure_gpu(gpu: GPU | None, settings: Settings, max_seq_len: int, reference_s: float = REFERENCE_S,
                new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    """Start one worker on `gpu`, run the warm-up, return the NVML drop and the estimate for the same work.
    `gpu=None` runs the same worker on the CPU (no NVML figure): the path tests can take without a GPU."""
    from .api import Pool
    from .plan import GpuPlan, Plan

    if gpu is None:
        gpu = GPU(-1, "cpu", 0.0, 0.0)
        plan = Plan(mode="cpu", gpus=(), cpu_workers=1)
    else:
        available = gpu.total_gib * (1 - settings.memory_reserve)
        plan = Plan(mode="multiprocess", gpus=(GpuPlan(gpu, available, 1, 1),), cpu_workers=0)
    free = (lambda: 0) if gpu.index < 0 else (lambda: nvml_free_bytes(gpu.index))
    with tempfile.TemporaryDirectory(prefix="fishmp-measure-") as tmp:
        run_settings = settings.replace(max_seq_len=max_seq_len, multiprocess_mode="true", max_restarts=0,
                                        cache_dir=os.path.join(tmp, "cache"), segment_timeout_s=600.0)
        job = _warm_up_job(tmp, reference_s, new_tokens)
        before = free()
        start = time.monotonic()
        with Pool(run_settings, plan=plan) as pool:
            result = pool.generate(job, output_dir=os.path.join(tmp, "out"), resume=False)
            after = free()  # the worker is still alive, its allocator's reserve held
        seconds = time.monotonic() - start
    record = result.records.get("warm-up")
    if record is None or record.status != "done":
        why = (record.error if record else None) or result.error or "no result"
        return {"index": gpu.index, "name": gpu.name, "error": f"the warm-up segment failed: {why}"}
    tokens = int(record.tokens or 0)
    prompt = int(reference_s * 44100 / 2048) + 1 + len(TEXT) + 64 + len("A synthetic reference voice.")
    est = estimate(settings.checkpoint_dir, settings.precision, max_seq_len,
                   workload=Workload(reference_s=reference_s, prompt_tokens=prompt, new_tokens=max(tokens, 1)))
    measured = before - after
    from .plan import gpu_capacity

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
            "estimate": est.to_dict()}


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
        for c in r["estimate"]["components"]:
            lines.append(f"[Measure]   {c['name']:<16} {c['gib']:7.3f} GB")
    return lines
