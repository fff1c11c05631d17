"""The worker: one process (or, in single mode, one thread) that loads the model once and runs segments.

Data flow (per worker, two one-way pipes, so a killed worker can never corrupt another worker's channel):

    main --task pipe--> [reader thread] --queue--> [generation loop] --audio--> [writer thread] --result pipe--> main
                                                          \\------------------ Started / Failed ----------------/

- The reader thread doubles as a watchdog: EOF on the task pipe means the main process is gone, and the worker exits.
  With PR_SET_PDEATHSIG the kernel also kills it when the main process dies, even by SIGKILL.
- Wavs are written by the writer thread (off the generation thread), atomically; only then is the segment reported.
- Failures travel as data (kind, message, traceback text). Input problems keep the worker; anything else makes it
  leave on purpose (after saying so) so that the main process starts a clean replacement.

Protocol with the main process (batched decoding, FISH_BATCH_SIZE; fishmp/worker/lanes.py runs the loop):
- `Ready.batch_size` = B, the lanes this worker offers (1 when the engine cannot batch). The main process may have up
  to B running + 1 queued tasks outstanding on it. Tasks of any speakers share a session of up to B rows (mixed
  voices; FISH_BATCH_MIXED=0, a benchmarking knob: one speaker at a time).
- `Started(task)` when the task's row is added (its deadline starts then), then exactly one `Done` or `Failed` per
  task. A retake (the take check failed, fishmp/worker/takes.py) sends `Started` again when its row is added: each take gets
  the segment's full deadline. Rows start and finish independently: several tasks are running at once, and a row
  that finishes is refilled with the next task at the next step (FISH_BATCH_REFILL=0, a benchmarking knob: only when
  the session is empty).
- `SegmentTask.solo`: run it in a session of its own. The main process sets it for a segment whose earlier attempt
  died with its worker (or came back in a `Failed` with input_error False), so a poison segment cannot take its
  batchmates down again.
- `Resized(batch_size)`: out of memory halved this worker's batch; tasks beyond the new lanes wait unstarted in the
  worker (no Started), so the main process may dispatch fewer (ignoring the message is safe).
- A worker that leaves on purpose sends `Failed(input_error=False)` for the tasks it blames first; the other tasks
  outstanding on it were innocent (requeue them without counting an attempt).
- `Leaving(reason, figures, handed_back)`: recycling (FISH_WORKER_MAX_SEGMENTS / FISH_WORKER_MAX_GROWTH_GB,
  fishmp/worker/recycle.py). No new rows; the running ones finish (Done as usual); `handed_back` were never started here and
  are requeued at once, uncounted (so are tasks that arrive after it); then it exits 0 and the main process starts a
  fresh worker in its slot without charging FISH_MAX_RESTARTS.

What deserves a reload (a model reload costs 30 s+): only what may have broken the process or the device.
- Input errors (bad reference, text too long, parameters the engine refuses): that segment fails, the worker stays.
- EngineOutOfMemoryError in a batch: free cached memory, halve this worker's batch (for good, min 1) and redo the
  batch's rows from the start (same seeds: same audio). In a session of one: retry once, then fail `out_of_memory`
  and recycle (a fresh process has an unfragmented allocator).
- EngineError (an error the engine raised on purpose; ValueError too) in a batch of several rows: each row is redone
  alone, so only the culprit fails. A segment that fails twice alone fails `engine_error` without a reload: the
  engine is intact and a fresh process would fail it the same way (before, each retry cost a model reload).
- Anything else (RuntimeError, AssertionError..., and any error whose text names a CUDA error: those are sticky, every
  later call fails too): the process is suspect. Every row of the batch is reported Failed (input_error False:
  requeued, attempts + 1) and the worker leaves; the main process retries them solo in a clean worker.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import queue
import signal
import threading
import time
import traceback
from multiprocessing.connection import Connection
from typing import Any

from ..config import Settings
from .protocol import INPUT_ERRORS, Done, EncodeTask, Failed, LoadFailed, Ready, SegmentTask, SpeakerRef


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
    from ..planning.gpus import GIB, nvml_free_bytes

    try:
        return nvml_free_bytes(pin) / GIB
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

    from ..engines import EngineOutOfMemoryError, create_engine, torch_device_for
    from .footprint import FootprintProbe

    t0 = time.perf_counter()
    try:
        # A child sees only its GPU, as cuda:0; in-process, the host's view of the GPUs stays untouched.
        if pin is None:
            engine_device = device
        elif child:
            engine_device = "cuda:0"
        else:
            engine_device = torch_device_for(pin) if settings.engine == "fish" else device
        probe = FootprintProbe.start(settings, pin, child)  # auto: NVML free memory before the CUDA context
        engine = create_engine(settings, engine_device)
        engine.load()
        footprint = probe.finish(engine) if probe else None  # auto: the warm-up, then the drop
    except BaseException as exc:  # noqa: BLE001 - report any load failure with its cause, then leave
        kind = getattr(exc, "kind", "load_error")
        msg = f"{type(exc).__name__}: {exc}"
        if isinstance(exc, EngineOutOfMemoryError):
            free = _free_gib(pin)
            msg += f" (free GPU memory seen: {free:.2f} GiB)" if free is not None else ""
        send(LoadFailed(worker_id, kind, msg, traceback.format_exc()))
        return
    load_s = time.perf_counter() - t0
    batch_size = max(1, int(getattr(settings, "batch_size", 1)))
    runner = _SegmentRunner(worker_id, engine, settings, send, inbox, batch_size, refill_enabled())
    send(Ready(worker_id, os.getpid(), device, load_s, runner.lanes.capacity, footprint))
    try:
        off_main_thread(runner.lanes.run)  # returns at the stop sentinel, or early when the worker must leave
    finally:
        runner.close()


def off_main_thread(fn: Any) -> None:
    """Run `fn` on a thread of its own and wait for it (its exception is raised here). torch's CPU ops run from a
    process's main thread were 2-10x slower than from another thread on a loaded 2-core machine (OpenMP's team of
    the initial thread; a 64x4096 linear: 72-779 us vs 50-52 us), so a CPU worker generates off the main thread."""
    failed: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            failed.append(exc)

    thread = threading.Thread(target=target, name="fishmp-generate")
    thread.start()
    thread.join()
    if failed:
        raise failed[0]


def refill_enabled() -> bool:
    """FISH_BATCH_REFILL=0 (a benchmarking knob, not a setting): rows are added only when the session is empty."""
    return os.environ.get("FISH_BATCH_REFILL", "1").strip().lower() not in ("0", "false", "no", "off")


class _SegmentRunner:
    """The worker's state around its lanes: prepared speaker prompts and the writer thread."""

    def __init__(self, worker_id: str, engine: Any, settings: Settings, send: _Sender, inbox: queue.Queue,
                 batch_size: int = 1, refill: bool = True) -> None:
        from .lanes import LaneRunner
        from .recycle import RecyclePolicy, engine_memory_kind

        self.worker_id, self.engine, self.settings, self.send = worker_id, engine, settings, send
        self.prompts: dict[SpeakerRef, Any] = {}  # prepared once per speaker (and per reference content)
        self.prompts_lock = threading.Lock()
        from .references import codebook_sizes

        self.codebooks = codebook_sizes(settings)  # prompt codes beyond them: that speaker fails bad_reference
        # Bounded (back-pressure on generation when the disk is slow), but a whole batch finishing at once fits.
        self.writes: queue.Queue = queue.Queue(maxsize=max(4, 2 * batch_size))
        self.writer = threading.Thread(target=self._write_loop, name="fishmp-writer", daemon=True)
        self.writer.start()
        from .voices import VoiceStage

        # References encoded beside the decode loop (fishmp/worker/voices.py), in the engine's context for side work
        # (its torch threads; on CUDA a stream of its own) when it has one
        voices = VoiceStage(self._prompt, getattr(engine, "beside", None))
        self.lanes = LaneRunner(worker_id, engine, inbox, self._send_named, self.writes, self._prompt,
                                settings.cache_dir, batch_size, refill, voices=voices,
                                cached=lambda ref: self.prompts.get(ref))
        self.lanes.recycle = RecyclePolicy.from_settings(settings, engine_memory_kind(engine))

    def close(self) -> None:
        self.writes.put(None)
        self.writer.join()

    def _send_named(self, msg: object) -> None:
        """Engines name a voice by its content key (SpeakerPrompt.key, a hash); the person reading a failure needs
        the speaker's id from the job, which this worker knows."""
        if isinstance(msg, Failed) and any(p.key in msg.message for p in self.prompts.values()):
            text = msg.message
            for ref, prompt in self.prompts.items():
                text = text.replace(f"speaker {prompt.key}", f'speaker "{ref.id}"').replace(prompt.key, f'"{ref.id}"')
            msg = dataclasses.replace(msg, message=text)
        self.send(msg)

    def _fail(self, task_id: str, kind: str, message: str, tb: str = "") -> None:
        self.send(Failed(self.worker_id, task_id, kind, message, tb, kind in INPUT_ERRORS))

    def _prompt(self, ref: SpeakerRef) -> Any:
        from ..engines import SpeakerPrompt
        from .references import encode_cached, load_prompt_tokens, speaker_key

        # Runs on the voice stage's thread while the decode and writer threads read (and iterate) self.prompts: a
        # new dict replaces it (copy on write; 64 entries at most), one it has published is never changed
        if (hit := self.prompts.get(ref)) is not None:
            return hit
        if ref.prompt_tokens:
            tokens = load_prompt_tokens(ref.prompt_tokens, self.codebooks)
        else:
            tokens, _ = encode_cached(self.engine, ref.reference_audio, self.settings.cache_dir, self.codebooks)
        prompt = SpeakerPrompt(speaker_key(tokens, ref.reference_text), tokens, ref.reference_text)
        with self.prompts_lock:
            prompts = dict(self.prompts)
            if len(prompts) >= 64:  # bounded: a long-lived pool sees many voices
                prompts.pop(next(iter(prompts)))
            prompts[ref] = prompt
            self.prompts = prompts
        return prompt

    def _not_audio(self, task: SegmentTask, take: dict | None) -> None:
        """A take with NaN or inf samples is not audio: the segment fails (`nonfinite`) and nothing is written. The
        take check keeps such a take only when every take was one."""
        tried = f"all {take['tried']} takes (FISH_TAKE_RETRIES={self.settings.take_retries})" if take else \
            "its take (FISH_TAKE_CHECK=false)"
        self.send(Failed(self.worker_id, task.id, "nonfinite", f"{tried} had NaN or inf samples: not audio, nothing "
                         f"was written to {task.output}", "", True))  # the engine is intact: the worker stays

    def _write_loop(self) -> None:
        import numpy as np

        from .files import atomic_write, write_wav

        while (item := self.writes.get()) is not None:
            task, payload, busy_s = item
            try:
                if isinstance(task, EncodeTask):
                    atomic_write(task.output_npy, lambda tmp, a=payload: np.save(tmp, a), ".npy")
                    self.send(Done(self.worker_id, task.id, task.output_npy, 0.0, busy_s, 0))
                    continue
                if not np.isfinite(payload.samples).all():  # NaN/inf become full-scale spikes in 16-bit PCM
                    self._not_audio(task, getattr(payload, "take", None))
                    continue
                samples, seconds, fitted = payload.samples, payload.seconds, None
                if getattr(task, "fit", None):  # here, off the decode loop: fitting never stalls a batch
                    from .fit import fit_take

                    samples, fitted = fit_take(payload.samples, payload.sample_rate, task.fit)
                    seconds = len(samples) / payload.sample_rate
                write_wav(task.output, samples, payload.sample_rate)
                self.send(Done(self.worker_id, task.id, task.output, seconds, busy_s, payload.tokens,
                               getattr(payload, "take", None), fitted))
            except OSError as exc:  # disk full, permissions: the temp file is already removed
                target = task.output if isinstance(task, SegmentTask) else task.output_npy
                self._fail(task.id, "write_error", f"cannot write {target}: {exc.strerror or exc}")
            except Exception as exc:  # noqa: BLE001
                self._fail(task.id, "write_error", f"{type(exc).__name__}: {exc}", traceback.format_exc())

