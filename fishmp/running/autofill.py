"""FISH_MODEL_MEMORY_GB=auto: fill each GPU once its first worker has measured itself. Main process, no torch.

The start plan (fishmp.planning.plan.make_plan under auto) runs one worker per GPU. Each, after loading, runs `plan --measure`'s
warm-up segment and sends its footprint in its Ready (fishmp.worker.footprint.FootprintProbe: the NVML free-memory drop on its
GPU, CUDA context and the allocator's reserve included; on a simulated GPU the synthetic engine's
FISH_SYNTHETIC_FOOTPRINT_GB). When every GPU that is still starting a first worker has reported, the job loop calls
`on_ready`, which plans with the measured figures (fishmp.planning.plan.fill_plan) and starts the extra workers
(WorkerPool.grow). The first workers keep running: their model is not loaded twice.

What a worker is planned to take: the measurement, plus what the estimate (fishmp.planning.memory) says the longest work
needs beyond the warm-up's (10 s reference, ~200 frames): activations grow with the segment, and a GPU filled by the
warm-up alone would run out of memory on a long one. The longest work is the running jobs' (their longest reference
audio, their largest max_new_tokens; 1024 when unset), or `plan --explain`'s defaults (30 s, 1024 frames) when no job
runs (a library pool filled before its first job).
A worker that could not measure (no NVML) is planned with the estimate, or FISH_MODEL_MEMORY_GB's default 8.0.
Local workers only: FISH_BACKEND=ray refuses auto (fishmp.config).
"""

from __future__ import annotations

import logging
import math
import weakref
from dataclasses import dataclass, field
from typing import Any

from ..config import MODEL_MEMORY_GB_RANGE, Settings
from ..planning.gpus import GIB
from ..planning.plan import fill_plan, is_auto, plan_log_lines

log = logging.getLogger("fishmp")
FALLBACK_GB = 8.0  # FISH_MODEL_MEMORY_GB's default, when neither a measurement nor the estimate is at hand


@dataclass
class _State:
    measured: dict[int, Any] = field(default_factory=dict)  # GPU index -> fishmp.worker.footprint.Footprint
    done: bool = False


_STATES: weakref.WeakKeyDictionary[Any, _State] = weakref.WeakKeyDictionary()


def _gpu_index(device: str) -> int | None:
    return int(device.split(":", 1)[1]) if device.startswith("cuda:") and device[5:].isdigit() else None


def _ceil_tenth(gib: float) -> float:
    return math.ceil(gib * 10 - 1e-9) / 10


@dataclass(frozen=True)
class LongestWork:
    reference_s: float = 30.0  # plan --explain's defaults: the worst case fishmp allows
    new_tokens: int = 1024

    def describe(self) -> str:
        return f"{self.reference_s:.0f} s references and {self.new_tokens}-frame outputs"


def longest_work(jobs: list[Any]) -> LongestWork:
    """The longest reference audio and max_new_tokens of these jobs (fishmp.job.Job); the defaults without jobs."""
    if not jobs:
        return LongestWork()
    import soundfile as sf

    seconds, frames = 0.0, 0
    for job in jobs:
        for sp in job.speakers.values():
            if sp.reference_audio and not sp.prompt_tokens:
                try:
                    seconds = max(seconds, float(sf.info(sp.reference_audio).duration))
                except Exception:  # noqa: BLE001 - unreadable: its segments fail with its name, not here
                    seconds = max(seconds, LongestWork.reference_s)
        for seg in job.segments:
            frames = max(frames, seg.params.max_new_tokens or LongestWork.new_tokens)
    return LongestWork(round(seconds, 1), frames or LongestWork.new_tokens)


def long_work_extra_gib(settings: Settings, frames: int, work: LongestWork | None = None) -> float:
    """What the estimate adds for `work` (default: 30 s references, 1024 frames) over the warm-up's (`frames`);
    0 without a readable Fish checkpoint (the synthetic engine), never below 0."""
    if settings.engine != "fish":
        return 0.0
    from ..planning.explain import estimate_for
    from ..planning.memory import CheckpointReadError, estimate
    from ..planning.warmup import warm_up_workload

    work = work or LongestWork()
    try:
        worst = estimate_for(settings, work.reference_s, work.new_tokens)
        seq = worst.max_seq_len
        warm = estimate(settings.checkpoint_dir, settings.precision, seq, workload=warm_up_workload(frames))
    except (CheckpointReadError, OSError):
        return 0.0
    margin = worst.component("safety margin") - warm.component("safety margin")
    return max(0.0, (worst.total_bytes - warm.total_bytes - margin) / GIB)


