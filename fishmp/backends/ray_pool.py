"""FISH_BACKEND=ray: the job loop's WorkerPool, with each worker a Ray actor somewhere in a Ray cluster.

RayWorkerPool subclasses fishmp.backends.local.WorkerPool and replaces only the mechanism (spawn, send, kill, poll, close), so
the slot bookkeeping (respawn, restart budget, dropped slots) and the job loop (scheduler, retries, manifest, events)
are the same code as the local backend. Per worker:
- an actor (max_restarts=0, max_task_retries=0: fishmp requeues and replaces, within FISH_MAX_RESTARTS), pinned to
  its node, asking for 1/N of its GPU (fishmp.backends.ray_placement) and pinned to that GPU's UUID as locally;
- one outstanding `next()` long-poll; `poll()` is a ray.wait over all of them, so a message or a death (ActorDiedError,
  ActorUnavailableError) is seen at once; an actor Ray has not placed within FISH_RAY_PLACEMENT_TIMEOUT_S is reported and
  its slot dropped, never waited on forever;
- no shared filesystem: references travel as content-hashed blobs in Ray's object store, wavs come back as bytes and
  are written here, atomically, before the loop sees Done.
Importing this module does not import ray; creating a RayWorkerPool does.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import signal
import time
from dataclasses import dataclass, field
from typing import Any

from ..config import ConfigError, Settings
from ..planning.plan import Plan
from ..worker.files import atomic_write_bytes
from ..worker.protocol import EncodeTask, Failed, SegmentTask
from .contract import WorkerHandle
from .local import WorkerPool
from .ray_placement import NodeInventory, RaySlot, cluster_plan, cluster_slots, placement_log_lines

log = logging.getLogger("fishmp")

NEXT_WAIT_S = 1.0  # how long an actor holds a `next()` call open when it has nothing to say
WAIT_CHUNK_S = 0.1  # ray.wait slices, so a stop request (signal handler) is seen promptly
PROBE_TIMEOUT_S = 60.0  # each GPU node's inventory probe
MAX_BLOBS = 256  # references kept in the object store by one pool (an evicted one is put again when used)
# The head node (its GCS) is probed this often; unreachable for HEAD_LOST_S the cluster is taken for lost. Ray itself
# ends a driver that cannot reach the GCS for gcs_rpc_server_reconnect_timeout_s (60 s): fishmp must be done first.
HEAD_PROBE_EVERY_S = 2.0
HEAD_PROBE_TIMEOUT_S = 2.0
FORWARDED_ENV = re.compile(r"^FISH_SYNTHETIC_")  # engine knobs read from the environment (the test engine's)
RAY_ADDRESS_ALLOWED = ("a running Ray cluster: auto, the head's HOST:6379 or ray://HOST:10001; empty starts a local "
                       "Ray instance")
RAY_MISSING = "local, or ray once the ray package is installed (pip install 'fishmp[ray]')"


def import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("FISH_BACKEND", "ray", RAY_MISSING) from exc
    return ray


def keep_stdout_clean() -> None:
    """Ray prints cluster error notes ("A worker died or was killed...") to the driver's stdout, which carries
    fishmp's machine output (jsonl events, the result line): send them to the log instead. This wraps a Ray internal
    (ray._private.worker.print_to_stdstream, looked up at each call); if Ray renames it, nothing is changed."""
    try:
        from ray._private import worker as ray_worker
    except ImportError:
        return
    original = getattr(ray_worker, "print_to_stdstream", None)
    if original is None or getattr(original, "fishmp", False):
        return

    def to_log(data: dict, ignore_prefix: bool) -> None:
        if data.get("is_err"):
            original(data, ignore_prefix)
            return
        for line in data.get("lines", ()):
            log.info("[Ray %s] %s", data.get("pid", ""), line)

    to_log.fishmp = True  # type: ignore[attr-defined]
    ray_worker.print_to_stdstream = to_log


def _gpu_probe() -> list[Any]:
    """Runs on a node (a Ray task): its GPUs as NVML sees them there, honouring that node's CUDA_VISIBLE_DEVICES."""
    from ..planning.gpus import nvml_inventory

    env = dict(os.environ)
    if env.get("CUDA_VISIBLE_DEVICES") == "":  # older Ray blanks it for tasks that ask for no GPU
        del env["CUDA_VISIBLE_DEVICES"]
    return nvml_inventory(env)


