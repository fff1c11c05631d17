"""GPU inventory: what NVML sees (honouring CUDA_VISIBLE_DEVICES), or a simulated inventory for what-if planning.

No NVML library, no driver or no GPU is an empty inventory, never an error: fishmp then plans CPU workers.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger("fishmp")
GIB = 1024**3


@dataclass(frozen=True)
class GPU:
    index: int  # NVML (PCI bus order) index, what `nvidia-smi` shows
    name: str
    total_gib: float
    free_gib: float
    uuid: str | None = None  # None for a simulated GPU

    @property
    def pin(self) -> str:
        """The CUDA_VISIBLE_DEVICES value that pins a worker to this GPU (UUIDs are immune to ordering)."""
        return self.uuid or str(self.index)


class GpuSpecError(ValueError):
    pass


def parse_gpu_spec(spec: str) -> list[GPU]:
    """`"NVIDIA GeForce RTX 4090:24,NVIDIA GeForce RTX 4090:24"` or `"24,24"` -> simulated, idle GPUs (GiB)."""
    gpus: list[GPU] = []
    for i, item in enumerate(p.strip() for p in spec.split(",")):
        if not item:
            continue
        name, _, size = item.rpartition(":")
        try:
            total = float(size)
        except ValueError:
            total = -1.0
        if not total > 0:
            raise GpuSpecError(f"--gpus item {item!r}: expected NAME:GiB or GiB with GiB > 0, e.g. 'RTX 4090:24'")
        gpus.append(GPU(index=i, name=name.strip() or f"Simulated GPU {i}", total_gib=total, free_gib=total))
    if not gpus:
        raise GpuSpecError("--gpus is empty: expected e.g. 'NVIDIA GeForce RTX 4090:24,NVIDIA GeForce RTX 4090:24'")
    return gpus


def _visible_filter(gpus: list[GPU], visible: str | None, order: str | None) -> list[GPU]:
    """Keep the GPUs CUDA_VISIBLE_DEVICES lets CUDA see, in its order. Entries are indices, UUIDs or UUID prefixes."""
    if visible is None:
        return gpus
    if order != "PCI_BUS_ID" and len({g.name for g in gpus}) > 1 and any(e.strip().isdigit() for e in visible.split(",")):
        # CUDA's default FASTEST_FIRST order is not visible through NVML; on identical GPUs it is the PCI order.
        log.warning("CUDA_VISIBLE_DEVICES=%s uses indices on mixed GPUs without CUDA_DEVICE_ORDER=PCI_BUS_ID: fishmp "
                    "reads them in PCI bus order (nvidia-smi's); set CUDA_DEVICE_ORDER=PCI_BUS_ID or use GPU UUIDs",
                    visible)
    chosen: list[GPU] = []
    for entry in (e.strip() for e in visible.split(",")):
        if not entry:
            continue
        if entry.isdigit() or entry.startswith("-"):
            if entry.startswith("-"):  # CUDA stops at the first invalid index
                break
            match = [g for g in gpus if g.index == int(entry)]
        else:
            key = entry.removeprefix("GPU-") if not entry.startswith("MIG-") else entry
            match = [g for g in gpus if g.uuid and (g.uuid == entry or g.uuid.removeprefix("GPU-").startswith(key))]
        if not match:
            break  # like CUDA: devices after an unknown entry are invisible
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen


def nvml_inventory(environ: Mapping[str, str] | None = None) -> list[GPU]:
    """Every GPU NVML reports, filtered by CUDA_VISIBLE_DEVICES. Empty when NVML or a GPU is missing."""
    env = os.environ if environ is None else environ
    try:
        import pynvml
    except ImportError:
        return []
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:  # no driver / no library: a CPU machine
        log.debug("NVML unavailable: %s", exc)
        return []
    try:
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            mem = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            uuid = pynvml.nvmlDeviceGetUUID(handle)
            gpus.append(GPU(
                index=i,
                name=name.decode() if isinstance(name, bytes) else name,
                total_gib=mem.total / GIB,
                free_gib=mem.free / GIB,
                uuid=uuid.decode() if isinstance(uuid, bytes) else uuid,
            ))
    except pynvml.NVMLError as exc:
        log.warning("NVML failed while listing GPUs (%s); planning without GPUs", exc)
        return []
    finally:
        pynvml.nvmlShutdown()
    return _visible_filter(gpus, env.get("CUDA_VISIBLE_DEVICES"), env.get("CUDA_DEVICE_ORDER"))


def nvml_free_bytes(pin: str | int) -> int:
    """Free bytes on one GPU (NVML index or UUID) as NVML sees it: reading it makes no CUDA context."""
    import pynvml

    pin = str(pin)
    pynvml.nvmlInit()
    try:
        h = pynvml.nvmlDeviceGetHandleByIndex(int(pin)) if pin.isdigit() else pynvml.nvmlDeviceGetHandleByUUID(pin)
        return int(pynvml.nvmlDeviceGetMemoryInfo(h).free)
    finally:
        pynvml.nvmlShutdown()


def select_devices(gpus: list[GPU], devices: str | None) -> list[GPU]:
    """Apply FISH_DEVICES (indices or UUIDs, or 'cpu' for none) to the inventory."""
    if devices is None:
        return gpus
    if devices.strip().lower() == "cpu":
        return []
    chosen: list[GPU] = []
    for entry in (e.strip() for e in devices.split(",") if e.strip()):
        match = [g for g in gpus if (entry.isdigit() and g.index == int(entry)) or g.uuid == entry]
        if not match:
            known = ", ".join(f"{g.index} ({g.uuid})" if g.uuid else str(g.index) for g in gpus) or "none"
            raise GpuSpecError(f"FISH_DEVICES entry {entry!r} matches no visible GPU; visible: {known}")
        if match[0] not in chosen:
            chosen.append(match[0])
    return chosen
