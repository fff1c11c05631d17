"""The worker plan: how many model-loaded workers each GPU holds. Pure: no processes, no torch, no NVML.

Per GPU: workers = floor(total GiB x (1 - FISH_MEMORY_RESERVE) / FISH_MODEL_MEMORY_GB), at least 1 (with a warning
when even one does not fit), then capped by the memory free right now, by FISH_MAX_WORKERS and by the job's size.
Caps are applied by dealing workers out one GPU at a time, so GPUs are spread across before any gets a second worker.
With FISH_BATCH_SIZE = B > 1 each worker decodes B rows at once: a worker then costs FISH_MODEL_MEMORY_GB (still the
memory of one worker at batch 1, as in the guide) plus (B - 1) KV-cache rows. All arithmetic is O(GPUs), not O(workers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..config import Settings
from .gpus import GPU

AUTO = "auto"  # FISH_MODEL_MEMORY_GB=auto
# Guards floor() against float noise: 80 x 0.9 / 8 must be 9, not 8.999999.
_EPS = 1e-9
# One batch row's KV cache when the checkpoint is not at hand: S1-mini (28 layers x 2 x 8 kv heads x 128 x bf16 =
# 114,688 bytes per token) at its full 8192 tokens, plus its 4 fast layers; fishmp.planning.memory gives the exact figure.
DEFAULT_ROW_GIB = (114_688 * 8192 + 4 * 2 * 10 * 8 * 128 * 2) / 1024**3


@dataclass(frozen=True)
class GpuPlan:
    gpu: GPU
    available_gib: float  # total x (1 - reserve): what the formula divides
    capacity: int  # workers the memory formula allows ("Can run N workers")
    workers: int  # workers this plan actually starts here
    rows: int = 1  # sequences each worker decodes at once (FISH_BATCH_SIZE)
    worker_gib: float = 0.0  # what one worker of `rows` rows is planned to take; 0: not known yet (auto, measuring)


@dataclass(frozen=True)
class Plan:
    mode: str  # "multiprocess": GPU workers in child processes; "cpu": CPU workers in child processes; "single": one in-process
    gpus: tuple[GpuPlan, ...]
    cpu_workers: int
    warnings: tuple[str, ...] = field(default=())

    @property
    def workers(self) -> int:
        return self.cpu_workers + sum(g.workers for g in self.gpus)

    @property
    def in_process(self) -> bool:
        return self.mode == "single"

    def slots(self) -> list[tuple[str, str | None]]:
        """One (device label, CUDA_VISIBLE_DEVICES pin) per worker, GPUs interleaved so early workers spread out."""
        per_gpu = [[(f"cuda:{g.gpu.index}", g.gpu.pin)] * g.workers for g in self.gpus]
        out: list[tuple[str, str | None]] = []
        for i in range(max((len(p) for p in per_gpu), default=0)):
            out.extend(p[i] for p in per_gpu if i < len(p))
        return out + [("cpu", None)] * self.cpu_workers

    def to_dict(self) -> dict:
        return {
            "workers": self.workers,
            "mode": self.mode,
            "cpu_workers": self.cpu_workers,
            "gpus": [
                {"index": g.gpu.index, "name": g.gpu.name, "uuid": g.gpu.uuid, "total_gib": round(g.gpu.total_gib, 2),
                 "free_gib": round(g.gpu.free_gib, 2), "available_gib": round(g.available_gib, 2),
                 "capacity": g.capacity, "workers": g.workers, "rows": g.rows,
                 "worker_gib": round(g.worker_gib, 3)}
                for g in self.gpus
            ],
            "warnings": list(self.warnings),
        }


def gpu_capacity(total_gib: float, model_memory_gb: float, reserve: float) -> int:
    """The guide's formula, without the 'at least 1' floor."""
    return math.floor(total_gib * (1 - reserve) / model_memory_gb + _EPS)


def _deal(limits: list[int], total: int, base: list[int] | None = None) -> list[int]:
    """Deal `total` workers one at a time to the GPU with the fewest so far that still has room (spread first; ties:
    the GPU with the larger limit, then the lower index), starting from `base` workers already running on each
    (FISH_MODEL_MEMORY_GB=auto's first workers; their limit is at least that). Computed by water-filling in
    O(GPUs log GPUs): every GPU gets clamp(level, base, limit) for the highest level that fits, the rest go one each
    in the tie order."""
    n = len(limits)
    base = base or [0] * n
    limits = [max(x, b) for x, b in zip(limits, base, strict=True)]
    total = max(sum(base), min(total, sum(limits)))
    if total == 0:
        return [0] * n

    def at(level: int) -> list[int]:
        return [min(x, max(b, level)) for x, b in zip(limits, base, strict=True)]

    lo, hi = 0, max(limits)  # highest level with sum(clamp(level)) <= total
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if sum(at(mid)) <= total:
            lo = mid
        else:
            hi = mid - 1
    got = at(lo)
    rest = total - sum(got)
    for i in sorted((i for i in range(n) if limits[i] > lo and got[i] == lo), key=lambda k: (-limits[k], k))[:rest]:
        got[i] += 1
    return got


