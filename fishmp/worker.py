"""The worker: one process (or, in single mode, one thread) that loads the model once and runs segments.

Data flow (per worker, two one-way pipes, so a killed worker can never corrupt another worker's channel):

    main --task pipe--> [reader thread] --queue--> [generation loop] --audio--> [writer thread] --result pipe--> main
                                                          \\------------------ Started / Failed ----------------/

- The reader thread doubles as a watchdog: EOF on the task pipe means the main process is gone, and the worker exits.
  With PR_SET_PDEATHSIG the kernel also kills it when the main process dies, even by SIGKILL.
- Wavs are written by the writer thread (off the generation thread), atomically; only then is the segment reported.
- Failures travel as data (kind, message, traceback text). Input problems keep the worker; anything else makes it
  leave on purpose (after saying so) so that the main process starts a clean replacement.
"""

from __future__ import annotations

import ctypes
import os
import queue
import signal
import threading
import time
import traceback
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from .config import Settings


# ---- messages (frozen dataclasses, matched by id) -------------------------------------------------------------
@dataclass(frozen=True)
class SpeakerRef:
    id: str
    reference_text: str
    reference_audio: str | None = None
    prompt_tokens: str | None = None
    # Content hash of the reference file + transcript: a pool reused across jobs must not mistake a new "speaker 3"
    # (dubbing backends reuse ids and paths per video) for the last job's.
    fingerprint: str = ""


@dataclass(frozen=True)
class SegmentTask:
    id: str
    text: str
    speaker: SpeakerRef
    params: dict[str, Any]  # SynthesisParams fields; absent = engine default
    output: str


@dataclass(frozen=True)
class EncodeTask:
    id: str
    audio_path: str
    output_npy: str


@dataclass(frozen=True)
class Ready:
    worker: str
    pid: int
    device: str
    load_seconds: float


@dataclass(frozen=True)
class LoadFailed:
    worker: str
    kind: str
    message: str
    traceback: str


@dataclass(frozen=True)
class Started:
    worker: str
    task: str


@dataclass(frozen=True)
class Done:
    worker: str
    task: str
    path: str
    audio_seconds: float
    synthesis_seconds: float
    tokens: int


@dataclass(frozen=True)
class Failed:
    worker: str
    task: str
    kind: str
    message: str
    traceback: str
    input_error: bool  # True: the input is bad (do not retry); False: the worker is leaving, requeue the task


INPUT_ERRORS = ("bad_reference", "text_too_long", "write_error", "out_of_memory")