def discover_nodes(ray: Any, timeout_s: float = PROBE_TIMEOUT_S) -> list[NodeInventory]:
    """Every alive node with its Ray resources; GPU nodes also with their NVML inventory (a probe task there)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    alive = sorted((n for n in ray.nodes() if n.get("Alive")), key=lambda n: n["NodeManagerAddress"])
    probe = ray.remote(num_cpus=0, max_retries=0)(_gpu_probe)
    refs = {n["NodeID"]: probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote()
            for n in alive if n["Resources"].get("GPU", 0) >= 1}
    ray.wait(list(refs.values()), num_returns=len(refs), timeout=timeout_s)
    nodes = []
    for n in alive:
        gpus: list[Any] = []
        if n["NodeID"] in refs:
            try:
                gpus = ray.get(refs[n["NodeID"]], timeout=0)
            except Exception as exc:  # noqa: BLE001 - a node that cannot say gets no GPU workers, and a warning
                log.warning("[Node %s] could not list its GPUs (%s): no workers there", n["NodeManagerAddress"],
                            type(exc).__name__)
                ray.cancel(refs[n["NodeID"]], force=True)
        res = n["Resources"]
        ip = n["NodeManagerAddress"]
        label = ip if sum(m["NodeManagerAddress"] == ip for m in alive) == 1 else f"{ip}#{n['NodeID'][:6]}"
        nodes.append(NodeInventory(n["NodeID"], label, float(res.get("CPU", 0)),
                                   float(res.get("GPU", 0)), tuple(gpus)))
    return nodes


class ActorProcess:
    """Stands where a local worker's multiprocessing.Process stands (WorkerHandle.process): the loop reads a non-None
    process as "this worker can be killed" (unlike the in-process worker) and kills it through the pool."""

    def __init__(self, actor: Any) -> None:
        self.actor = actor
        self.exitcode: int | None = None  # set when the actor is gone

    def is_alive(self) -> bool:
        return self.exitcode is None


@dataclass
class _Remote:
    """The Ray side of one WorkerHandle."""

    actor: Any
    slot: RaySlot
    info_ref: Any
    spawned: float = field(default_factory=time.monotonic)
    next_ref: Any = None
    placed: bool = False
    seq: int = 0


class RayWorkerPool(WorkerPool):
    """A WorkerPool whose workers are Ray actors. Not thread-safe: one job loop drives it."""

    def __init__(self, plan: Plan | None, settings: Settings, *, address: str | None = None,
                 n_segments: int | None = None,
                 nodes: list[NodeInventory] | None = None) -> None:
        """`plan` (this machine's) is not used: the plan is made per node. `address`: FISH_RAY_ADDRESS (None: an
        already initialised Ray, else a new local instance). `nodes` replaces discovery (what-if placement)."""
        self.ray = import_ray()
        from .ray_actor import WorkerActor

        address = address if address is not None else getattr(settings, "ray_address", None)
        self._owns_ray = not self.ray.is_initialized()
        if self._owns_ray:
            try:
                self.ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                              logging_level=logging.WARNING)
            except (ValueError, ConnectionError, RuntimeError) as exc:  # a bad or unreachable address
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                raise ConfigError("FISH_RAY_ADDRESS", address, f"{RAY_ADDRESS_ALLOWED} ({first})") from exc
        keep_stdout_clean()
        self._actor_cls = self.ray.remote(max_restarts=0, max_task_retries=0, max_concurrency=8)(WorkerActor)
        self.nodes = nodes if nodes is not None else discover_nodes(self.ray)
        self.ray_slots, node_plans = cluster_slots(self.nodes, settings, n_segments)
        # An actor Ray has not placed by then is reported and its slot dropped; never later than a load may take.
        self.placement_timeout_s = min(settings.ray_placement_timeout_s, settings.load_timeout_s)
        self._remote: dict[str, _Remote] = {}
        self._blobs: dict[tuple[str, int, int], tuple[str, str, Any, str | None]] = {}
        self._closed = False
        self.address = address or "a local Ray instance"
        self.head_lost: str | None = None  # why the cluster is gone (its head unreachable): nothing more is asked of Ray
        self._head = _HeadProbe(self.ray)
        for line in placement_log_lines(self.nodes, self.ray_slots):
            log.info(line)
        super().__init__(cluster_plan(self.nodes, node_plans, self.ray_slots), settings)  # spawns every slot
        os.set_blocking(self._wake_r, False)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def spawn(self, slot: int) -> WorkerHandle:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        s = self.ray_slots[slot]
        self._generation += 1
        wid = f"w{slot}" if self._generation <= len(self.slots) else f"w{slot}.{self._generation}"
        env = {k: v for k, v in os.environ.items() if FORWARDED_ENV.match(k)}
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        if s.pin is not None:  # fishmp pins by UUID, as locally; Ray's fraction only keeps its accounting right
            env.update(RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES="1", CUDA_VISIBLE_DEVICES=s.pin)
        else:  # a CPU worker sees no GPU (fish-speech would open a CUDA context on GPU 0 otherwise)
            env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=str(s.cpu_threads), MKL_NUM_THREADS=str(s.cpu_threads))
        actor = self._actor_cls.options(
            num_cpus=s.num_cpus, num_gpus=s.num_gpus, runtime_env={"env_vars": env},
            scheduling_strategy=NodeAffinitySchedulingStrategy(s.node_id, soft=False),
        ).remote(wid, "cuda:0" if s.pin is not None else "cpu", self.settings)
        h = WorkerHandle(wid, slot, s.device, s.pin, task_conn=None, result_conn=None, process=ActorProcess(actor))
        self._remote[wid] = _Remote(actor, s, actor.info.remote())
        self.handles[wid] = h
        return h

    def send(self, h: WorkerHandle, task: Any) -> bool:
        r = self._remote.get(h.id)
        if r is None or h.state == "dead":
            return False
        paths: list[str] = []
        if isinstance(task, SegmentTask):
            paths = [p for p in (task.speaker.reference_audio, task.speaker.prompt_tokens) if p]
        elif isinstance(task, EncodeTask):
            paths = [task.audio_path]
        r.actor.submit.remote(r.seq, task, {p: self._blob(p) for p in paths})  # a dead actor: its next() tells
        r.seq += 1
        h.outstanding.append(task.id)
        return True

    def _blob(self, path: str) -> tuple[str, str, Any, str | None]:
        """(sha256, suffix, object ref, None), put into the object store once per file version; or the read error."""
        try:
            st = os.stat(path)
            key = (path, st.st_mtime_ns, st.st_size)
            if key not in self._blobs:
                with open(path, "rb") as f:
                    data = f.read()
                suffix = re.sub(r"[^A-Za-z0-9.]", "", os.path.splitext(path)[1])[:16]
                if len(self._blobs) >= MAX_BLOBS:  # a long-lived pool sees many voices: drop the oldest ref
                    self._blobs.pop(next(iter(self._blobs)))
                self._blobs[key] = (hashlib.sha256(data).hexdigest(), suffix, self.ray.put(data), None)
            return self._blobs[key]
        except OSError as exc:
            return ("", "", None, exc.strerror or str(exc))

    def kill(self, h: WorkerHandle, reason: str) -> None:
        h.kill_reason = reason
        r = self._remote.get(h.id)
        if r is not None:
            with contextlib.suppress(Exception):
                self.ray.kill(r.actor, no_restart=True)

    # -- waiting ----------------------------------------------------------------------------------------------------
    def poll(self, timeout: float | None) -> list[tuple[str, WorkerHandle, Any]]:
        """Messages and deaths, like WorkerPool.poll: ('msg', handle, message) and ('exit', handle, exitcode)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        events: list[tuple[str, WorkerHandle, Any]] = []
        while True:
            if self.head_lost is None and (why := self._head.lost()) is not None:
                self._cluster_lost(why, events)
                return events
            waiting: dict[Any, tuple[WorkerHandle, str]] = {}
            for h in list(self.handles.values()):
                r = self._remote.get(h.id)
                if h.state == "dead" or r is None:
                    continue
                if not r.placed and time.monotonic() - r.spawned > self.placement_timeout_s:
                    self._unplaceable(h, r, events)
                    continue
                if r.info_ref is not None:
                    waiting[r.info_ref] = (h, "info")
                if r.next_ref is None:
                    r.next_ref = r.actor.next.remote(NEXT_WAIT_S)
                waiting[r.next_ref] = (h, "next")
            now = time.monotonic()
            chunk = WAIT_CHUNK_S if deadline is None else max(0.0, min(WAIT_CHUNK_S, deadline - now))
            if waiting and not events:
                refs = list(waiting)
                ready, _ = self.ray.wait(refs, num_returns=1, timeout=chunk)
                if ready:
                    ready, _ = self.ray.wait(refs, num_returns=len(refs), timeout=0)
                for ref in sorted(ready, key=lambda x: waiting[x][1] != "info"):  # placement news first
                    h, kind = waiting[ref]
                    if h.state != "dead":
                        (self._on_info if kind == "info" else self._on_next)(h, ref, events)
            elif not events:
                time.sleep(chunk)
            woken = False
            with contextlib.suppress(OSError):
                woken = bool(os.read(self._wake_r, 1024))
            if events or woken or (deadline is not None and time.monotonic() >= deadline):
                return events

    def _on_info(self, h: WorkerHandle, ref: Any, events: list) -> None:
        r = self._remote[h.id]
        r.info_ref = None
        try:
            info = self.ray.get(ref)
        except Exception:  # noqa: BLE001 - it died in its constructor: its next() reports the death
            return
        r.placed = True
        h.pid = info["pid"]
        log.debug("[Worker %s] placed on %s (pid %s, GPU ids %s)", h.id, info["node"], info["pid"], info["gpu_ids"])

    def _on_next(self, h: WorkerHandle, ref: Any, events: list) -> None:
        r = self._remote[h.id]
        r.next_ref = None
        try:
            items = self.ray.get(ref)
        except Exception as exc:  # noqa: BLE001 - ActorDiedError, ActorUnavailableError, or a bug in the wrapper
            if type(exc).__name__ == "ActorUnschedulableError":  # Ray knows at once that the node can never fit it
                self._unplaceable(h, r, events, "Ray says it can never fit there")
            else:
                self._gone(h, r, events, self._death_code(h, exc))
            return
        for kind, msg, data in items:
            if kind == "end":  # the worker returned (after LoadFailed or a deliberate exit): the actor goes too
                self._gone(h, r, events, 0)
                return
            if data is not None:
                try:
                    atomic_write_bytes(msg.path, data)
                except OSError as exc:  # disk full here: the segment fails like a local write failure
                    msg = Failed(msg.worker, msg.task, "write_error", f"cannot write {msg.path}: {exc.strerror or exc}",
                                 "", True)
            if msg.__class__.__name__ == "Ready" and getattr(msg, "pid", None):
                h.pid = msg.pid
            events.append(("msg", h, msg))

    def _death_code(self, h: WorkerHandle, exc: BaseException) -> int | None:
        """The exit code for the loop: -9 for a ray.kill (ours or anyone's); None when Ray cannot say (a dead process
        on another node has no exit status here), with Ray's own words as the reason."""
        text = str(exc)
        if h.kill_reason is not None:
            return -signal.SIGKILL
        if "killed by `ray.kill`" in text:
            h.kill_reason = "its Ray actor was stopped with ray.kill (not by fishmp)"
            return -signal.SIGKILL
        if not h.leaving:
            because = re.search(r"The actor is dead because ([^\n]*?)\.(?:\s|$)", text)
            detail = re.search(r"Worker exit detail: ([^\n]*?)\.(?:\s|$)", text)
            what = because.group(1) if because else f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"
            if detail:
                what += f": {detail.group(1)}"
            node = self._remote[h.id].slot.address
            h.kill_reason = (f"its Ray actor on {node} died ({what}); killed, crashed, or the node's out-of-memory "
                             "killer: see the Ray logs on that node")
        return None

    def _unplaceable(self, h: WorkerHandle, r: _Remote, events: list, why: str | None = None) -> None:
        s = r.slot
        why = why or f"not within {self.placement_timeout_s:g}s"
        h.kill_reason = (f"Ray could not place it on node {s.address}: {why} (it asks for {s.num_gpus:g} GPU and "
                         f"{s.num_cpus:g} CPU there; see `ray status`); slot dropped")
        log.error("[Worker %s] %s", h.id, h.kill_reason)
        self.dropped.add(h.slot)  # the same request would wait just as long again
        self._gone(h, r, events, None)

    def _gone(self, h: WorkerHandle, r: _Remote, events: list, code: int | None) -> None:
        with contextlib.suppress(Exception):
            self.ray.kill(r.actor, no_restart=True)
        r.next_ref = r.info_ref = None
        h.process.exitcode = code if code is not None else -1
        h.state = "dead"
        events.append(("exit", h, code))

    def _cluster_lost(self, why: str, events: list) -> None:
        """The head node is gone: every actor is as good as dead and no new one can be placed. Each live worker is
        reported dead with the reason, and `broken` stops replacements, so the job loop ends the jobs (their
        segments fail no_workers naming this), writes the manifests and returns the results."""
        self.head_lost = self.broken = (f"lost the Ray cluster's head node ({self.address}): {why}; the jobs end here "
                                        "(re-run to resume once the cluster is back)")
        for h in self.handles.values():
            if h.state != "dead":
                h.kill_reason = self.head_lost
                h.process.exitcode = -1
                h.state = "dead"
                events.append(("exit", h, None))

    # -- shutdown ---------------------------------------------------------------------------------------------------
    def close(self, grace_s: float = 5.0) -> None:
        """Idempotent: ask every placed worker to finish within `grace_s`, then kill every actor. After the head was
        lost, Ray is not called at all (every call would wait for the lost GCS until Ray ends this process)."""
        if self._closed:
            return
        self._closed = True
        lost = self.head_lost is not None
        live = [(h, self._remote[h.id]) for h in self.handles.values() if h.state != "dead" and h.id in self._remote]
        stops = [] if lost else [r.actor.stop.remote(grace_s) for h, r in live if r.placed]
        if stops:
            self.ray.wait(stops, num_returns=len(stops), timeout=grace_s + 2.0)
        for _h, r in [] if lost else live:
            with contextlib.suppress(Exception):
                self.ray.kill(r.actor, no_restart=True)
        for h in self.handles.values():
            h.state = "dead"
        self._remote.clear()
        self._blobs.clear()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1
        if lost:  # ray.shutdown, ours or at interpreter exit, would wait for the GCS until Ray ends this process
            import atexit

            with contextlib.suppress(Exception):
                from ray._private import worker as ray_worker

                atexit.unregister(ray_worker.shutdown)
        elif self._owns_ray:
            self.ray.shutdown()


