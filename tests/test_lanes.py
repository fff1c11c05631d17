"""Lanes: a worker decodes up to FISH_BATCH_SIZE segments at once, of any speakers (fishmp/worker/lanes.py).

Real worker processes: `worker_main` in a spawned process with real pipes (as fishmp/backends/local.py starts it), fed
several SegmentTasks at once, and the whole CLI through the real pool. The synthetic engine's batched session models
batching costs and injects faults per row (fishmp/engines/synthetic.py).
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time
from dataclasses import dataclass, field

import numpy as np
import pytest
import soundfile as sf
from conftest import jsonl_events, synthetic_env

from fishmp.config import Settings
from fishmp.worker.process import worker_main
from fishmp.worker.protocol import Done, Failed, LoadFailed, Ready, Resized, SegmentTask, SpeakerRef, Started

pytestmark = pytest.mark.timeout(180)
FAST = {"FISH_SYNTHETIC_LOAD_S": "0.3", "FISH_SYNTHETIC_SECONDS_PER_CHAR": "0.002"}


@dataclass
class Run:
    """What one worker said, with the time each message arrived (seconds since its Ready)."""

    ready: Ready | None = None
    messages: list[tuple[float, object]] = field(default_factory=list)
    exitcode: int | None = None

    def started(self, task: str) -> float:
        return next(t for t, m in self.messages if isinstance(m, Started) and m.task == task)

    def done(self) -> dict[str, Done]:
        return {m.task: m for _, m in self.messages if isinstance(m, Done)}

    def failed(self) -> dict[str, Failed]:
        return {m.task: m for _, m in self.messages if isinstance(m, Failed)}

    def done_at(self, task: str) -> float:
        return next(t for t, m in self.messages if isinstance(m, Done) and m.task == task)

    def started_order(self) -> list[str]:
        return [m.task for _, m in self.messages if isinstance(m, Started)]


class Worker:
    """One real worker process; tasks sent before it is ready are all in its inbox when it starts generating."""

    def __init__(self, tmp_path, monkeypatch: pytest.MonkeyPatch, batch_size: int, settings: dict | None = None,
                 **env: str) -> None:
        for key, value in {**FAST, "FISH_SYNTHETIC_STATE_DIR": str(tmp_path / "state"), **env}.items():
            monkeypatch.setenv(key, value)  # the spawned child inherits the environment
        settings = Settings(**{"engine": "synthetic", "batch_size": batch_size, "cache_dir": str(tmp_path / "cache"),
                               **(settings or {})})
        ctx = mp.get_context("spawn")
        task_r, self.task_w = ctx.Pipe(duplex=False)
        self.res_r, res_w = ctx.Pipe(duplex=False)
        self.proc = ctx.Process(target=worker_main, daemon=True,
                                args=("w0", "cpu", None, settings, task_r, res_w, os.getpid(), 1))
        self.proc.start()
        task_r.close()
        res_w.close()
        self.run = Run()
        self.t0 = time.monotonic()

    def send(self, *tasks: SegmentTask) -> None:
        for task in tasks:
            self.task_w.send(task)

    def collect(self, until: set[str], timeout: float = 60.0) -> Run:
        """Read messages until every task in `until` is Done or Failed, or the worker exits."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            finished = set(self.run.done()) | set(self.run.failed())
            if until <= finished:
                return self.run
            if not self.res_r.poll(0.05):
                if not self.proc.is_alive() and not self.res_r.poll(0.2):
                    break
                continue
            try:
                msg = self.res_r.recv()
            except EOFError:
                break
            if isinstance(msg, Ready):
                self.run.ready, self.t0 = msg, time.monotonic()
            elif isinstance(msg, LoadFailed):
                raise AssertionError(msg.message)
            else:
                self.run.messages.append((time.monotonic() - self.t0, msg))
        return self.run

    def stop(self) -> int | None:
        if self.proc.is_alive():
            self.task_w.send(None)
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.run.exitcode = self.proc.exitcode
        return self.run.exitcode


