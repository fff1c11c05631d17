"""`plan --explain`: the memory estimate per component, what each GPU then holds, the workers x rows alternatives
and concrete suggestions. Pure: an Estimate (fishmp.planning.memory) and a Plan in, a dict and text lines out."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from ..config import Settings
from .memory import GIB, Estimate
from .plan import Alternative, Plan, alternatives, gpu_capacity, is_auto, memory_check, worker_gib

# Fish models have produced degenerate audio with GPU memory above ~90 % (sglang-omni #370): keep >= 10 % free.
MIN_RESERVE = 0.10


def _round_up(gib: float, step: float = 0.1) -> float:
    return math.ceil(gib / step - 1e-9) * step


def _alternatives(available: float, est_gib: float, row_gib: float, measured: dict[int, dict[str, Any]]) -> list[dict]:
    """The workers x rows ways to fill a GPU, plus one per row count `plan --measure` has a throughput for, each with
    that measured frames/s per worker where there is one."""
    alts = alternatives(available, est_gib, row_gib)
    for r in sorted(set(measured) - {a.rows for a in alts}):
        k = gpu_capacity(available, worker_gib(est_gib, r, row_gib), 0.0)
        if k >= 1:
            alts.append(Alternative(k, r, worker_gib(est_gib, r, row_gib)))
    alts.sort(key=lambda a: (a.workers, a.rows))
    return [{"workers": a.workers, "rows_each": a.rows, "total_rows": a.total_rows, "worker_gib": round(a.worker_gib, 2),
             "total_gib": round(a.total_gib, 2),
             "frames_per_s": measured.get(a.rows, {}).get("frames_per_s"),
             "measured_at": measured.get(a.rows, {}).get("measured_at")} for a in alts]


def explain(plan: Plan, est: Estimate, settings: Settings,
            variant: Callable[..., Estimate] | None = None,
            throughput: dict[str, dict[int, dict[str, Any]]] | None = None) -> dict[str, Any]:
    """Everything --explain shows, as JSON-ready data. `variant(precision=..., max_seq_len=..., new_tokens=...)`
    re-estimates with one thing changed, for the suggestions (None: no what-if suggestions). `throughput`: GPU name
    -> rows -> what `plan --measure` recorded (fishmp.planning.throughput.cached_throughput), shown next to the alternatives."""
    rows = int(getattr(settings, "batch_size", 1) or 1)
    est_gib, row_gib = est.total_gib, est.kv_row_bytes / GIB
    suggested = _round_up(est_gib)
    mem = suggested if is_auto(settings) else settings.model_memory_gb
    suggestions: list[str] = []
    gpus = []
    for g in plan.gpus:
        by_est = gpu_capacity(g.gpu.total_gib, est_gib + (rows - 1) * row_gib, settings.memory_reserve)
        by_suggested = gpu_capacity(g.gpu.total_gib, suggested + (rows - 1) * row_gib, settings.memory_reserve)
        used = g.workers * (est_gib + (g.rows - 1) * row_gib)
        gpus.append({
            "index": g.gpu.index, "name": g.gpu.name, "total_gib": round(g.gpu.total_gib, 2),
            "available_gib": round(g.available_gib, 2), "free_gib": round(g.gpu.free_gib, 2),
            "planned_workers": g.workers, "rows": g.rows, "workers_by_estimate": by_est,
            "estimated_use_gib": round(used, 2), "estimated_use_fraction": round(used / g.gpu.total_gib, 3),
            "alternatives": _alternatives(g.available_gib, est_gib, row_gib, (throughput or {}).get(g.gpu.name, {})),
        })
        if by_suggested > g.capacity:
            suggestions.append(f"[GPU {g.gpu.index}] FISH_MODEL_MEMORY_GB={suggested:.1f} (the estimate, rounded up) "
                               f"would run {by_suggested} workers instead of {g.capacity}")
        if used > g.available_gib + 1e-9:
            suggestions.append(f"[GPU {g.gpu.index}] the plan's {g.workers} worker(s) need about {used:.2f} GB by the "
                               f"estimate, more than the {g.available_gib:.2f} GB available: raise FISH_MODEL_MEMORY_GB to "
                               f"{suggested:.1f} or set FISH_MAX_WORKERS={max(by_est, 1)}")
    short = memory_check(plan, est_gib, row_gib)
    suggestions.extend(short)
    if variant is not None and (short or est_gib > mem):
        if settings.precision == "float32":
            lower = variant(precision="bfloat16")
            suggestions.append(f"FISH_PRECISION=bfloat16 needs {lower.total_gib:.2f} GB per worker instead of "
                               f"{est_gib:.2f} GB")
        if est.max_seq_len > 4096:
            shorter = variant(max_seq_len=4096)
            suggestions.append(f"FISH_MAX_SEQ_LEN=4096 (KV cache and mask for 4096 tokens instead of {est.max_seq_len}) "
                               f"needs {shorter.total_gib:.2f} GB per worker; the default 'auto' sizes it to each job")
    frames = est.details.get("workload", {}).get("new_tokens", 0)
    if variant is not None and (short or est_gib > mem) and frames > 512:
        fewer = variant(new_tokens=512)
        suggestions.append(f"segments of at most 512 frames (max_new_tokens=512, ~24 s of audio; the codec decodes a "
                           f"segment in one piece) need {fewer.total_gib:.2f} GB per worker instead of {est_gib:.2f} GB")
    if settings.memory_reserve < MIN_RESERVE:
        suggestions.append(f"FISH_MEMORY_RESERVE={settings.memory_reserve:g} keeps less than 10 % of each GPU free: Fish "
                           "models have produced degenerate audio above ~90 % GPU memory; 0.10 or more is safer")
    if not suggestions:
        suggestions.append(f"FISH_MODEL_MEMORY_GB={mem:g} covers the estimate ({est_gib:.2f} GB): nothing to change")
    return {"estimate": est.to_dict(), "model_memory_gb": mem, "rows": rows, "row_gib": round(row_gib, 3),
            "suggested_model_memory_gb": round(suggested, 1), "gpus": gpus, "suggestions": suggestions}


def explain_lines(data: dict[str, Any]) -> list[str]:
    """The human-readable form of explain()'s data, in the spirit of a memory calculator's report."""
    est = data["estimate"]
    lines = [f"[Memory] one worker, {est['precision']}, max_seq_len {est['max_seq_len']}, "
             f"{data['rows']} row(s) (checkpoint's own tensor sizes):"]
    width = max(len(c["name"]) for c in est["components"])
    for c in est["components"]:
        lines.append(f"[Memory]   {c['name']:<{width}} {c['bytes'] / GIB:7.3f} GB  {c['how']}")
    lines.append(f"[Memory]   {'total':<{width}} {est['total_gib']:7.3f} GB  (FISH_MODEL_MEMORY_GB is "
                 f"{data['model_memory_gb']:g}; one more batch row costs {data['row_gib']:.3f} GB of KV cache)")
    for g in data["gpus"]:
        lines.append(f"[Memory] GPU {g['index']} {g['name']}: {g['total_gib']:.2f} GB, {g['available_gib']:.2f} GB "
                     f"available, {g['free_gib']:.2f} GB free; the plan's {g['planned_workers']} worker(s) x "
                     f"{g['rows']} row(s) use about {g['estimated_use_gib']:.2f} GB "
                     f"({g['estimated_use_fraction']:.0%}); by the estimate it holds {g['workers_by_estimate']}")
        for a in g["alternatives"]:
            measured = (f"; measured {a['frames_per_s']:.1f} frames/s per worker at {a['rows_each']} rows "
                        f"(plan --measure, {a['measured_at']})" if a.get("frames_per_s") else "")
            lines.append(f"[Memory]   {a['workers']:>4} worker(s) x {a['rows_each']:>3} rows = {a['total_rows']:>4} rows,"
                         f" {a['worker_gib']:.2f} GB each, {a['total_gib']:.2f} GB in all{measured}")
    lines.extend(f"[Suggest] {s}" for s in data["suggestions"])
    return lines


def estimate_for(settings: Settings, reference_s: float = 30.0, new_tokens: int = 1024) -> Estimate:
    """The estimate for these settings' checkpoint, precision and max_seq_len ('auto' without a job: the checkpoint's),
    for a worker whose longest reference is `reference_s` and longest output `new_tokens` frames (fishmp's
    max_new_tokens default). Raises fishmp.planning.memory.CheckpointReadError naming what is missing."""
    from .memory import Workload, estimate

    seq = settings.max_seq_len if isinstance(settings.max_seq_len, int) else None
    return estimate(settings.checkpoint_dir, settings.precision, seq,
                    workload=Workload(reference_s=reference_s, new_tokens=new_tokens))


def auto_model_memory_gb(settings: Settings, reference_s: float = 30.0, new_tokens: int = 1024) -> float:
    """FISH_MODEL_MEMORY_GB from the estimate (rounded up to 0.1 GiB): what an 'auto' setting could plan with before
    any worker is started (the measured variant needs the pool; see the README)."""
    return round(_round_up(estimate_for(settings, reference_s, new_tokens).total_gib), 1)


def plan_settings(settings: Settings) -> tuple[Settings, str | None]:
    """What `plan` (which starts no worker) plans with: FISH_MODEL_MEMORY_GB=auto becomes the estimate, or stays
    auto (one worker per GPU) when the checkpoint cannot be read; with the line that says so."""
    if not is_auto(settings):
        return settings, None
    from .memory import CheckpointReadError

    if settings.engine == "fish":
        try:
            gb = auto_model_memory_gb(settings)
            return settings.replace(model_memory_gb=gb), (
                f"[Main] FISH_MODEL_MEMORY_GB=auto: planned here with the estimate, {gb:.1f} GB per worker; generate "
                "starts one worker per GPU, measures it after a warm-up segment and fills each GPU by the measurement")
        except (CheckpointReadError, OSError):
            pass
    return settings, ("[Main] FISH_MODEL_MEMORY_GB=auto: no estimate without the checkpoint; generate starts one "
                      "worker per GPU, measures it after a warm-up segment and fills each GPU by the measurement")
