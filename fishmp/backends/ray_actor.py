"""The Ray actor side of one fishmp worker: fishmp's own worker_main in a thread, behind in-process pipes.

So engines, batching and error handling are the worker's code, unchanged. What this wrapper adds is what a machine
without the main node's disk needs:
- references arrive as content-hashed blobs (Ray object refs) and are materialised once per node in a local cache;
  the task is rewritten to point at the local copy;
- outputs are written by the worker into a node-local temp dir; the wrapper reads the bytes, deletes the file and
  returns them with the real output path, which the main process writes atomically.
The main process long-polls `next()`; tasks arrive through `submit()`, ordered by a sequence number because a threaded
actor runs calls concurrently. Imported only inside Ray worker processes (and by the Ray backend).
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import os
import tempfile
import threading
import time
from typing import Any

from ..config import Settings
from ..worker.process import worker_main
from ..worker.protocol import Done, EncodeTask, Failed, SegmentTask

# What a reference travels as: original path -> (sha256 of its bytes, file suffix, Ray object ref | None, read error).
Blobs = dict[str, tuple[str, str, Any, str | None]]


def _node_local_dir(preferred: str, name: str) -> str:
    """`preferred` when it can be created here (it is the main node's path), else a per-user dir under the temp dir."""
    for path in (preferred, os.path.join(tempfile.gettempdir(), f"{name}-{os.getuid()}")):
        try:
            os.makedirs(path, exist_ok=True)
            if os.access(path, os.W_OK):
                return path
        except OSError:
            continue
    return tempfile.mkdtemp(prefix=f"{name}-")


def _sweep_dead_out_dirs() -> None:
    """Remove the output temp dirs of actors on this node whose process is gone (killed actors leave them)."""
    import glob
    import re
    import shutil

    for path in glob.glob(os.path.join(tempfile.gettempdir(), "fishmp-ray-out-*")):
        m = re.match(r"fishmp-ray-out-(\d+)-", os.path.basename(path))
        if not m:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # alive, another user's


class WorkerActor:
    """One worker. Plain class; fishmp.backends.ray_pool wraps it with ray.remote (max_restarts=0)."""

    def __init__(self, worker_id: str, device: str, settings: Settings) -> None:
        self.worker_id = worker_id
        _sweep_dead_out_dirs()
        self.out_dir = tempfile.mkdtemp(prefix=f"fishmp-ray-out-{os.getpid()}-")
        self.ref_dir = _node_local_dir(os.path.join(tempfile.gettempdir(), "fishmp-ray-refs"), "fishmp-ray-refs")
        settings = settings.replace(cache_dir=_node_local_dir(settings.cache_dir, "fishmp-cache"))
        task_r, self.task_w = mp.Pipe(duplex=False)
        self.res_r, res_w = mp.Pipe(duplex=False)
        self.outputs: dict[str, str] = {}  # task id -> the real output path on the main node
        self.extra: list[Any] = []  # messages this wrapper makes itself (a reference that could not be shipped)
        self.lock = threading.Condition()
        self.next_seq = 0
        self.n_out = 0
        # parent_pid None: the in-process flavour of the worker (no pdeathsig, no os._exit). The device is already
        # narrowed: CUDA_VISIBLE_DEVICES is set for this actor's process, so a GPU worker uses cuda:0.
        self.thread = threading.Thread(target=worker_main, name=f"fishmp-{worker_id}", daemon=True,
                                       args=(worker_id, device, None, settings, task_r, res_w, None))
        self.thread.start()

    def info(self) -> dict[str, Any]:
        """Answered as soon as Ray has placed and constructed the actor (the main process's placement check)."""
        import ray

        return {"pid": os.getpid(), "node": ray.util.get_node_ip_address(), "gpu_ids": list(ray.get_gpu_ids()),
                "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}

    # -- tasks in ----------------------------------------------------------------------------------------------------
    def submit(self, seq: int, task: Any, blobs: Blobs) -> None:
        with self.lock:  # calls may run concurrently and out of order: keep the main process's order
            self.lock.wait_for(lambda: self.next_seq == seq, timeout=60)
            try:
                self._submit(task, blobs)
            finally:
                self.next_seq = max(self.next_seq, seq + 1)
                self.lock.notify_all()

    def _submit(self, task: Any, blobs: Blobs) -> None:
        if task is None:
            self.task_w.send(None)
            return
        try:
            local = {path: self._materialise(path, *blob) for path, blob in blobs.items()}
        except OSError as exc:
            self.extra.append(Failed(self.worker_id, task.id, "bad_reference", str(exc), "", True))
            return
        self.n_out += 1
        if isinstance(task, SegmentTask):
            ref = task.speaker
            ref = dataclasses.replace(
                ref, reference_audio=local.get(ref.reference_audio, ref.reference_audio) if ref.reference_audio else None,
                prompt_tokens=local.get(ref.prompt_tokens, ref.prompt_tokens) if ref.prompt_tokens else None)
            tmp = os.path.join(self.out_dir, f"{self.n_out}.wav")
            self.outputs[task.id] = task.output
            task = dataclasses.replace(task, speaker=ref, output=tmp)
        elif isinstance(task, EncodeTask):
            tmp = os.path.join(self.out_dir, f"{self.n_out}.npy")
            self.outputs[task.id] = task.output_npy
            task = dataclasses.replace(task, audio_path=local.get(task.audio_path, task.audio_path), output_npy=tmp)
        self.task_w.send(task)

    def _materialise(self, path: str, digest: str, suffix: str, ref: Any, error: str | None) -> str:
        """The node-local copy of a reference, fetched from the object store once per node and content."""
        if error:
            raise OSError(f"cannot read reference {path} on the main node: {error}")
        local = os.path.join(self.ref_dir, digest + suffix)
        if not os.path.isfile(local):
            import ray

            data = ray.get(ref)
            tmp = f"{local}.{os.getpid()}.{threading.get_ident()}.tmp"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, local)  # concurrent actors on this node write the same bytes: last rename wins, same file
        return local

    # -- messages out ------------------------------------------------------------------------------------------------
    def next(self, wait_s: float) -> list[tuple[str, Any, bytes | None]]:
        """Messages since the last call, waiting up to `wait_s` for one: ('msg', message, output bytes or None);
        [('end', None, None)] once the worker has returned and said everything."""
        deadline = time.monotonic() + wait_s
        out: list[tuple[str, Any, bytes | None]] = []
        while True:
            with self.lock:
                out.extend(("msg", m, None) for m in self.extra)
                self.extra.clear()
            while self.res_r.poll():
                try:
                    out.append(self._translate(self.res_r.recv()))
                except (EOFError, OSError):
                    break
            if out:
                return out
            if not self.thread.is_alive() and not self.res_r.poll():
                return [("end", None, None)]
            left = deadline - time.monotonic()
            if left <= 0:
                return out
            self.res_r.poll(min(left, 0.05))

    def _translate(self, msg: Any) -> tuple[str, Any, bytes | None]:
        """A Done carries the file's bytes and the real path; the local temp file is gone once this returns."""
        real = self.outputs.pop(getattr(msg, "task", None), None) if isinstance(msg, (Done, Failed)) else None
        if not isinstance(msg, Done) or real is None:
            return ("msg", msg, None)
        try:
            with open(msg.path, "rb") as f:
                data = f.read()
        except OSError as exc:
            return ("msg", Failed(msg.worker, msg.task, "write_error", f"cannot read back {msg.path}: {exc}", "", True),
                    None)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(msg.path)
        return ("msg", dataclasses.replace(msg, path=real), data)

    def stop(self, grace_s: float) -> bool:
        """Ask the worker to finish (it ends after its current task), then clean the temp dir. True if it ended."""
        with contextlib.suppress(OSError, ValueError):
            self.task_w.send(None)
        self.thread.join(timeout=max(0.0, grace_s))
        import shutil

        shutil.rmtree(self.out_dir, ignore_errors=True)
        return not self.thread.is_alive()
