"""The worker's generation loop: B lanes (rows of one BatchSession) fed from the worker's inbox.

Tasks arrive in order on the inbox and wait in a backlog. A session's rows may be of any speakers (mixed voices): the
loop adds a row for the task at the head of the backlog while the session has free rows, whatever its speaker, steps
the session, hands finished rows to the writer and, with refill on, fills the rows that freed up before the next
step (continuous refill); with refill off it adds rows only when the session is empty (the benchmark's baseline,
FISH_BATCH_REFILL=0). Refill takes tasks from the head of the backlog only, so a solo task (a session of its own),
an encode task or the stop sentinel ends the refill and waits until the session drains: tasks start in the order
they came. FISH_BATCH_MIXED=0 (a benchmarking knob) restores single-voice sessions: a task of another speaker than
the rows' waits until the session drains. Batch 1 runs the same kind of session (engine.open_batch(1)), so the batch
size never changes a segment's audio; only an engine without open_batch gets a SequentialSession.

Voices are prepared beside the loop (fishmp/worker/voices.py): a row is added once its voice is ready, and the running
rows step meanwhile (the head waits: tasks still start in order). With no row running the loop waits for the voice.

Faults are per segment (see fishmp/worker/process.py's docstring for the table and the reasons).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import time
import traceback
from collections import deque
from typing import Any

from ..engines import (
    Audio,
    BadReferenceError,
    EngineError,
    EngineOutOfMemoryError,
    SequentialSession,
    SynthesisParams,
    TextTooLongError,
)
from .protocol import Drop, EncodeTask, Failed, Leaving, Resized, SegmentTask, Started
from .recycle import RecyclePolicy, read_memory
from .streams import StreamRelay
from .takes import RateModel, TakeLimits, check_take, retry_max_new_tokens, retry_seed, take_record
from .takestate import KeptTake, Takes
from .voices import VoiceStage

INPUT_KINDS = ("bad_reference", "text_too_long", "bad_params")
NOT_READY = object()  # _voice: the task's voice is still being prepared beside the loop
# Error text that means the device itself is broken (sticky CUDA errors): only a fresh process recovers.
FATAL_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "device-side assert", "illegal memory access",
                 "NCCL error", "unspecified launch failure")
OOM_MESSAGE = ("out of GPU memory twice on this segment alone; raise FISH_MODEL_MEMORY_GB (fewer workers per GPU), "
               "lower FISH_BATCH_SIZE or lower max_new_tokens")


def is_fatal(exc: BaseException) -> bool:
    """True when the process must be recycled: not an error the engine raised on purpose, or a CUDA error."""
    if not isinstance(exc, (EngineError, ValueError)):
        return True
    return any(marker in str(exc) for marker in FATAL_MARKERS)


def mixed_voices_enabled() -> bool:
    """FISH_BATCH_MIXED=0 (a benchmarking knob, not a setting): a session holds rows of one speaker at a time."""
    return os.environ.get("FISH_BATCH_MIXED", "1").strip().lower() not in ("0", "false", "no", "off")


class Leave(Exception):
    """The worker must exit so that the main process starts a clean replacement (after the Failed messages)."""


class LaneRunner:
    def __init__(self, worker_id: str, engine: Any, inbox: queue.Queue, send: Any, writes: queue.Queue,
                 prompt: Any, cache_dir: str, batch_size: int = 1, refill: bool = True,
                 mixed: bool | None = None, voices: VoiceStage | None = None, cached: Any = None) -> None:
        self.worker_id, self.engine, self.inbox, self.send, self.writes = worker_id, engine, inbox, send, writes
        self.cache_dir = cache_dir  # encoded references (encode tasks)
        self.prompt = prompt  # SpeakerRef -> SpeakerPrompt (cached by the caller)
        # voices: the stage (None: inline, by `prompt`); cached: SpeakerRef -> prompt or None, asked first
        self.voices, self.cached = voices, cached or (lambda ref: None)
        self.voice_waits = 0  # times the head's voice was not ready while rows were running (they stepped on)
        self.steps_beside_voices = 0  # decode steps taken while a voice was being prepared (tests, benchmarks)
        batched = batch_size > 1 and callable(getattr(engine, "open_batch", None))
        self.capacity = batch_size if batched else 1  # halves on out-of-memory, never grows back
        self.refill = refill
        self.mixed = mixed_voices_enabled() if mixed is None else mixed  # rows of several speakers in a session
        self.backlog: deque[Any] = deque()  # received, not yet in a row; None = stop
        self.session: Any = None
        self.session_speaker: Any = None  # the rows' speaker, when sessions hold one (FISH_BATCH_MIXED=0)
        self.rows: dict[str, SegmentTask] = {}  # task id -> task, in the order the rows were added
        self.t0: dict[str, float] = {}  # when each task started (its first row), for synthesis_seconds
        self.solo: set[str] = set()  # tasks to run alone: their batch failed, or the main process asked
        self.ooms: dict[str, int] = {}  # out-of-memory errors of a task in sessions of one
        self.errors: dict[str, int] = {}  # engine errors of a task
        settings = getattr(engine, "settings", None)  # the worker's Settings (both engines keep them)
        self.take_check = bool(getattr(settings, "take_check", True))
        self.take_limits = TakeLimits.from_settings(settings)
        self.takes: dict[str, Takes] = {}  # task id -> its takes so far, while a failed take check is retried
        self.retakes: set[str] = set()  # tasks back in the backlog for another take (their deadline restarts)
        self.rates: dict[Any, RateModel] = {}  # SpeakerRef -> its speed, learned from takes that passed
        self.recycle = RecyclePolicy()  # the worker sets it from its settings (FISH_WORKER_MAX_*)
        self.draining: str | None = None  # why this worker is being recycled: no new rows, leave when empty
        self.streams = StreamRelay(worker_id, send, getattr(engine, "sample_rate", 44100))  # streamed rows' audio

    # -- the loop -------------------------------------------------------------------------------------------------
    def run(self) -> None:
        """Until the stop sentinel (after every task before it) or until the worker must leave."""
        try:
            while True:
                if self.draining is not None and not self.rows and not self._started_waiting():
                    return  # recycled: its rows are finished; what it never started went back (Leaving)
                self._pull(block=not self.rows and not self.backlog)
                if self.voices is not None:
                    self.voices.want_waiting(self.backlog, self.cached)
                if not self.rows and not self.backlog:
                    continue  # only a Drop came
                if not self.rows:
                    head = self.backlog[0]
                    if head is None:
                        return
                    if isinstance(head, EncodeTask):
                        self._encode(self.backlog.popleft())
                        continue
                    if not self._open_for(head):
                        continue
                if self.draining is None or self._started_waiting():
                    self._fill()
                if self.rows:
                    before = list(self.rows)
                    if self.voices is not None and self.voices.busy:
                        self.steps_beside_voices += 1
                    self._step()
                    self._after_step(before)
        except Leave:
            return
        finally:
            self._close_session()
            if self.voices is not None:
                self.voices.close()

    def _pull(self, block: bool) -> None:
        items = [self.inbox.get()] if block else []
        with contextlib.suppress(queue.Empty):
            while True:
                items.append(self.inbox.get_nowait())
        for item in items:
            self._drop(item.task) if isinstance(item, Drop) else self.backlog.append(item)

    def _drop(self, task_id: str) -> None:
        """Its job was cancelled (a streamed line's client left): free its row now; Failed("cancelled") says so."""
        waiting = [t for t in self.backlog if t is not None and t.id == task_id]
        for t in waiting:
            self.backlog.remove(t)
        if task_id in self.rows and callable(getattr(self.session, "drop", None)):
            self.session.drop(task_id)
            waiting.append(self.rows.pop(task_id))
        if waiting:
            self._fail(waiting[0], "cancelled", "its job was cancelled", input_error=True)

    # -- recycling (fishmp/worker/recycle.py) -----------------------------------------------------------------------------
    def _after_step(self, before: list[str]) -> None:
        """Count the rows that finished in this step (not those sent back to the backlog to be redone)."""
        waiting = {t.id for t in self.backlog if t is not None}
        finished = sum(1 for k in before if k not in self.rows and k not in waiting)
        if not finished or not self.recycle.enabled:
            return
        reason = self.recycle.observe(finished, read_memory(self.recycle.memory_kind))
        if reason is not None and self.draining is None:
            self._drain(reason)

    def _started_waiting(self) -> bool:
        """A begun task is back in the backlog (a take retried with a new seed, a batch redone): it finishes here."""
        return any(t is not None and t.id in self.t0 for t in self.backlog)

    def _drain(self, reason: str) -> None:
        """Take no new rows; hand back every task not in a row (never started here) and say so, so the main process
        requeues them at once without counting an attempt and sends nothing more."""
        self.draining = reason
        self._pull(block=False)
        handed = [t for t in self.backlog if t is not None and t.id not in self.t0]  # begun ones (retries) stay
        for t in handed:
            self.backlog.remove(t)
        self._prune_voices()
        self.send(Leaving(self.worker_id, reason, self.recycle.figures, tuple(t.id for t in handed)))

    def _wanted_capacity(self, task: SegmentTask) -> int:
        return 1 if getattr(task, "solo", False) or task.id in self.solo else self.capacity

    def _fits(self, item: Any) -> bool:
        return (isinstance(item, SegmentTask) and self._wanted_capacity(item) == self.session.capacity
                and (self.mixed or not self.rows or item.speaker == self.session_speaker))

    # -- sessions ---------------------------------------------------------------------------------------------------
    def _open_for(self, task: SegmentTask) -> bool:
        """Make the session fit `task` (reusing the open one when it does); False when the task was dealt with."""
        capacity = self._wanted_capacity(task)
        if self.session is not None and self.session.capacity == capacity:
            return True
        self._close_session()
        try:
            if callable(getattr(self.engine, "open_batch", None)):  # batch 1 too: the same session and sampler
                session = self.engine.open_batch(capacity)
            else:
                session = SequentialSession(self.engine.synthesize)
        except Exception as exc:  # noqa: BLE001 - classified below, outside the except block
            err, tb = exc, traceback.format_exc()
        else:
            self.session = session
            return True
        self.backlog.popleft()
        self._start(task)
        self._batch_failed([task], err, tb, capacity)
        return False

    def _fail_voice(self, task: SegmentTask, exc: BadReferenceError) -> None:
        """The task's voice is unusable: it and every task of that speaker waiting here fail the same way."""
        self._fail(task, exc.kind, str(exc), input_error=True)
        for t in [t for t in self.backlog if isinstance(t, SegmentTask) and t.speaker == task.speaker]:
            self.backlog.remove(t)
            self._start(t)
            self._fail(t, exc.kind, str(exc), input_error=True)
        self._prune_voices()

    def _prune_voices(self) -> None:
        if self.voices is not None:
            self.voices.keep_only(self.backlog)

    def _voice(self, task: SegmentTask) -> Any:
        """The task's SpeakerPrompt; NOT_READY while it is being prepared and rows are running (they keep stepping).
        With no row running, wait for it (the task Started first: its deadline covers the encode). Raises what
        preparing the voice raised."""
        if self.voices is None:
            return self.prompt(task.speaker)
        hit = self.cached(task.speaker)
        if hit is not None:
            return hit
        if not self.voices.ready(task.speaker):
            if self.rows:
                self.voice_waits += 1
                return NOT_READY
            self._start(task)
        return self.voices.take(task.speaker)

    def _close_session(self) -> None:
        if self.session is not None:
            with contextlib.suppress(Exception):  # a broken session must not hide the error that broke it
                self.session.close()
        self.session, self.session_speaker = None, None

    def _start(self, task: SegmentTask | EncodeTask) -> None:
        if task.id not in self.t0:
            self.t0[task.id] = time.perf_counter()
            self.send(Started(self.worker_id, task.id))
        elif task.id in self.retakes:
            # A retake (new seed after a failed take check) gets the segment's full deadline again: Started restarts
            # it, so a slow but healthy take is never killed for the takes before it; a hang is still caught.
            self.retakes.discard(task.id)
            self.send(Started(self.worker_id, task.id))

    def _fill(self) -> None:
        if self.rows and not self.refill:
            return
        while self.backlog and self.session.free_rows() > 0 and self._fits(self.backlog[0]):
            task = self.backlog[0]
            try:
                voice = self._voice(task)
            except Exception as exc:  # noqa: BLE001 - the voice's failure: raised below, for this task alone
                voice = exc
            if voice is NOT_READY:
                return  # the head waits for its voice; the running rows step meanwhile
            self.backlog.popleft()
            self._start(task)
            try:
                if isinstance(voice, Exception):
                    raise voice
                self.session.add(task.id, task.text, SynthesisParams(**task.params), voice,
                                 **self.streams.added(self.session, task))
            except BadReferenceError as exc:
                self._fail_voice(task, exc)
                continue
            except TextTooLongError as exc:
                self._fail(task, exc.kind, str(exc), input_error=True)
                continue
            except (ValueError, TypeError) as exc:  # sampling parameters the engine refuses
                self._fail(task, "bad_params", f"{type(exc).__name__}: {exc}", input_error=True)
                continue
            except Exception as exc:  # noqa: BLE001 - classified below, outside the except block
                err, tb = exc, traceback.format_exc()
            else:
                self.rows[task.id] = task
                self.session_speaker = task.speaker
                continue
            # Out of memory or an engine error while adding: the session is suspect; redo its rows.
            self._batch_failed([*self.rows.values(), task], err, tb, self.session.capacity)
            return

    def _step(self) -> None:
        try:
            finished = self.session.step()
        except Exception as exc:  # noqa: BLE001 - classified below, outside the except block
            err, tb = exc, traceback.format_exc()
        else:
            now = time.perf_counter()
            self.streams.relay(self.session)
            for key, audio in finished:
                task = self.rows.pop(key)
                kept = self._judge(task, audio)
                if kept is None:
                    continue  # retried with a new seed: back at the head of the backlog, same deadline
                self.streams.finish(task, kept.samples)
                self.writes.put((task, kept, now - self.t0.pop(key)))
                self._forget(key)
            return
        self._batch_failed(list(self.rows.values()), err, tb, self.session.capacity)

    # -- faults -----------------------------------------------------------------------------------------------------
    def _batch_failed(self, tasks: list[SegmentTask], err: BaseException, tb: str, capacity: int) -> None:
        """A session failed with `tasks` in it: drop it, then retry, shrink, fail or leave (see worker.py)."""
        self._close_session()
        self.rows.clear()
        oom = isinstance(err, EngineOutOfMemoryError)
        if oom:
            self.engine.release_memory()  # outside the except block: the traceback no longer pins tensors
        message = f"{type(err).__name__}: {err}"
        if not oom and is_fatal(err):
            for t in tasks:  # the device or the process is suspect: all of them go back, a clean worker retries
                self._fail(t, getattr(err, "kind", "engine_error"), message, input_error=False, tb=tb)
            raise Leave
        retry: list[SegmentTask] = []
        if oom and capacity > 1:
            shrunk = max(1, min(self.capacity, capacity // 2))
            if shrunk < self.capacity:
                self.capacity = shrunk
                self.send(Resized(self.worker_id, shrunk))
            retry = tasks
        elif len(tasks) > 1:  # who broke the batch is unknown: each row alone (not counted), so only the culprit fails
            self.solo.update(t.id for t in tasks)
            retry = tasks
        else:
            (t,) = tasks
            self.solo.add(t.id)
            if oom:
                self.ooms[t.id] = self.ooms.get(t.id, 0) + 1
                if self.ooms[t.id] >= 2:  # recycle: a fresh process has an unfragmented allocator
                    self._fail(t, "out_of_memory", OOM_MESSAGE, input_error=True)
                    raise Leave
                retry = [t]
            elif getattr(err, "kind", "") in INPUT_KINDS:
                self._fail(t, err.kind, str(err), input_error=True)
            else:
                self.errors[t.id] = self.errors.get(t.id, 0) + 1
                if self.errors[t.id] >= 2:  # twice alone: the segment's own fault; the model is fine, keep it
                    self._fail(t, getattr(err, "kind", "engine_error"),
                               f"{message} (failed twice on this segment alone; the worker was kept)",
                               input_error=True, tb=tb)
                else:
                    retry = [t]
        self.backlog.extendleft(reversed(retry))  # from the start, same seeds: the audio does not change

    def _fail(self, task: SegmentTask | EncodeTask, kind: str, message: str, input_error: bool, tb: str = "") -> None:
        self.send(Failed(self.worker_id, task.id, kind, message, tb, input_error))
        self.t0.pop(task.id, None)
        self._forget(task.id)

    def _forget(self, task_id: str) -> None:
        for table in (self.takes, self.ooms, self.errors):
            table.pop(task_id, None)
        self.retakes.discard(task_id)
        self.solo.discard(task_id)
        self.streams.forget(task_id)

    # -- the take check (fishmp/worker/takes.py) -----------------------------------------------------------------------
    def _judge(self, task: SegmentTask, audio: Audio) -> Audio | None:
        """Check a finished take. None: it failed and is retried (task back at the head of the backlog with seed +
        attempt, rejoining its speaker's session as a row); else the take to write (the first that passed, or the
        best of FISH_TAKE_RETRIES + 1) carrying its take record.

        A fitted segment (task.fit) is judged without its slot (the fit makes it fit) and keeps, of the takes that
        passed, the one needing the least stretch; when even that needs more than max_speed, up to the fit's
        `retries` more seeds are tried first (fishmp/worker/takes.py wants_another_take)."""
        if not self.take_check:
            return audio
        from .takes import speed_needed, wants_another_take  # the fit-aware take choice

        limits = self.take_limits
        fit = getattr(task, "fit", None)
        state = self.takes.setdefault(task.id, Takes(task.params.get("seed"), fit))
        if task.speaker not in self.rates and len(self.rates) >= 256:  # bounded: a long-lived pool sees many voices
            self.rates.pop(next(iter(self.rates)))
        rate = self.rates.setdefault(task.speaker, RateModel(limits.learn_after))
        seed = task.params.get("seed")
        verdict = check_take(audio.samples, audio.sample_rate, audio.tokens,
                             task.params.get("max_new_tokens", SynthesisParams().max_new_tokens), task.text,
                             rate.expected_seconds(task.text), limits,
                             None if fit else getattr(task, "max_seconds", None), seed)
        if fit:
            verdict.numbers["speed_needed"] = round(speed_needed(audio.samples, audio.sample_rate, fit), 4)
        state.add(verdict, audio, seed)
        if verdict.passed:
            rate.accept(task.text, audio.seconds)
        fit_retry = bool(fit) and wants_another_take(state.verdicts, fit, state.fit_tries)
        streamed = getattr(task, "stream", False)  # its audio has left: judged and recorded, never retaken
        if not streamed and (fit_retry or (not verdict.passed and not state.any_passed
                                           and len(state.verdicts) <= limits.retries)):
            state.fit_tries += fit_retry
            params = {**task.params, "seed": retry_seed(state.base_seed, len(state.verdicts))}
            cap = retry_max_new_tokens(verdict, limits)  # a runaway's retry stops where it would fail anyway
            if cap is not None and cap < params.get("max_new_tokens", SynthesisParams().max_new_tokens):
                params["max_new_tokens"] = cap
            self.backlog.appendleft(dataclasses.replace(task, params=params))
            self.retakes.add(task.id)
            return None
        self.takes.pop(task.id, None)
        record = take_record(state.verdicts, state.best, state.seeds)
        if fit:
            record["fit_tries"] = state.fit_tries  # extra seeds tried for a take that fits within max_speed
        best = state.audio
        return KeptTake(best.samples, best.sample_rate, best.tokens, take=record)

    # -- encode tasks (the legacy encode mode) ----------------------------------------------------------------------
    def _encode(self, task: EncodeTask) -> None:
        from .references import encode_cached

        self._start(task)
        try:
            tokens, _ = encode_cached(self.engine, task.audio_path, self.cache_dir)
        except BadReferenceError as exc:
            self._fail(task, exc.kind, str(exc), input_error=True)
            return
        except Exception as exc:  # noqa: BLE001 - an engine fault: report it and leave so a clean worker replaces us
            self._fail(task, getattr(exc, "kind", "engine_error"), f"{type(exc).__name__}: {exc}",
                       input_error=False, tb=traceback.format_exc())
            raise Leave from None
        self.writes.put((task, tokens, time.perf_counter() - self.t0.pop(task.id)))
