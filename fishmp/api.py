"""The library API: a pool of model-loaded workers that a backend starts once and reuses for many jobs.

    if __name__ == "__main__":                          # workers are spawned: they re-import your main module
        with fishmp.Pool(model_memory_gb=6.0) as pool:
            result = pool.generate(job, on_event=print)  # job: a path, a dict (the JSON structure) or a Job
            handle = pool.submit(other_job)              # from any thread; jobs share the workers fairly
            handle.cancel()                              # ends only that job


Settings come from the environment (FISH_*) overridden by keyword arguments; `.env` is never read here.
The library never prints, never exits and never installs signal handlers: errors are raised (`ConfigError`,
`JobError`), outcomes are returned (`JobResult`) and progress goes to `on_event`.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import signal
import threading
import weakref
from collections import deque
from typing import Any

from .backends import make_worker_pool
from .backends.contract import PoolError, describe_exit, refuse_in_bootstrap
from .config import Settings
from .job import EncodeJob, Job, default_output_dir, job_from_dict, load_job
from .planning.checkpoint import engine_fingerprint
from .planning.gpus import GPU, nvml_inventory, select_devices
from .planning.plan import Plan, make_plan, memory_check, plan_log_lines
from .running.delivery import current as current_delivery
from .running.jobrun import JobResult, JobRun, remaining_segments, warn_if_no_cache
from .running.progress import EventCallback, make_event
from .running.service import JobHandle, Service
from .worker.protocol import Done, EncodeTask, Failed, LoadFailed, Ready

log = logging.getLogger("fishmp")
_open_pools: weakref.WeakSet[Pool] = weakref.WeakSet()  # closed at interpreter exit if the caller did not
_exit_hook = threading.Lock()
_exit_hook_set = False


def _close_open_pools() -> None:
    """At interpreter exit, a Pool the script never closed is closed as `close()` would: its running jobs end
    interrupted with manifests that say what is on disk (not the last periodic save), and its workers stop."""
    for pool in list(_open_pools):
        with contextlib.suppress(Exception):
            pool.close()


def _close_at_exit(pool: Pool) -> None:
    """Registered after the backend's own exit hooks (LIFO: it runs before them, while workers still answer)."""
    global _exit_hook_set
    with _exit_hook:
        _open_pools.add(pool)
        if not _exit_hook_set:
            atexit.register(_close_open_pools)
            _exit_hook_set = True


def plan_for(settings: Settings, gpus: list[GPU] | None = None, n_segments: int | None = None) -> Plan:
    inventory = nvml_inventory() if gpus is None else gpus
    selected = select_devices(inventory, settings.devices)
    estimate = _estimate_if_readable(settings) if selected else None
    row_gib = estimate.kv_row_bytes / 1024**3 if estimate else None  # exact per-row KV of this checkpoint
    plan = make_plan(selected, settings, n_segments, row_gib=row_gib)
    if estimate:  # say before loading anything when a GPU cannot hold even one worker
        for line in memory_check(plan, estimate.total_gib, row_gib or 0.0):
            log.warning(line)
    return plan


def _estimate_if_readable(settings: Settings) -> Any:
    """The torch-free memory estimate of the Fish checkpoint, or None (synthetic engine, checkpoint not readable:
    the plan then uses FISH_MODEL_MEMORY_GB and S1-mini's row size alone)."""
    if settings.engine != "fish":
        return None
    from .planning.explain import estimate_for
    from .planning.memory import CheckpointReadError

    try:
        return estimate_for(settings)
    except (CheckpointReadError, OSError):
        return None


FRAMES_PER_SECOND = 44100 / 2048  # S1 codec: one semantic frame per 2048 samples at 44.1 kHz
GENERATION_RESERVE = 2048  # fish-speech refuses prompts longer than max_seq_len - 2048


