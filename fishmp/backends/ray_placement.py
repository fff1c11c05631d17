"""Where Ray workers go: fishmp's plan, computed per node from that node's GPUs. Pure: no Ray, no processes.

Each node's GPUs (as NVML sees them there) go through the same formula as on one machine (fishmp.planning.plan.make_plan,
FISH_MODEL_MEMORY_GB, FISH_MEMORY_RESERVE, free memory). A worker on a GPU that holds N workers asks Ray for 1/N of a
GPU, so Ray's accounting matches the plan; Ray's fractions do not cap memory, fishmp's sizing does. Nodes without GPUs
get FISH_CPU_WORKERS workers only when no node has a usable GPU (a CPU head node of a GPU cluster runs no model).
FISH_MAX_WORKERS and the job's size cap the cluster's total, dealt one node at a time so every node gets work.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..config import Settings
from ..planning.gpus import GPU, select_devices
from ..planning.plan import GpuPlan, Plan, make_plan


@dataclass(frozen=True)
class NodeInventory:
    node_id: str
    address: str  # the node's IP, used in worker device labels ("10.0.0.2/cuda:0"); IP#node-id when IPs repeat
    cpus: float  # Ray's CPU resource there
    ray_gpus: float  # Ray's GPU resource there: a GPU Ray does not manage gets no worker
    gpus: tuple[GPU, ...] = ()  # what NVML sees there (filtered by that node's CUDA_VISIBLE_DEVICES)


@dataclass(frozen=True)
class RaySlot:
    node_id: str
    address: str
    device: str  # label for logs, events and the manifest
    pin: str | None  # CUDA_VISIBLE_DEVICES for the actor: the GPU's UUID (as locally); None on the CPU
    num_gpus: float  # Ray GPU resource asked for: 1/N for N workers on that GPU
    num_cpus: float  # Ray CPU resource asked for (CPU workers: their share of the node's cores)
    cpu_threads: int | None  # OMP threads of a CPU worker


def gpu_fraction(n: int) -> float:
    """1/n rounded down to Ray's 1e-4 resource granularity, so n of them always fit on one GPU (0.34 x 3 does not)."""
    return math.floor(10000 / max(n, 1)) / 10000


def node_plan(node: NodeInventory, settings: Settings, use_gpus: bool) -> Plan:
    """The single-machine plan for one node (no cluster-wide caps here; those are dealt across nodes)."""
    local = settings.replace(max_workers=None, multiprocess_mode="true")
    if not use_gpus:
        return make_plan([], local, None)
    usable = select_devices(list(node.gpus), settings.devices)[: int(node.ray_gpus)]
    if not usable:  # a node without GPUs in a GPU cluster (e.g. the head): no model runs there
        return Plan(mode="multiprocess", gpus=(), cpu_workers=0)
    return make_plan(usable, local, None)


def _node_slots(node: NodeInventory, plan: Plan) -> list[RaySlot]:
    per_gpu = {g.gpu.pin: g.workers for g in plan.gpus}
    slots = []
    for device, pin in plan.slots():
        if pin is not None:
            slots.append(RaySlot(node.node_id, node.address, f"{node.address}/{device}", pin,
                                 gpu_fraction(per_gpu[pin]), 0.0, None))
        else:
            threads = max(1, int(node.cpus) // max(plan.cpu_workers, 1))
            slots.append(RaySlot(node.node_id, node.address, f"{node.address}/cpu", None, 0.0, float(threads), threads))
    return slots


def cluster_slots(nodes: list[NodeInventory], settings: Settings,
                  n_segments: int | None = None) -> tuple[list[RaySlot], list[Plan]]:
    """Every worker slot of the cluster, interleaved across nodes (then GPUs), and each node's plan."""
    devices_off = (settings.devices or "").strip().lower() == "cpu"
    use_gpus = not devices_off and any(n.gpus and n.ray_gpus >= 1 for n in nodes)
    plans = [node_plan(n, settings, use_gpus) for n in nodes]
    per_node = [_node_slots(n, p) for n, p in zip(nodes, plans, strict=True)]
    cap = settings.max_workers
    if n_segments is not None:
        cap = min(cap or n_segments, max(n_segments, 1))
    out: list[RaySlot] = []
    for i in range(max((len(s) for s in per_node), default=0)):
        out.extend(s[i] for s in per_node if i < len(s))
    return (out[:cap] if cap is not None else out), plans


def cluster_plan(nodes: list[NodeInventory], plans: list[Plan], slots: list[RaySlot]) -> Plan:
    """One Plan for the plan event and `plan.to_dict()`: every node's GPUs, workers as actually started."""
    started: dict[tuple[str, str | None], int] = {}
    for s in slots:
        started[(s.node_id, s.pin)] = started.get((s.node_id, s.pin), 0) + 1
    gpus: list[GpuPlan] = []
    warnings: list[str] = []
    for node, plan in zip(nodes, plans, strict=True):
        for g in plan.gpus:
            gpus.append(dataclasses.replace(g, workers=started.get((node.node_id, g.gpu.pin), 0)))
        warnings.extend(f"[Node {node.address}] {w}" for w in plan.warnings)
    cpu = sum(1 for s in slots if s.pin is None)
    return Plan(mode="ray", gpus=tuple(gpus), cpu_workers=cpu, warnings=tuple(warnings))


def placement_log_lines(nodes: list[NodeInventory], slots: list[RaySlot]) -> list[str]:
    """The plan in the guide's wording, one block per node."""
    lines = []
    for node in nodes:
        mine = [s for s in slots if s.node_id == node.node_id]
        for g in node.gpus:
            n = sum(1 for s in mine if s.pin == g.pin)
            lines.append(f"[Node {node.address}] [GPU {g.index}] {g.name}, Total Memory: {g.total_gib:.2f} GB: "
                         f"{n} workers")
        cpu = sum(1 for s in mine if s.pin is None)
        if cpu or not node.gpus:
            lines.append(f"[Node {node.address}] CPU: {cpu} workers")
    lines.append(f"[Main] Using {len(slots)} parallel workers across {len(nodes)} Ray node(s)")
    return lines
