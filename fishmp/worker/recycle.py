"""Worker recycling (issue 15): when a worker has finished FISH_WORKER_MAX_SEGMENTS segments, or its memory grew by
more than FISH_WORKER_MAX_GROWTH_GB since warm-up, it drains (finishes its rows, takes no new ones), says `Leaving`
and exits 0, and the main process starts a fresh one in its slot without charging the slot's restart budget.

Why: upstream fish-speech's long-lived (compiled) workers grow in memory; a fresh process costs one model load.
Warm-up = the worker's first finished segment: the memory seen then (caches, CUDA context, compiled graphs, the
allocator's pools) is the baseline, and growth is measured from it. The memory is the worker's own: CUDA memory
reserved by torch's allocator on a GPU worker whose engine uses torch, else the process's resident set (RSS).

RecyclePolicy is pure (numbers in, a reason out); read_memory is the only part that looks at the process.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from ..planning.gpus import GIB


def engine_memory_kind(engine: Any) -> str:
    """'cuda' for an engine on a GPU (its growth is the allocator's), 'rss' otherwise (the CPU, the test engine)."""
    device = str(getattr(engine, "device", "cpu"))
    return "cuda" if device.startswith("cuda") and getattr(engine, "name", "") != "synthetic" else "rss"


def rss_bytes() -> int | None:
    """This process's resident set, from /proc (Linux); None elsewhere."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def read_memory(kind: str) -> int | None:
    """The worker's memory in bytes for `kind`; None when it cannot be read (then no growth bound applies)."""
    if kind == "cuda":
        torch = sys.modules.get("torch")  # only ever already imported by the engine: never import it here
        try:
            if torch is not None and torch.cuda.is_initialized():
                return int(torch.cuda.memory_reserved())
        except Exception:  # noqa: BLE001 - a broken device: the engine reports it; recycling just stops measuring
            return None
        return None
    return rss_bytes()


@dataclass
class RecyclePolicy:
    """Decides when a worker should leave. `observe` is called after segments finish, with the running total."""

    max_segments: int | None = None
    max_growth_gib: float | None = None
    memory_kind: str = "rss"
    segments: int = 0
    baseline: int | None = None  # bytes at warm-up (the first finished segment)
    current: int | None = None
    reason: str | None = None  # set once: the worker is draining
    figures: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Any, memory_kind: str = "rss") -> RecyclePolicy:
        return cls(getattr(settings, "worker_max_segments", None), getattr(settings, "worker_max_growth_gb", None),
                   memory_kind)

    @property
    def enabled(self) -> bool:
        return self.max_segments is not None or self.max_growth_gib is not None

    def observe(self, finished: int, memory: int | None = None) -> str | None:
        """Count `finished` more segments; `memory` (bytes, or None) is the worker's memory now. Returns the reason
        to leave the first time a bound is reached, else None."""
        self.segments += finished
        if memory is not None and self.segments > 0:
            if self.baseline is None:
                self.baseline = memory
            self.current = memory
        if self.reason is not None or not self.enabled:
            return None
        if self.max_segments is not None and self.segments >= self.max_segments:
            self.reason = f"finished {self.segments} segments (FISH_WORKER_MAX_SEGMENTS={self.max_segments})"
        elif self.max_growth_gib is not None and self.growth_gib() is not None \
                and self.growth_gib() > self.max_growth_gib:  # type: ignore[operator]
            what = "GPU memory reserved" if self.memory_kind == "cuda" else "RSS"
            self.reason = (f"{what} grew by {self.growth_gib():.2f} GiB since warm-up ({self.baseline / GIB:.2f} -> "
                           f"{self.current / GIB:.2f} GiB; FISH_WORKER_MAX_GROWTH_GB={self.max_growth_gib:g})")
        else:
            return None
        self.figures = self.snapshot()
        return self.reason

    def growth_gib(self) -> float | None:
        if self.baseline is None or self.current is None:
            return None
        return (self.current - self.baseline) / GIB

    def snapshot(self) -> dict[str, Any]:
        growth = self.growth_gib()
        return {"segments": self.segments, "memory_kind": self.memory_kind,
                "baseline_gib": None if self.baseline is None else round(self.baseline / GIB, 4),
                "current_gib": None if self.current is None else round(self.current / GIB, 4),
                "growth_gib": None if growth is None else round(growth, 4),
                "max_segments": self.max_segments, "max_growth_gb": self.max_growth_gib}
