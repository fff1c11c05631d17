"""GPU telemetry (issue 15): the main process samples NVML for the plan's GPUs every FISH_TELEMETRY_INTERVAL_S while
a job runs, from one thread per pool. Each sample becomes a `gpu` event; each job keeps the peak and mean per GPU
(GpuStats) for its manifest's summary and `finished` event; the progress bar shows the latest figures.

Three parts, kept apart so the arithmetic is tested with real numbers and no GPU: `NvmlReader` (the only code that
talks to NVML), `GpuStats` and `sample_fields` (pure), `Sampler` (the thread). No NVML, no driver, no GPU in the plan:
no reader, no thread, no event, nothing printed.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from ..planning.gpus import GIB
from .progress import make_event

log = logging.getLogger("fishmp")


@dataclass(frozen=True)
class GpuSample:
    index: int  # NVML index (nvidia-smi's)
    name: str
    used_gib: float
    free_gib: float
    total_gib: float
    util_pct: float | None  # GPU utilisation over NVML's last sample period; None when NVML cannot say
    processes: dict[int, float] = field(default_factory=dict)  # pid -> GiB used, where NVML gives it


def sample_fields(samples: Iterable[GpuSample], workers: dict[int, str]) -> list[dict[str, Any]]:
    """One `gpu` event's per-GPU entries; `workers` maps pids to fishmp worker ids (other processes are `others`)."""
    out = []
    for s in samples:
        mine = {workers[p]: round(g, 3) for p, g in sorted(s.processes.items()) if p in workers}
        entry: dict[str, Any] = {"index": s.index, "name": s.name, "used_gib": round(s.used_gib, 3),
                                 "free_gib": round(s.free_gib, 3), "total_gib": round(s.total_gib, 3),
                                 "util_pct": s.util_pct, "workers_gib": mine}
        others = sum(g for p, g in s.processes.items() if p not in workers)
        if s.processes:
            entry["others_gib"] = round(others, 3)
        out.append(entry)
    return out


class GpuStats:
    """Peak and mean per GPU over a job's samples (pure: numbers in, a dict out)."""

    def __init__(self) -> None:
        self._gpus: dict[int, dict[str, Any]] = {}

    def add(self, samples: Iterable[GpuSample], workers: dict[int, str] | None = None) -> None:
        for s in samples:
            g = self._gpus.setdefault(s.index, {"name": s.name, "total_gib": s.total_gib, "n": 0, "used_sum": 0.0,
                                                 "used_peak": 0.0, "free_min": s.free_gib, "util_n": 0,
                                                 "util_sum": 0.0, "util_peak": None, "workers": {}})
            g["n"] += 1
            g["used_sum"] += s.used_gib
            g["used_peak"] = max(g["used_peak"], s.used_gib)
            g["free_min"] = min(g["free_min"], s.free_gib)
            if s.util_pct is not None:
                g["util_n"] += 1
                g["util_sum"] += s.util_pct
                g["util_peak"] = s.util_pct if g["util_peak"] is None else max(g["util_peak"], s.util_pct)
            for pid, gib in s.processes.items():
                wid = (workers or {}).get(pid)
                if wid is not None:
                    g["workers"][wid] = max(g["workers"].get(wid, 0.0), gib)

    def __bool__(self) -> bool:
        return bool(self._gpus)

    def summary(self) -> dict[str, dict[str, Any]]:
        """{"<index>": {name, total_gib, samples, used_gib_peak, used_gib_mean, free_gib_min, util_pct_peak,
        util_pct_mean, workers_gib_peak}} (GiB to 3 decimals, utilisation to 1); empty with no samples."""
        out = {}
        for index, g in sorted(self._gpus.items()):
            out[str(index)] = {
                "name": g["name"], "total_gib": round(g["total_gib"], 3), "samples": g["n"],
                "used_gib_peak": round(g["used_peak"], 3), "used_gib_mean": round(g["used_sum"] / g["n"], 3),
                "free_gib_min": round(g["free_min"], 3),
                "util_pct_peak": g["util_peak"],
                "util_pct_mean": round(g["util_sum"] / g["util_n"], 1) if g["util_n"] else None,
                "workers_gib_peak": {w: round(v, 3) for w, v in sorted(g["workers"].items())},
            }
        return out