@pytest.fixture
def voice(tmp_path, make_wav):
    def make(name: str = "a") -> SpeakerRef:
        path = make_wav(str(tmp_path / f"{name}.wav"), 1.0, 16000)
        return SpeakerRef(name, f"I am {name}.", reference_audio=path, fingerprint=name)

    return make


def tasks_for(tmp_path, ref: SpeakerRef, texts: list[str], prefix: str = "", **kw: object) -> list[SegmentTask]:
    out = tmp_path / "wavs"
    out.mkdir(exist_ok=True)
    return [SegmentTask(f"{prefix}{ref.id}{i}", text, ref, {"seed": i}, str(out / f"{prefix}{ref.id}{i}.wav"), **kw)
            for i, text in enumerate(texts)]


def samples(path: str) -> np.ndarray:
    return sf.read(path, dtype="float32")[0]


TEXTS = ["Hello there, this is a line.", "Short.", "A somewhat longer line of dialogue for the batch.",
         "Another one.", "Yes.", "The last line of this speaker, a little longer than most.", "Ok then.", "Fine."]


# ---- the worker, directly ------------------------------------------------------------------------------------------
def test_rows_run_together_and_audio_matches_batch_1(tmp_path, monkeypatch, voice) -> None:
    a, b = voice("a"), voice("b")
    results = {}
    for batch, mixed in ((1, "1"), (4, "1"), (4, "0")):
        name = f"B{batch}{mixed}-"
        w = Worker(tmp_path, monkeypatch, batch, FISH_BATCH_MIXED=mixed)
        tasks = tasks_for(tmp_path, a, TEXTS[:4], name) + tasks_for(tmp_path, b, ["Other voice."], name) \
            + tasks_for(tmp_path, a, TEXTS[4:], f"{name}x")
        w.send(*tasks)
        run = w.collect({t.id for t in tasks})
        assert w.stop() == 0
        assert run.ready.batch_size == batch
        assert set(run.done()) == {t.id for t in tasks} and not run.failed()
        assert len([m for _, m in run.messages if isinstance(m, Done)]) == len(tasks)  # each exactly once
        assert run.started_order() == [t.id for t in tasks]  # rows start in the order the tasks came
        if batch == 4:  # the first four rows were decoding together before any of them finished
            first = tasks[:4]
            assert max(run.started(t.id) for t in first) < min(run.done_at(t.id) for t in first)
            # when each first row finished in the worker (Done arrives later: the writer thread sends it)
            drained = max(run.started(t.id) + run.done()[t.id].synthesis_seconds for t in first)
            other = run.started(tasks[4].id)
            if mixed == "1":  # the other voice takes the first free row, beside the first voice's rows (~0.1 s)
                assert other < drained - 0.03
            else:  # single-voice sessions (FISH_BATCH_MIXED=0): it waits until the session drains
                assert other > drained - 0.02
        results[(batch, mixed)] = {t.id.split("-", 1)[1]: samples(t.output) for t in tasks}
    for key, audio in results[(1, "1")].items():
        assert np.array_equal(audio, results[(4, "1")][key]) and np.array_equal(audio, results[(4, "0")][key]), key


def test_poison_row_in_a_mixed_batch_fails_alone(tmp_path, monkeypatch, voice) -> None:
    voices = [voice(name) for name in "pqr"]
    w = Worker(tmp_path, monkeypatch, 4)
    tasks = [t for i, v in enumerate(voices)
             for t in tasks_for(tmp_path, v, [f"Line {i} of {v.id}.", "Poison @@error@@ here." if i == 1 else "Yes."])]
    w.send(*tasks)
    run = w.collect({t.id for t in tasks})
    assert set(run.failed()) == {"q1"} and run.failed()["q1"].input_error  # its batchmates of other voices live on
    assert set(run.done()) == {t.id for t in tasks} - {"q1"}
    assert w.proc.is_alive() and w.stop() == 0