class _HeadProbe:
    """Is the cluster's head (its GCS) still there? A key read with a short timeout every HEAD_PROBE_EVERY_S; lost once
    it has not answered for HEAD_LOST_S, well before Ray's own reconnect timeout ends this process. Uses Ray's GCS
    client (an internal API): without it, nothing is probed."""

    def __init__(self, ray: Any) -> None:
        try:
            from ray.experimental.internal_kv import internal_kv_get_gcs_client

            self._gcs = internal_kv_get_gcs_client()
        except ImportError:
            self._gcs = None
        reconnect = float(os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s") or 60)
        self.lost_after_s = min(30.0, reconnect / 2)
        self._next = time.monotonic()
        self._failing_since: float | None = None

    def lost(self) -> str | None:
        now = time.monotonic()
        if self._gcs is None or now < self._next:
            return None
        self._next = now + HEAD_PROBE_EVERY_S
        try:
            self._gcs.internal_kv_get(b"fishmp-probe", b"fishmp", timeout=HEAD_PROBE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - RpcError ("Timed out while waiting for GCS"), a closed channel...
            self._failing_since = self._failing_since or now
            if time.monotonic() - self._failing_since >= self.lost_after_s:
                first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                return f"its GCS has not answered for {self.lost_after_s:g}s ({first})"
            return None
        self._failing_since = None
        return None