def _die_with_parent(parent_pid: int) -> None:
    """Ask the kernel to SIGKILL us when the main process dies (Linux), then close the race with a check."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent_pid:
        os._exit(0)


def _free_gib(pin: str | None) -> float | None:
    """Free memory on the pinned GPU as NVML sees it (for load-OOM messages); None off-GPU."""
    if not pin:
        return None
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = (pynvml.nvmlDeviceGetHandleByUUID(pin) if not pin.isdigit()
                 else pynvml.nvmlDeviceGetHandleByIndex(int(pin)))
            return pynvml.nvmlDeviceGetMemoryInfo(h).free / 1024**3
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # noqa: BLE001 - only used to enrich a message
        return None


class _Sender:
    """Serialises sends from the generation and writer threads onto one pipe."""

    def __init__(self, conn: Connection) -> None:
        self.conn, self.lock = conn, threading.Lock()

    def __call__(self, msg: object) -> None:
        with self.lock:
            self.conn.send(msg)


def worker_main(worker_id: str, device: str, pin: str | None, settings: Settings, task_conn: Connection,
                result_conn: Connection, parent_pid: int | None, cpu_threads: int | None = None) -> None:
    """Entry point of a worker. `parent_pid` None means in-process (a thread of the main process)."""
    child = parent_pid is not None
    if child:
        _die_with_parent(parent_pid)
        if cpu_threads:  # CPU workers share the cores: N workers x all-cores threads would thrash
            for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[var] = str(cpu_threads)
        # Ctrl-C in a terminal reaches the whole process group: only the main process decides what it means.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        # Must happen before torch initialises CUDA: the worker then sees only its GPU, and a CPU worker none at all
        # (fish-speech calls torch.cuda.synchronize() whenever CUDA is available, which would open a context on GPU 0).
        os.environ["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        os.environ["CUDA_VISIBLE_DEVICES"] = pin if pin is not None else ""
    send = _Sender(result_conn)
    inbox: queue.Queue = queue.Queue()

    def reader() -> None:
        try:
            while True:
                inbox.put(task_conn.recv())
        except (EOFError, OSError):
            if child:
                os._exit(0)  # the main process is gone: never outlive it
            inbox.put(None)

    threading.Thread(target=reader, name="fishmp-reader", daemon=True).start()

    from .engines import EngineOutOfMemoryError, create_engine, torch_device_for

    t0 = time.perf_counter()
    try:
        # A child sees only its GPU, as cuda:0; in-process, the host's view of the GPUs stays untouched.
        if pin is None:
            engine_device = device
        elif child:
            engine_device = "cuda:0"
        else:
            engine_device = torch_device_for(pin) if settings.engine == "fish" else device
        engine = create_engine(settings, engine_device)
        engine.load()
    except BaseException as exc:  # noqa: BLE001 - report any load failure with its cause, then leave
        kind = getattr(exc, "kind", "load_error")
        msg = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, EngineOutOfMemoryError):
            free = _free_gib(pin)
            msg += f" (free GPU memory seen: {free:.2f} GiB)" if free is not None else ""
        send(LoadFailed(worker_id, kind, msg, traceback.format_exc()))
        return
    send(Ready(worker_id, os.getpid(), device, time.perf_counter() - t0))

    runner = _SegmentRunner(worker_id, engine, settings, send)
    try:
        while (task := inbox.get()) is not None:
            if not runner.run(task):
                break  # leaving on purpose after a non-input failure: the main process replaces us
    finally:
        runner.close()


class _SegmentRunner:
    def __init__(self, worker_id: str, engine: Any, settings: Settings, send: _Sender) -> None:
        self.worker_id, self.engine, self.settings, self.send = worker_id, engine, settings, send
        self.prompts: dict[SpeakerRef, Any] = {}  # prepared once per speaker (and per reference content)
        self.writes: queue.Queue = queue.Queue(maxsize=4)
        self.writer = threading.Thread(target=self._write_loop, name="fishmp-writer", daemon=True)
        self.writer.start()

    def close(self) -> None:
        self.writes.put(None)
        self.writer.join()

    def _fail(self, task_id: str, kind: str, message: str, tb: str = "") -> None:
        self.send(Failed(self.worker_id, task_id, kind, message, tb, kind in INPUT_ERRORS))

    def _prompt(self, ref: SpeakerRef) -> Any:
        from .engines import SpeakerPrompt
        from .references import encode_cached, load_prompt_tokens, speaker_key

        if ref not in self.prompts:
            if ref.prompt_tokens:
                tokens = load_prompt_tokens(ref.prompt_tokens)
            else:
                tokens, _ = encode_cached(self.engine, ref.reference_audio, self.settings.cache_dir)
            if len(self.prompts) >= 64:  # bounded: a long-lived pool sees many voices
                self.prompts.pop(next(iter(self.prompts)))
            self.prompts[ref] = SpeakerPrompt(speaker_key(tokens, ref.reference_text), tokens, ref.reference_text)
        return self.prompts[ref]

    def run(self, task: SegmentTask | EncodeTask) -> bool:
        """Run one task; False when the worker must leave (engine broken)."""
        from .engines import BadReferenceError, EngineOutOfMemoryError, SynthesisParams, TextTooLongError

        self.send(Started(self.worker_id, task.id))
        t0 = time.perf_counter()
        try:
            if isinstance(task, EncodeTask):
                from .references import encode_cached

                tokens, _ = encode_cached(self.engine, task.audio_path, self.settings.cache_dir)
                self.writes.put((task, tokens, time.perf_counter() - t0))
                return True
            prompt = self._prompt(task.speaker)
            params = SynthesisParams(**task.params)
            audio = None
            for _ in range(2):  # out of memory: free what we can (outside the except block) and retry once
                try:
                    audio = self.engine.synthesize(task.text, prompt, params)
                    break
                except EngineOutOfMemoryError:
                    pass
                self.engine.release_memory()
            if audio is None:
                self._fail(task.id, "out_of_memory",
                           "out of GPU memory twice on this segment; raise FISH_MODEL_MEMORY_GB (fewer workers per GPU) "
                           "or lower max_new_tokens")
                return False  # recycle: a fresh process has an unfragmented allocator
            self.writes.put((task, audio, time.perf_counter() - t0))
            return True
        except (BadReferenceError, TextTooLongError) as exc:
            self._fail(task.id, exc.kind, str(exc))
            return True
        except Exception as exc:  # noqa: BLE001 - an engine fault: report it and leave so a clean worker replaces us
            self._fail(task.id, getattr(exc, "kind", "engine_error"), f"{type(exc).__name__}: {exc}",
                       traceback.format_exc())
            return False

    def _write_loop(self) -> None:
        import numpy as np

        from .results import atomic_write, write_wav

        while (item := self.writes.get()) is not None:
            task, payload, busy_s = item
            try:
                if isinstance(task, EncodeTask):
                    atomic_write(task.output_npy, lambda tmp, a=payload: np.save(tmp, a), ".npy")
                    self.send(Done(self.worker_id, task.id, task.output_npy, 0.0, busy_s, 0))
                    continue
                write_wav(task.output, payload.samples, payload.sample_rate)
                self.send(Done(self.worker_id, task.id, task.output, payload.seconds, busy_s, payload.tokens))
            except OSError as exc:  # disk full, permissions: the temp file is already removed
                target = task.output if isinstance(task, SegmentTask) else task.output_npy
                self._fail(task.id, "write_error", f"cannot write {target}: {exc.strerror or exc}")
            except Exception as exc:  # noqa: BLE001
                self._fail(task.id, "write_error", f"{type(exc).__name__}: {exc}", traceback.format_exc())