def test_refill_fills_freed_rows_at_the_next_step(tmp_path, monkeypatch, voice) -> None:
    a = voice()
    texts = ["long " * 60] + [f"short line {i}." for i in range(5)]  # long: 300 steps, 2-2.6 ms each
    audio = {}
    for refill in ("1", "0"):
        w = Worker(tmp_path, monkeypatch, 3, FISH_BATCH_REFILL=refill)
        tasks = tasks_for(tmp_path, a, texts, f"r{refill}-")
        w.send(*tasks)
        run = w.collect({t.id for t in tasks})
        assert w.stop() == 0
        assert set(run.done()) == {t.id for t in tasks}
        if refill == "1":  # a short row's lane took the 4th task long before the long row finished
            assert run.started(tasks[3].id) < run.done_at(tasks[0].id)
        else:  # rows are added only when the session is empty
            long_row = run.done()[tasks[0].id].synthesis_seconds  # 13 steps x 2.6 ms + 287 x 2 ms alone = 0.61 s
            assert long_row >= 0.6 and run.started(tasks[3].id) - run.started(tasks[0].id) >= 0.9 * long_row
        audio[refill] = [samples(t.output) for t in tasks]
    assert all(np.array_equal(x, y) for x, y in zip(audio["1"], audio["0"], strict=True))


def test_poison_error_in_a_batch_fails_alone_and_keeps_the_worker(tmp_path, monkeypatch, voice) -> None:
    a = voice()
    w = Worker(tmp_path, monkeypatch, 4)
    tasks = tasks_for(tmp_path, a, ["First line.", "Poison @@error@@ line.", "Third line.", "Once @@error-once@@ here."])
    w.send(*tasks)
    run = w.collect({t.id for t in tasks})
    assert set(run.failed()) == {"a1"}
    fail = run.failed()["a1"]
    assert fail.kind == "engine_error" and fail.input_error  # fails the segment, no reload
    assert "synthetic engine error" in fail.message and "worker was kept" in fail.message
    assert set(run.done()) == {"a0", "a2", "a3"}  # an error once is redone alone and succeeds
    assert run.started_order().count("a1") == 1  # retries inside the worker do not restart the deadline
    later = tasks_for(tmp_path, a, ["Still here."], "later-")
    w.send(*later)
    assert "later-a0" in w.collect({"later-a0"}).done()  # the same process, the model still loaded
    assert w.stop() == 0


def test_error_at_batch_1_fails_without_reload(tmp_path, monkeypatch, voice) -> None:
    """Issue 12: a plain engine error on one segment recycled the worker (a model reload per retry)."""
    a = voice()
    w = Worker(tmp_path, monkeypatch, 1)
    tasks = tasks_for(tmp_path, a, ["Poison @@error@@ line.", "Next line."])
    w.send(*tasks)
    run = w.collect({t.id for t in tasks})
    assert run.failed()["a0"].input_error and set(run.done()) == {"a1"}
    assert w.proc.is_alive() and w.stop() == 0


def test_oom_shrinks_the_batch_and_keeps_the_audio(tmp_path, monkeypatch, voice) -> None:
    a = voice()
    w = Worker(tmp_path, monkeypatch, 4, FISH_SYNTHETIC_MAX_ROWS="2")  # a batch of 4 does not fit, 2 does
    tasks = tasks_for(tmp_path, a, TEXTS)
    w.send(*tasks)
    run = w.collect({t.id for t in tasks})
    assert set(run.done()) == {t.id for t in tasks} and not run.failed()
    assert [m.batch_size for _, m in run.messages if isinstance(m, Resized)] == [2]  # 4 -> 2, said once
    assert w.proc.is_alive() and w.stop() == 0
    ref = Worker(tmp_path, monkeypatch, 1, FISH_SYNTHETIC_MAX_ROWS="")
    alone = tasks_for(tmp_path, a, TEXTS, "alone-")
    ref.send(*alone)
    ref.collect({t.id for t in alone})
    ref.stop()
    for t, t1 in zip(tasks, alone, strict=True):
        assert np.array_equal(samples(t.output), samples(t1.output))