def fallback_gib(settings: Settings) -> tuple[float, str]:
    """The figure for a GPU whose worker could not measure: the estimate, else the default."""
    if settings.engine == "fish":
        from ..planning.explain import auto_model_memory_gb
        from ..planning.memory import CheckpointReadError

        try:
            return auto_model_memory_gb(settings), "the estimate"
        except (CheckpointReadError, OSError):
            pass
    return FALLBACK_GB, "FISH_MODEL_MEMORY_GB's default"


def planned_gib(settings: Settings, footprint: Any, work: LongestWork | None = None) -> tuple[float, str]:
    """(GiB one worker at batch 1 is planned to take, the log line's explanation) from its Footprint."""
    if not footprint.bytes:
        gib, what = fallback_gib(settings)
        return gib, f"could not measure ({footprint.source}): planning {gib:.1f} GB per worker, {what}"
    measured = footprint.bytes / GIB
    work = work or LongestWork()
    extra = long_work_extra_gib(settings, footprint.frames, work)
    gib = min(max(_ceil_tenth(measured + extra), MODEL_MEMORY_GB_RANGE[0]), MODEL_MEMORY_GB_RANGE[1])
    how = (f"measured one worker: {measured:.2f} GB ({footprint.source}, after a {footprint.frames}-frame warm-up, "
           f"CUDA context included); planning {gib:.1f} GB per worker at batch 1")
    if extra:
        how += f" (+{extra:.2f} GB the estimate adds for {work.describe()})"
    return gib, how


def _remaining_segments(service: Any) -> int | None:
    """Segments the running jobs have left (never more workers than that); None when no job runs (a library pool)."""
    left = [len(j._run.sched.tasks) - len(j._run.sched.finished) for j in service.active
            if getattr(j._run, "sched", None) is not None]
    return sum(left) if left else None


def _still_measuring(workers: Any, index: int) -> bool:
    """A first worker on this GPU is loading (or its replacement is): its figure will come."""
    return any(h.live and h.device == f"cuda:{index}" for h in workers.handles.values())


def on_ready(service: Any, h: Any, msg: Any) -> list[Any]:
    """The job loop's hook for every Ready: under auto, record the worker's footprint and, once each GPU has one,
    grow the pool. Returns the workers started (none until then, and none after the fill)."""
    workers = service.workers
    footprint = getattr(msg, "footprint", None)
    index = _gpu_index(h.device)
    if footprint is None or index is None or not is_auto(workers.settings) or not hasattr(workers, "grow"):
        return []
    state = _STATES.setdefault(workers, _State())
    if state.done:
        return []
    state.measured[index] = footprint
    if any(g.workers and g.gpu.index not in state.measured and _still_measuring(workers, g.gpu.index)
           for g in workers.plan.gpus):
        return []
    state.done = True
    return fill(service, state.measured)


def fill(service: Any, measured: dict[int, Any]) -> list[Any]:
    """Plan every GPU by its figure, log it in the plan's `[GPU n]` lines, start the extra workers."""
    workers = service.workers
    settings = workers.settings
    per_gpu: dict[int, float | None] = {}
    work = longest_work([j._run.job for j in service.active if getattr(j._run, "job", None) is not None])
    for index, footprint in sorted(measured.items()):
        per_gpu[index], how = planned_gib(settings, footprint, work)
        log.info("[GPU %d] %s", index, how)
    row_gib = _row_gib(settings)
    plan = fill_plan(workers.plan, per_gpu, settings, _remaining_segments(service), row_gib)
    for line in plan_log_lines(plan):
        log.info(line)
    fixed = settings.replace(model_memory_gb=max(v for v in per_gpu.values() if v is not None))
    return workers.grow(plan, fixed)


def _row_gib(settings: Settings) -> float | None:
    """The checkpoint's exact KV row (as the start plan used), or None: S1-mini's."""
    if settings.engine != "fish":
        return None
    from ..planning.explain import estimate_for
    from ..planning.memory import CheckpointReadError

    try:
        return estimate_for(settings).kv_row_bytes / GIB
    except (CheckpointReadError, OSError):
        return None