class NvmlReader:
    """Reads the GPUs named by `pins` (UUIDs or NVML indices, as the plan pins workers). `open` returns None when
    NVML or every GPU is missing: telemetry is then off, silently."""

    def __init__(self, nvml: Any, handles: list[tuple[int, str, Any]]) -> None:
        self.nvml, self.handles = nvml, handles

    @classmethod
    def open(cls, pins: Iterable[str]) -> NvmlReader | None:
        pins = list(dict.fromkeys(p for p in pins if p))
        if not pins:
            return None
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception:  # noqa: BLE001 - no library, no driver: no telemetry
            return None
        handles = []
        for pin in pins:
            try:
                h = (pynvml.nvmlDeviceGetHandleByIndex(int(pin)) if pin.isdigit()
                     else pynvml.nvmlDeviceGetHandleByUUID(pin))
                index = int(pynvml.nvmlDeviceGetIndex(h))
                name = pynvml.nvmlDeviceGetName(h)
                handles.append((index, name.decode() if isinstance(name, bytes) else str(name), h))
            except Exception:  # noqa: BLE001 - a GPU on another machine (Ray) or gone: not sampled here
                continue
        if not handles:
            with contextlib.suppress(Exception):
                pynvml.nvmlShutdown()
            return None
        return cls(pynvml, handles)

    def read(self) -> list[GpuSample]:
        nv, out = self.nvml, []
        for index, name, h in self.handles:
            try:
                mem = nv.nvmlDeviceGetMemoryInfo(h)
            except Exception:  # noqa: BLE001 - a GPU that fell off the bus: the workers' errors say more
                continue
            util: float | None
            try:
                util = float(nv.nvmlDeviceGetUtilizationRates(h).gpu)
            except Exception:  # noqa: BLE001 - not supported (some vGPUs, MIG)
                util = None
            procs: dict[int, float] = {}
            with contextlib.suppress(Exception):  # per-process memory is not given everywhere (containers, MIG)
                for p in nv.nvmlDeviceGetComputeRunningProcesses(h):
                    used = getattr(p, "usedGpuMemory", None)
                    if used is not None and used >= 0 and used < 2**63:  # NVML's "not available" is a huge value
                        procs[int(p.pid)] = procs.get(int(p.pid), 0.0) + used / GIB
            out.append(GpuSample(index, name, mem.used / GIB, mem.free / GIB, mem.total / GIB, util, procs))
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.nvml.nvmlShutdown()


class Sampler:
    """One thread per pool: while `busy`, calls `read()` every `interval_s` (and at once on `kick`) and hands each
    sample to `on_sample` (which must be quick and thread-safe: the service queues it and wakes its loop)."""

    def __init__(self, read: Callable[[], list[GpuSample]], interval_s: float,
                 on_sample: Callable[[list[GpuSample]], None], close: Callable[[], None] | None = None) -> None:
        self.read, self.interval_s, self.on_sample, self._close = read, interval_s, on_sample, close
        self.busy = threading.Event()
        self._kick = threading.Event()
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="fishmp-telemetry", daemon=True)
        self.thread.start()

    def set_busy(self, busy: bool) -> None:
        """A job runs (sample now, then every interval) or none does (stop sampling)."""
        if busy and not self.busy.is_set():
            self.busy.set()
            self._kick.set()
        elif not busy:
            self.busy.clear()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self._kick.wait(self.interval_s)
                self._kick.clear()
                if self._stop.is_set() or not self.busy.is_set():
                    continue
                try:
                    samples = self.read()
                except Exception as exc:  # noqa: BLE001 - telemetry never stops a job
                    log.debug("[Main] GPU telemetry read failed: %s", exc)
                    continue
                if samples:
                    self.on_sample(samples)
        finally:
            if self._close is not None:
                self._close()

    def stop(self) -> None:
        self._stop.set()
        self._kick.set()
        self.thread.join(timeout=5)


class PoolTelemetry:
    """The service's side: one Sampler for the pool's GPUs; the loop calls `turn(active jobs)` each turn, which
    starts or pauses sampling and turns queued samples into `gpu` events and each job's GpuStats."""

    def __init__(self, workers: Any, read: Callable[[], list[GpuSample]], interval_s: float,
                 close: Callable[[], None] | None = None) -> None:
        self.workers = workers
        self._lock = threading.Lock()
        self._samples: list[list[GpuSample]] = []  # from the sampler thread, taken by the loop
        self.sampler = Sampler(read, interval_s, self._on_sample, close)

    @classmethod
    def open(cls, workers: Any) -> PoolTelemetry | None:
        """None (telemetry off, silently) with FISH_TELEMETRY_INTERVAL_S=0, no GPU slot, or no NVML."""
        interval = float(getattr(workers.settings, "telemetry_interval_s", 0) or 0)
        pins = [pin for _, pin in workers.slots if pin]
        if interval <= 0 or not pins:
            return None
        reader = NvmlReader.open(pins)
        return None if reader is None else cls(workers, reader.read, interval, reader.close)

    def _on_sample(self, samples: list[GpuSample]) -> None:
        with self._lock:
            self._samples.append(samples)
        self.workers.wake()

    def turn(self, active: list[Any]) -> None:
        """On the loop thread: emit what was sampled to every running job; sample only while a job runs."""
        self.sampler.set_busy(bool(active))
        with self._lock:
            taken, self._samples = self._samples, []
        if not taken or not active:
            return
        pids = {h.pid: h.id for h in self.workers.handles.values() if h.pid and h.state != "dead"}
        for samples in taken:
            event = make_event("gpu", gpus=sample_fields(samples, pids))
            for handle in active:
                stats = getattr(handle._run, "gpu_stats", None)
                if stats is not None:
                    stats.add(samples, pids)
                handle._run.emit(event)

    def stop(self) -> None:
        self.sampler.stop()