def test_oom_opening_a_session_shrinks_the_batch(tmp_path, monkeypatch, voice) -> None:
    a = voice()
    w = Worker(tmp_path, monkeypatch, 8, FISH_SYNTHETIC_MAX_CAPACITY="2")  # 8 rows cannot be allocated, nor 4
    tasks = tasks_for(tmp_path, a, TEXTS[:5])
    w.send(*tasks)
    run = w.collect({t.id for t in tasks})
    assert set(run.done()) == {t.id for t in tasks} and not run.failed()
    assert [m.batch_size for _, m in run.messages if isinstance(m, Resized)] == [4, 2]
    assert run.started_order() == [t.id for t in tasks]  # each Started once, in order, despite the retries
    assert w.proc.is_alive() and w.stop() == 0


def test_oom_at_batch_1_fails_the_segment_and_recycles(tmp_path, monkeypatch, voice) -> None:
    a = voice()
    w = Worker(tmp_path, monkeypatch, 4)
    tasks = tasks_for(tmp_path, a, ["Fine.", "Too big @@oom@@.", "Fine too."])
    w.send(*tasks)
    run = w.collect({"a1"})
    fail = run.failed()["a1"]
    assert fail.kind == "out_of_memory" and "FISH_BATCH_SIZE" in fail.message
    w.proc.join(10)
    assert w.proc.exitcode == 0  # it left on purpose: a fresh process has an unfragmented allocator
    assert set(run.failed()) == {"a1"}  # its batchmates are not blamed (the main process requeues them)


def test_input_error_from_add_fails_that_row_only(tmp_path, monkeypatch, voice) -> None:
    a = voice()
    w = Worker(tmp_path, monkeypatch, 3)
    tasks = tasks_for(tmp_path, a, ["Fine.", "Way too long @@toolong@@.", "Fine too."])
    w.send(*tasks)
    run = w.collect({t.id for t in tasks})
    assert run.failed()["a1"].kind == "text_too_long" and run.failed()["a1"].input_error
    assert set(run.done()) == {"a0", "a2"} and w.stop() == 0


def test_cuda_error_recycles_and_blames_the_batch(tmp_path, monkeypatch, voice) -> None:
    a = voice()
    w = Worker(tmp_path, monkeypatch, 3)
    tasks = tasks_for(tmp_path, a, ["Fine line.", "Device @@cuda@@ error.", "Fine too."])
    w.send(*tasks)
    run = w.collect({t.id for t in tasks})
    assert set(run.failed()) == {"a0", "a1", "a2"}  # which row broke the device is unknown: all retried elsewhere
    assert all(not f.input_error and "CUDA error" in f.message for f in run.failed().values())
    w.proc.join(10)
    assert w.proc.exitcode == 0


def test_solo_task_runs_in_a_session_of_its_own(tmp_path, monkeypatch, voice) -> None:
    a = voice()
    for solo in (True, False):
        w = Worker(tmp_path, monkeypatch, 3)
        first = tasks_for(tmp_path, a, ["solo " * 40], f"s{solo}-", solo=solo)  # 200 steps: 0.4 s alone
        rest = tasks_for(tmp_path, a, ["One.", "Two."], f"s{solo}-rest-")
        w.send(*first, *rest)
        run = w.collect({t.id for t in first + rest})
        assert w.stop() == 0 and len(run.done()) == 3
        gap = run.started(rest[0].id) - run.started(first[0].id)
        assert gap >= 0.35 if solo else gap < 0.35


def test_bad_reference_fails_that_voice_only(tmp_path, monkeypatch, voice) -> None:
    bad_path = tmp_path / "bad.wav"
    bad_path.write_bytes(b"RIFF" + os.urandom(300))
    bad = SpeakerRef("bad", "Broken.", reference_audio=str(bad_path), fingerprint="bad")
    w = Worker(tmp_path, monkeypatch, 4)
    tasks = tasks_for(tmp_path, bad, ["One.", "Two.", "Three."]) + tasks_for(tmp_path, voice("a"), ["Fine."])
    w.send(*tasks)
    run = w.collect({t.id for t in tasks})
    assert {k: f.kind for k, f in run.failed().items()} == {"bad0": "bad_reference", "bad1": "bad_reference",
                                                           "bad2": "bad_reference"}
    assert set(run.done()) == {"a0"} and w.stop() == 0


