"""Layer 6, backends: where workers run, two implementations of one worker-pool contract (`contract`).
May import: fishmp.config, fishmp.job, fishmp.planning, fishmp.engines, fishmp.worker.

`local` (local.WorkerPool, child processes on this machine) or `ray` (one Ray actor per worker, anywhere in a Ray
cluster: ray_pool.RayWorkerPool; `ray_actor` hosts the worker loop, `ray_placement` plans per node). Both give the
job loop the same interface, so the scheduler, retry policy, manifest and progress events are the same code. Ray is
imported only when selected.
"""

from __future__ import annotations

from typing import Any

from ..config import ConfigError, Settings
from ..planning.plan import Plan

BACKENDS = ("local", "ray")
BACKEND_ALLOWED = "local (worker processes on this machine) or ray (Ray actors on a cluster; pip install 'fishmp[ray]')"


def make_worker_pool(plan: Plan, settings: Settings, n_segments: int | None = None) -> Any:
    """A WorkerPool for FISH_BACKEND=local (the default), a RayWorkerPool for FISH_BACKEND=ray.

    `plan` is this machine's plan; the Ray backend computes its own, per node, with the same formula."""
    backend = getattr(settings, "backend", "local")
    if backend == "ray":
        from .ray_pool import RayWorkerPool

        return RayWorkerPool(plan, settings, n_segments=n_segments)
    if backend != "local":
        raise ConfigError("FISH_BACKEND", backend, BACKEND_ALLOWED)
    from .local import WorkerPool

    return WorkerPool(plan, settings)


__all__ = ["BACKENDS", "BACKEND_ALLOWED", "make_worker_pool"]