def sized_max_seq_len(job: Job) -> int:
    """A KV-cache length that fits this job's longest prompt (reference frames + transcript + text, one token per
    UTF-8 byte at most) plus fish-speech's 2048-token generation reserve, rounded up to 256. Texts that would not
    fit are split at sentences by the engine, so only the reference has to fit, and the text term is capped."""
    import numpy as np
    import soundfile as sf

    longest_ref = 0
    for sp in job.speakers.values():
        try:
            if sp.prompt_tokens:
                frames = int(np.load(sp.prompt_tokens, mmap_mode="r").shape[-1])
            else:
                frames = int(sf.info(sp.reference_audio).duration * FRAMES_PER_SECOND) + 1
        except Exception:  # noqa: BLE001 - an unreadable reference fails its own segments later, with its name
            continue
        longest_ref = max(longest_ref, frames + len(sp.reference_text.encode()))
    longest_text = min(max((len(s.text.encode()) for s in job.segments), default=0), 1024)
    need = longest_ref + longest_text + 64 + GENERATION_RESERVE  # 64: role and modality tokens
    return -(-need // 256) * 256


def resolve_settings(settings: Settings, job: Job | None) -> Settings:
    """Settings that depend on the job: FISH_MAX_SEQ_LEN=auto becomes a length (the checkpoint's without a job)."""
    if settings.max_seq_len != "auto" or settings.engine != "fish":
        return settings
    return settings.replace(max_seq_len=sized_max_seq_len(job) if job is not None else None)


def as_job(job: Job | str | os.PathLike | dict, output_dir: str | None = None) -> Job:
    if isinstance(job, Job):
        return job
    if isinstance(job, dict):  # relative paths resolve against the cwd, as if it were a job.json there
        out = output_dir or default_output_dir(os.path.join(os.getcwd(), "job.json"), job)
        return job_from_dict(job, base_dir=os.getcwd(), output_dir=os.path.abspath(out))
    return load_job(os.fspath(job), output_dir)


class Pool:
    """Workers per the plan, each loading the model once; shared by every job submitted until `close()`.

    Thread-safe: `submit`/`generate` from any number of threads; jobs run at once and share the workers."""

    def __init__(self, settings: Settings | None = None, *, gpus: list[GPU] | None = None, plan: Plan | None = None,
                 n_segments: int | None = None, job: Job | None = None, **overrides: Any) -> None:
        """`job`, when known up front, sizes what depends on it (FISH_MAX_SEQ_LEN=auto); `n_segments` caps workers."""
        refuse_in_bootstrap()
        self.settings = settings.replace(**overrides) if settings else Settings.from_env(**overrides)
        self.settings = resolve_settings(self.settings, job)
        self.plan = plan or plan_for(self.settings, gpus, n_segments)  # make_plan runs even a lone worker as a child
        for line in plan_log_lines(self.plan):
            log.info(line)
        self.engine_fingerprint = engine_fingerprint(self.settings)
        self._workers = make_worker_pool(self.plan, self.settings, n_segments)  # local processes, or Ray actors
        _close_at_exit(self)
        self._service: Service | None = None  # started by the first job (encode drives the workers itself)
        self._lock = threading.Lock()
        self._closed = False

    def __enter__(self) -> Pool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def cluster_lost(self) -> str | None:
        """FISH_BACKEND=ray: why the cluster was lost (its head node unreachable), else None. Ray ends a driver that
        cannot reach its head within about 60 s (gcs_rpc_server_reconnect_timeout_s); fishmp ends its jobs first."""
        return getattr(self._workers, "head_lost", None)

    @property
    def interrupted(self) -> int | None:
        """The signal that stopped the last job, if any."""
        return self._workers.stop_signal

    def request_stop(self, signum: int) -> None:
        """Stop every running job as if interrupted by `signum` (safe to call from a signal handler; a second call
        stops at once). Workers still busy with those jobs are killed; the pool takes new jobs afterwards."""
        self._workers.request_stop(signum)

    def submit(self, job: Job | str | os.PathLike | dict, *, output_dir: str | None = None,
               on_event: EventCallback | None = None, resume: bool = True, priority: float = 1.0,
               stream: bool = False) -> JobHandle:
        """Start a job next to any others running; returns at once. `priority` weighs its share of the workers
        (2.0: twice the workers of a 1.0 job while both have work). `stream`: each segment's audio also comes as
        `segment_audio` events (id, index, samples: float32 numpy, sample_rate) while it decodes, before its
        `segment_done`; a streamed segment is never retaken (its audio has left). `on_event` is called from a thread of this
        job's own (fishmp/running/delivery.py): in order, `finished` last and before the result is returned."""
        if not priority > 0:
            raise ValueError(f"priority={priority!r} is not valid: a number greater than 0")
        with self._lock:
            if self._closed:
                raise PoolError("this fishmp.Pool is closed: create a new Pool (or use it inside its `with` block)")
            if self._service is None:
                self._service = Service(self._workers)
            service = self._service
        run = JobRun(as_job(job, output_dir), self.engine_fingerprint, self.settings, on_event, resume,
                     number=service.new_number(), priority=priority, stream=stream)
        return service.submit(run)

    def generate(self, job: Job | str | os.PathLike | dict, *, output_dir: str | None = None,
                 on_event: EventCallback | None = None, resume: bool = True, priority: float = 1.0) -> JobResult:
        """Run a job and wait for its result (= `submit(...).result()`). Not from inside an on_event callback
        (PoolError): waiting there would hold back the events of the callback's own job; use `submit` there."""
        if current_delivery() is not None:
            raise PoolError("pool.generate() was called from an on_event callback: it would wait for a job while "
                            "holding back the events (and so the result) of the job the callback belongs to; call "
                            "pool.submit() there and wait for its handle from another thread")
        return self.submit(job, output_dir=output_dir, on_event=on_event, resume=resume, priority=priority).result()

    def warm(self) -> None:
        """Start the job loop now, so the workers load and say ready before the first job comes (a server).
        Without it the loop starts with the first job."""
        with self._lock:
            if self._closed:
                raise PoolError("this fishmp.Pool is closed: create a new Pool (or use it inside its `with` block)")
            if self._service is None:
                self._service = Service(self._workers)

    def stats(self) -> dict[str, Any]:
        """A snapshot for monitoring, from any thread: workers by state (starting, ready, leaving, dead), the lanes
        the ready ones offer, and the segments they are running now."""
        handles = list(self._workers.handles.values())
        states: dict[str, int] = {}
        for h in handles:
            states[h.state] = states.get(h.state, 0) + 1
        return {"workers": states, "lanes": sum(h.batch_size for h in handles if h.state == "ready"),
                "running_segments": sum(len(h.running) for h in handles)}

    def cancel(self, handle: JobHandle) -> None:
        """End one job (= `handle.cancel()`); the others and the pool go on."""
        handle.cancel()

    def encode(self, job: EncodeJob, on_event: EventCallback | None = None) -> dict[str, str]:
        """Encode each speaker's reference audio to its .npy (through the reference cache), on every ready worker.

        Returns {speaker id: error} for the speakers that could not be encoded (empty when all were). A worker that
        dies takes its items back to the queue (up to FISH_MAX_ATTEMPTS) and is replaced within FISH_MAX_RESTARTS.
        """
        with self._lock:
            if self._closed:
                raise PoolError("this fishmp.Pool is closed: create a new Pool (or use it inside its `with` block)")
            if self._service is not None:
                raise PoolError("encode needs a Pool of its own (this one has run generate jobs)")
        emit = on_event or (lambda ev: None)
        warn_if_no_cache(self.settings.cache_dir)
        items = {str(it.speaker_id): it for it in job.items}
        todo = deque(items)
        attempts: dict[str, int] = dict.fromkeys(items, 0)
        errors: dict[str, str] = {}
        load_error = "every worker slot used its restarts"
        workers = self._workers
        while todo or any(h.outstanding for h in workers.handles.values()):
            if workers.stop_signal is not None:
                pending = list(todo) + [sid for h in workers.handles.values() for sid in h.outstanding]
                errors.update({sid: f"interrupted by {signal.Signals(workers.stop_signal).name}" for sid in pending})
                break
            for h in [h for h in workers.handles.values() if h.state == "ready"]:
                while todo and len(h.outstanding) < 2:
                    it = items[todo.popleft()]
                    workers.send(h, EncodeTask(str(it.speaker_id), it.reference_audio, it.output_npy))
            if all(h.state == "dead" for h in workers.handles.values()):
                errors.update({sid: f"no worker could load the model: {load_error}" for sid in todo})
                break
            for kind, h, msg in workers.poll(1.0):
                if kind == "exit":
                    for sid in h.outstanding:
                        attempts[sid] += 1
                        if attempts[sid] < self.settings.max_attempts:
                            todo.append(sid)
                        else:
                            errors[sid] = f"encoding stopped its worker {attempts[sid]} times"
                    h.outstanding.clear()
                    if not h.ever_ready and not h.leaving:
                        load_error = f"the worker stopped while loading the model: {describe_exit(msg)}"
                    workers.charge(h.slot, suspect=False)
                    if todo and workers.respawn(h.slot) is None:
                        log.warning("[Worker %s] slot %d used its restarts (FISH_MAX_RESTARTS)", h.id, h.slot)
                elif isinstance(msg, Ready):
                    h.state, h.pid, h.ever_ready = "ready", msg.pid, True
                    emit(make_event("worker_ready", worker=h.id, pid=msg.pid, device=h.device,
                                    load_seconds=round(msg.load_seconds, 3)))
                elif isinstance(msg, LoadFailed):
                    h.state, h.leaving, load_error = "leaving", True, msg.message
                elif isinstance(msg, Done | Failed):
                    h.outstanding.remove(msg.task)
                    if isinstance(msg, Failed):
                        errors[msg.task] = msg.message
                        if not msg.input_error:
                            h.state, h.leaving = "leaving", True
                    else:
                        emit(make_event("speaker_encoded", speaker_id=msg.task, path=msg.path,
                                        seconds=round(msg.synthesis_seconds, 3), worker=h.id))
        return errors

    def close(self, grace_s: float = 5.0) -> None:
        """Stop everything: running jobs end at once (interrupted, manifests written), workers exit. Idempotent;
        later calls to submit/generate raise PoolError."""
        with self._lock:
            self._closed, service = True, self._service
        if service is not None:
            service.close()
        self._workers.close(grace_s)
        _open_pools.discard(self)

    shutdown = close


NO_WORKERS_PLAN = {"workers": 0, "mode": "none", "cpu_workers": 0, "gpus": [], "warnings": []}


def finish_without_workers(job: Job, settings: Settings, *, on_event: EventCallback | None = None,
                           resume: bool = True) -> JobResult | None:
    """A job with nothing left to do (every segment resumes): the same events (`plan` with 0 workers, a skipped
    `segment_done` per segment, `finished`), manifest and result as a run, but no worker is started and no model
    loaded. None (nothing done, the directory released) when a segment turned out to need work after all."""
    run = JobRun(job, engine_fingerprint(settings), settings, on_event, resume, number=0)
    run.prepare(0, NO_WORKERS_PLAN, "none")
    if run.sched.pending_count:
        run.lock.release()
        return None
    log.info("[Main] nothing left to do: all %d segments are done (resumed); no worker started", run.skipped)
    handle = JobHandle(run, None)
    handle._set(run.finish(set()))
    return handle.result()


def generate(job: Job | str | os.PathLike | dict, *, output_dir: str | None = None, on_event: EventCallback | None = None,
             resume: bool = True, **settings: Any) -> JobResult:
    """One-off: plan for the segments left to do (resume), start workers, run the job, stop the workers. With none
    left, no worker is started (finish_without_workers)."""
    job = as_job(job, output_dir)
    base = Settings.from_env(**settings)
    todo = remaining_segments(job, engine_fingerprint(base), resume)
    if not todo and (done := finish_without_workers(job, base, on_event=on_event, resume=resume)) is not None:
        return done
    with Pool(n_segments=max(todo, 1), job=job, **settings) as pool:
        return pool.generate(job, on_event=on_event, resume=resume)


__all__ = ["JobHandle", "Pool", "PoolError", "finish_without_workers", "generate", "plan_for", "remaining_segments"]