# ---- the whole CLI through the real pool -----------------------------------------------------------------------
def test_generate_with_batches_matches_batch_1(tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": TEXTS + ["Poison @@error@@ line."], "b": TEXTS[:5]})
    results = {}
    for batch in ("1", "4"):
        env = synthetic_env(tmp_path, FISH_BATCH_SIZE=batch, FISH_CPU_WORKERS="1")
        out = fishmp_cli(["generate", job, "-o", f"out{batch}", "--progress", "jsonl"], str(tmp_path), env)
        assert out.returncode == 1, out.stderr  # the poison segment failed, every other one is written
        events = jsonl_events(out.stdout)
        manifest = json.loads((tmp_path / f"out{batch}" / "manifest.json").read_text())["segments"]
        assert len(manifest) == 14
        for sid, rec in manifest.items():
            if sid == "a-008":
                assert rec["status"] == "failed" and rec["error_kind"] == "engine_error", rec
            else:
                assert rec["status"] == "done" and rec["audio_seconds"] > 0 and rec["worker"] and rec["attempts"] == 1
        done = [e["id"] for e in events if e["event"] == "segment_done"]
        assert sorted(done) == sorted(set(done)) and len(done) == 13  # every segment once
        assert not [e for e in events if e["event"] == "worker_died"]  # the engine error cost no model reload
        assert "Traceback" not in out.stderr
        results[batch] = {sid: samples(rec["path"]) for sid, rec in manifest.items() if rec["status"] == "done"}
    for sid, audio in results["1"].items():
        assert np.array_equal(audio, results["4"][sid]), sid


def test_generate_batch_oom_shrinks_and_finishes(tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": TEXTS})
    env = synthetic_env(tmp_path, FISH_BATCH_SIZE="4", FISH_CPU_WORKERS="1", FISH_SYNTHETIC_MAX_ROWS="1")
    out = fishmp_cli(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path), env)
    assert out.returncode == 0, out.stderr
    events = jsonl_events(out.stdout)
    assert not [e for e in events if e["event"] in ("worker_died", "segment_failed", "segment_requeued")]
    assert events[-1]["done"] == len(TEXTS)


# ---- the real Fish Speech engine on the tiny checkpoint ---------------------------------------------------------
@pytest.mark.timeout(400)
def test_fish_engine_batches_through_the_worker(tmp_path, monkeypatch, voice, tiny_checkpoint) -> None:
    """FishSpeechEngine.open_batch (fishmp/engines/batched.py) behind the worker's lanes: the wavs of B=3 are B=1's."""
    a = voice()
    texts = ["Hello there.", "A longer line for the batch to decode.", "Yes.", "One more line here."]
    wavs = {}
    for batch in (1, 3):
        w = Worker(tmp_path, monkeypatch, batch,  # float32: exact on the CPU
                   {"engine": "fish", "checkpoint_dir": tiny_checkpoint, "precision": "float32"})
        tasks = [SegmentTask(t.id, t.text, t.speaker, {"seed": 11 + i, "max_new_tokens": 24}, t.output)
                 for i, t in enumerate(tasks_for(tmp_path, a, texts, f"fish{batch}-"))]
        w.send(*tasks)
        run = w.collect({t.id for t in tasks}, timeout=300)
        assert w.stop() == 0
        assert run.ready.batch_size == batch
        assert set(run.done()) == {t.id for t in tasks}, run.failed()
        if batch == 3:
            assert max(run.started(t.id) for t in tasks[:3]) < min(run.done_at(t.id) for t in tasks[:3])
        wavs[batch] = [(run.done()[t.id].tokens, samples(t.output)) for t in tasks]
    for (tokens1, audio1), (tokens3, audio3) in zip(wavs[1], wavs[3], strict=True):
        assert tokens1 == tokens3 and np.array_equal(audio1, audio3)