def worker_gib(model_memory_gb: float, rows: int, row_gib: float) -> float:
    """One worker decoding `rows` sequences: the batch-1 worker plus one KV-cache row per extra sequence."""
    return model_memory_gb + (rows - 1) * row_gib


def is_auto(settings: Settings) -> bool:
    """FISH_MODEL_MEMORY_GB=auto: measure one worker per GPU after its warm-up, then fill (fishmp/running/autofill.py)."""
    return getattr(settings, "model_memory_gb", None) == AUTO


def make_plan(gpus: list[GPU], settings: Settings, n_segments: int | None = None,
              row_gib: float | None = None) -> Plan:
    """`row_gib`: one batch row's KV cache (fishmp.planning.memory.Estimate.kv_row_bytes); S1-mini's when not given.
    FISH_MODEL_MEMORY_GB=auto: one worker per GPU (its start plan; fill_plan makes the full one once it measured)."""
    if is_auto(settings) and gpus:
        return _plan(gpus, settings, n_segments, row_gib, dict.fromkeys((g.index for g in gpus), None))
    return _plan(gpus, settings, n_segments, row_gib, None)


def fill_plan(start: Plan, measured_gib: Mapping[int, float | None], settings: Settings, n_segments: int | None = None,
              row_gib: float | None = None) -> Plan:
    """FISH_MODEL_MEMORY_GB=auto, once the start plan's workers measured themselves: each GPU holds as many workers
    of `measured_gib[index]` (one worker at batch 1, as FISH_MODEL_MEMORY_GB means) plus their batch rows as fit with
    FISH_MEMORY_RESERVE kept (and in the memory that was free before our first worker started), capped by
    FISH_MAX_WORKERS and the job's segments, spread across GPUs, never fewer than the start plan runs there.
    A GPU without a figure (None, or absent: its first worker never measured) keeps the workers it has."""
    gpus = [g.gpu for g in start.gpus]
    per_gpu = {g.gpu.index: (measured_gib.get(g.gpu.index) if measured_gib.get(g.gpu.index) else None)
               for g in start.gpus}
    plan = _plan(gpus, settings, n_segments, row_gib, per_gpu, base=[g.workers for g in start.gpus])
    return dataclasses.replace(plan, warnings=tuple(w for w in plan.warnings if "FISH_MODEL_MEMORY_GB=auto" not in w))


def _plan(gpus: list[GPU], settings: Settings, n_segments: int | None, row_gib: float | None,
          per_gpu: Mapping[int, float | None] | None, base: list[int] | None = None) -> Plan:
    """`per_gpu`: None = FISH_MODEL_MEMORY_GB for every GPU; else each GPU's own batch-1 GiB, where None means
    "not measured": one worker (auto's start), or the `base` it already runs (fill)."""
    warnings: list[str] = []
    rows = int(getattr(settings, "batch_size", 1) or 1)
    row = DEFAULT_ROW_GIB if row_gib is None else row_gib
    reserve = settings.memory_reserve
    single = settings.multiprocess_mode == "false"
    cap_total = settings.max_workers
    if n_segments is not None:
        cap_total = min(cap_total or n_segments, max(n_segments, 1))
    if single:
        cap_total = 1

    if not gpus:
        n = min(settings.cpu_workers, cap_total or settings.cpu_workers)
        mode = "single" if single else "cpu"
        return Plan(mode=mode, gpus=(), cpu_workers=n, warnings=tuple(warnings))

    limits, plans_pre = [], []
    for i, g in enumerate(gpus):
        available = g.total_gib * (1 - reserve)
        one = settings.model_memory_gb if per_gpu is None else per_gpu.get(g.index)
        if one is None:  # auto, not measured (yet): the workers it runs, or one to measure
            keep = base[i] if base else 1
            if not base:
                warnings.append(f"[GPU {g.index}] FISH_MODEL_MEMORY_GB=auto: " + (
                    "one in-process worker, not measured (FISH_MULTIPROCESS_MODE=false)" if single else
                    "1 worker first; once it has measured itself after a warm-up segment, as many more as fit"))
            limits.append(keep)
            plans_pre.append((g, available, keep, 0.0))
            continue
        mem = worker_gib(one, rows, row)
        capacity = gpu_capacity(g.total_gib, mem, reserve)
        if capacity < 1:
            what = "FISH_MODEL_MEMORY_GB" if per_gpu is None else "the measured worker"
            warnings.append(
                f"[GPU {g.index}] {available:.2f} GB available is less than "
                + (f"{what}={mem:g}" if rows == 1 else
                   f"one worker of {rows} rows ({mem:.2f} GB: {what}={one:g} + {rows - 1} KV-cache rows)")
                + ": running 1 worker anyway; it may run out of memory")
            capacity = 1
        free_cap = math.floor(g.free_gib / mem + _EPS)
        limit = capacity
        if free_cap < capacity:
            limit = max(free_cap, 0)
            warnings.append(
                f"[GPU {g.index}] only {g.free_gib:.2f} GB free now (other processes hold the rest): "
                f"{limit} worker(s) instead of {capacity}")
        limits.append(limit)
        plans_pre.append((g, available, capacity, mem))
    if sum(limits) == 0:  # every GPU is busy: still try one worker on the one with most free memory
        best = max(range(len(gpus)), key=lambda i: gpus[i].free_gib)
        limits[best] = 1
        warnings.append(f"[GPU {gpus[best].index}] no GPU has room for a full worker: trying 1 worker there")
    total = sum(limits) if cap_total is None else min(sum(limits), cap_total)
    dealt = _deal(limits, total, base)
    gpu_plans = tuple(GpuPlan(g, available, capacity, w, rows, mem)
                      for (g, available, capacity, mem), w in zip(plans_pre, dealt, strict=True))
    mode = "single" if single else "multiprocess"
    return Plan(mode=mode, gpus=gpu_plans, cpu_workers=0, warnings=tuple(warnings))


