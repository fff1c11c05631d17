"""The worker plan: how many model-loaded workers each GPU holds. Pure: no processes, no torch, no NVML.

Per GPU: workers = floor(total GiB x (1 - FISH_MEMORY_RESERVE) / FISH_MODEL_MEMORY_GB), at least 1 (with a warning
when even one does not fit), then capped by the memory free right now, by FISH_MAX_WORKERS and by the job's size.
Caps are applied by dealing workers out one GPU at a time, so GPUs are spread across before any gets a second worker.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .config import Settings
from .gpus import GPU

# Guards floor() against float noise: 80 x 0.9 / 8 must be 9, not 8.999999.
_EPS = 1e-9


@dataclass(frozen=True)
class GpuPlan:
    gpu: GPU
    available_gib: float  # total x (1 - reserve): what the formula divides
    capacity: int  # workers the memory formula allows ("Can run N workers")
    workers: int  # workers this plan actually starts here


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
                 "capacity": g.capacity, "workers": g.workers}
                for g in self.gpus
            ],
            "warnings": list(self.warnings),
        }


def gpu_capacity(total_gib: float, model_memory_gb: float, reserve: float) -> int:
    """The guide's formula, without the 'at least 1' floor."""
    return math.floor(total_gib * (1 - reserve) / model_memory_gb + _EPS)


def _deal(limits: list[int], total: int) -> list[int]:
    """Deal `total` workers one at a time to the GPU with the fewest so far that still has room (spread first)."""
    got = [0] * len(limits)
    for _ in range(total):
        open_ = [i for i in range(len(limits)) if got[i] < limits[i]]
        if not open_:
            break
        i = min(open_, key=lambda k: (got[k], -limits[k], k))
        got[i] += 1
    return got


def make_plan(gpus: list[GPU], settings: Settings, n_segments: int | None = None) -> Plan:
    warnings: list[str] = []
    mem, reserve = settings.model_memory_gb, settings.memory_reserve
    single = settings.multiprocess_mode == "false"
    cap_total = settings.max_workers
    if n_segments is not None:
        cap_total = min(cap_total or n_segments, max(n_segments, 1))
    if single:
        cap_total = 1

    if not gpus:
        n = min(settings.cpu_workers, cap_total or settings.cpu_workers)
        mode = "single" if single or (n == 1 and settings.multiprocess_mode == "auto") else "cpu"
        return Plan(mode=mode, gpus=(), cpu_workers=n, warnings=tuple(warnings))

    limits, plans_pre = [], []
    for g in gpus:
        available = g.total_gib * (1 - reserve)
        capacity = gpu_capacity(g.total_gib, mem, reserve)
        if capacity < 1:
            warnings.append(
                f"[GPU {g.index}] {available:.2f} GB available is less than FISH_MODEL_MEMORY_GB={mem:g}: "
                "running 1 worker anyway; it may run out of memory")
            capacity = 1
        free_cap = math.floor(g.free_gib / mem + _EPS)
        limit = capacity
        if free_cap < capacity:
            limit = max(free_cap, 0)
            warnings.append(
                f"[GPU {g.index}] only {g.free_gib:.2f} GB free now (other processes hold the rest): "
                f"{limit} worker(s) instead of {capacity}")
        limits.append(limit)
        plans_pre.append((g, available, capacity))
    if sum(limits) == 0:  # every GPU is busy: still try one worker on the one with most free memory
        best = max(range(len(gpus)), key=lambda i: gpus[i].free_gib)
        limits[best] = 1
        warnings.append(f"[GPU {gpus[best].index}] no GPU has room for a full worker: trying 1 worker there")
    total = sum(limits) if cap_total is None else min(sum(limits), cap_total)
    dealt = _deal(limits, total)
    gpu_plans = tuple(GpuPlan(g, available, capacity, w) for (g, available, capacity), w in zip(plans_pre, dealt, strict=True))
    mode = "single" if single or (total == 1 and settings.multiprocess_mode == "auto") else "multiprocess"
    return Plan(mode=mode, gpus=gpu_plans, cpu_workers=0, warnings=tuple(warnings))


def plan_log_lines(plan: Plan) -> list[str]:
    """The lines users of the original guide know how to read, in its wording."""
    lines: list[str] = []
    for g in plan.gpus:
        lines.append(f"[GPU {g.gpu.index}] {g.gpu.name}, Total Memory: {g.gpu.total_gib:.2f} GB")
        lines.append(f"[GPU {g.gpu.index}] Can run {g.capacity} workers (Available: {g.available_gib:.2f} GB)")
    lines.extend(plan.warnings)
    if plan.gpus:
        used = [g for g in plan.gpus if g.workers]
        lines.append(f"[Main] Using {plan.workers} parallel workers across {len(used)} GPU(s)")
        lines.extend(f"[Main] GPU {g.gpu.index}: {g.workers} workers" for g in used)
    else:
        lines.append(f"[Main] No usable GPU: using {plan.cpu_workers} worker(s) on the CPU")
    if plan.in_process:
        lines.append("[Main] Single-process mode: the model runs in this process")
    return lines