@dataclass(frozen=True)
class Alternative:
    workers: int
    rows: int  # per worker
    worker_gib: float  # memory of one such worker

    @property
    def total_rows(self) -> int:
        return self.workers * self.rows

    @property
    def total_gib(self) -> float:
        return self.workers * self.worker_gib


def alternatives(available_gib: float, model_memory_gb: float, row_gib: float, max_rows: int = 256,
                 limit: int = 8) -> list[Alternative]:
    """Ways to fill `available_gib`: for k workers, the most rows each (up to `max_rows`) that fit beside k models.
    At most `limit` worker counts (1, 2, ... and the largest), so even a huge GPU costs O(limit)."""
    most = gpu_capacity(available_gib, model_memory_gb, 0.0)
    if most < 1:
        return []
    counts = sorted({*range(1, min(most, limit - 1) + 1), most})
    out = []
    for k in counts:
        spare = available_gib / k - model_memory_gb
        rows = min(max_rows, 1 + (math.floor(spare / row_gib + _EPS) if row_gib > 0 else max_rows))
        out.append(Alternative(k, max(rows, 1), worker_gib(model_memory_gb, max(rows, 1), row_gib)))
    return out


def memory_check(plan: Plan, estimate_gib: float, row_gib: float = 0.0) -> list[str]:
    """Before loading anything: each GPU whose available memory cannot hold even one worker by the estimate
    (`estimate_gib` at batch 1, plus `row_gib` per extra row)."""
    problems = []
    for g in plan.gpus:
        need = estimate_gib + (g.rows - 1) * row_gib
        room = min(g.available_gib, g.gpu.free_gib)
        if need > room:
            problems.append(
                f"[GPU {g.gpu.index}] {g.gpu.name}: one worker needs about {need:.2f} GB by the estimate, "
                f"{room:.2f} GB is available ({g.gpu.total_gib:.2f} GB total, {g.gpu.free_gib:.2f} GB free, "
                f"reserve kept): short by {need - room:.2f} GB")
    return problems


def plan_log_lines(plan: Plan) -> list[str]:
    """The lines users of the original guide know how to read, in its wording."""
    lines: list[str] = []
    for g in plan.gpus:
        lines.append(f"[GPU {g.gpu.index}] {g.gpu.name}, Total Memory: {g.gpu.total_gib:.2f} GB")
        if g.worker_gib:
            lines.append(f"[GPU {g.gpu.index}] Can run {g.capacity} workers (Available: {g.available_gib:.2f} GB)")
        else:  # FISH_MODEL_MEMORY_GB=auto before the measurement
            lines.append(f"[GPU {g.gpu.index}] Can run ? workers until one has measured itself (Available: "
                         f"{g.available_gib:.2f} GB)")
    lines.extend(plan.warnings)
    if plan.gpus:
        used = [g for g in plan.gpus if g.workers]
        lines.append(f"[Main] Using {plan.workers} parallel workers across {len(used)} GPU(s)")
        per = "" if all(g.rows == 1 for g in used) else " x {} rows"
        lines.extend(f"[Main] GPU {g.gpu.index}: {g.workers} workers" + per.format(g.rows) for g in used)
    else:
        lines.append(f"[Main] No usable GPU: using {plan.cpu_workers} worker(s) on the CPU")
    if plan.in_process:
        lines.append("[Main] Single-process mode: the model runs in this process")
    return lines
