"""The synthetic TEST engine: timings, outputs and every fault marker (process-killing ones in spawned children)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time

import numpy as np
import pytest

from fishmp.config import Settings
from fishmp.engines.base import (
    BadReferenceError,
    EngineError,
    EngineOutOfMemoryError,
    SpeakerPrompt,
    SynthesisParams,
    TextTooLongError,
)
from fishmp.engines.synthetic import SyntheticEngine

PARAMS = SynthesisParams()
VOICE = SpeakerPrompt(key="a", tokens=np.zeros((10, 5), np.int64), text="ref")


def _engine(monkeypatch: pytest.MonkeyPatch, **env: str) -> SyntheticEngine:
    monkeypatch.setenv("FISH_SYNTHETIC_LOAD_S", "0")
    monkeypatch.setenv("FISH_SYNTHETIC_SECONDS_PER_CHAR", "0")
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return SyntheticEngine(Settings(engine="synthetic"), "cpu")


def test_timings_and_output(monkeypatch) -> None:
    eng = _engine(monkeypatch, FISH_SYNTHETIC_LOAD_S="0.2", FISH_SYNTHETIC_SECONDS_PER_CHAR="0.01")
    t0 = time.perf_counter()
    eng.load()
    assert time.perf_counter() - t0 >= 0.2
    text = "x" * 50
    t0 = time.perf_counter()
    audio = eng.synthesize(text, VOICE, PARAMS)
    assert time.perf_counter() - t0 >= 0.5
    assert audio.sample_rate == 44100 and audio.samples.dtype == np.float32
    assert audio.seconds == pytest.approx(50 * 0.06, abs=1e-4)
    assert audio.tokens == round(audio.seconds * 21.53)
    other = eng.synthesize(text, SpeakerPrompt(key="b", tokens=VOICE.tokens, text=""), PARAMS)
    assert not np.array_equal(audio.samples, other.samples)  # voices differ by key
    assert eng.fingerprint() == "synthetic" and eng.name == "synthetic"
    eng.release_memory()


def test_defaults(monkeypatch) -> None:
    monkeypatch.delenv("FISH_SYNTHETIC_LOAD_S", raising=False)
    monkeypatch.delenv("FISH_SYNTHETIC_SECONDS_PER_CHAR", raising=False)
    eng = SyntheticEngine(Settings(), "cpu")
    assert (eng.load_s, eng.seconds_per_char) == (0.5, 0.002)
    monkeypatch.setenv("FISH_SYNTHETIC_LOAD_S", "soon")
    with pytest.raises(EngineError, match="FISH_SYNTHETIC_LOAD_S"):
        SyntheticEngine(Settings(), "cpu")


def test_encode_reference(monkeypatch, make_wav, tmp_path) -> None:
    eng = _engine(monkeypatch)
    path = make_wav(str(tmp_path / "a.wav"), 2.0, 16000, 2)
    tokens = eng.encode_reference(path)
    assert tokens.shape == (10, 43) and tokens.dtype == np.int64
    assert tokens[0].max() < 4096 and tokens[1:].max() < 1024
    assert np.array_equal(tokens, eng.encode_reference(path))
    other = eng.encode_reference(make_wav(str(tmp_path / "b.wav"), 2.0, 48000, 1))
    assert not np.array_equal(tokens, other)


@pytest.mark.parametrize("case", ["missing", "corrupt", "short", "silent"])
def test_bad_reference(monkeypatch, make_wav, tmp_path, case) -> None:
    path = str(tmp_path / f"{case}-ref.flac")
    if case == "corrupt":
        (tmp_path / f"{case}-ref.flac").write_bytes(b"fLaC" + os.urandom(200))
    elif case == "short":
        make_wav(path, 0.1)
    elif case == "silent":
        make_wav(path, 1.0, kind="silent")
    with pytest.raises(BadReferenceError, match=f"{case}-ref.flac"):
        _engine(monkeypatch).encode_reference(path)


def test_in_process_markers(monkeypatch, tmp_path) -> None:
    eng = _engine(monkeypatch, FISH_SYNTHETIC_STATE_DIR=str(tmp_path / "state"))
    for _ in range(2):
        with pytest.raises(EngineOutOfMemoryError):
            eng.synthesize("a @@oom@@ b", VOICE, PARAMS)
        with pytest.raises(EngineError, match="synthetic engine error"):
            eng.synthesize("@@error@@", VOICE, PARAMS)
    t0 = time.perf_counter()
    audio = eng.synthesize("slow @@slow=0.3@@ text", VOICE, PARAMS)
    assert time.perf_counter() - t0 >= 0.3
    assert audio.seconds == pytest.approx(len("slow  text") * 0.06, abs=1e-4)  # markers are not spoken
    with pytest.raises(EngineOutOfMemoryError):
        eng.synthesize("x @@oom-once@@", VOICE, PARAMS)
    assert eng.synthesize("x @@oom-once@@", VOICE, PARAMS).tokens > 0  # fired once only
    with pytest.raises(EngineError):
        eng.synthesize("y @@error-once@@", VOICE, PARAMS)  # another text: its own marker file
    t0 = time.perf_counter()
    eng.synthesize("z @@slow=0.3-once@@", VOICE, PARAMS)
    eng.synthesize("z @@slow=0.3-once@@", VOICE, PARAMS)
    assert 0.3 <= time.perf_counter() - t0 < 0.55


def test_once_needs_state_dir(monkeypatch) -> None:
    monkeypatch.delenv("FISH_SYNTHETIC_STATE_DIR", raising=False)
    with pytest.raises(EngineError, match="FISH_SYNTHETIC_STATE_DIR"):
        _engine(monkeypatch).synthesize("@@kill-once@@", VOICE, PARAMS)


def test_load_faults_in_process(monkeypatch) -> None:
    with pytest.raises(EngineError, match="raise"):
        _engine(monkeypatch, FISH_SYNTHETIC_LOAD_FAULT="raise").load()
    with pytest.raises(EngineOutOfMemoryError):
        _engine(monkeypatch, FISH_SYNTHETIC_LOAD_FAULT="oom").load()
    with pytest.raises(EngineError, match="FISH_SYNTHETIC_LOAD_FAULT"):
        _engine(monkeypatch, FISH_SYNTHETIC_LOAD_FAULT="explode")


def _child(env: dict[str, str], text: str, batch: bool = False) -> None:
    """Spawned: load and synthesize once (or step a batch with `text` in one of its rows); exit 0 when nothing fired."""
    os.environ.update(env)
    eng = SyntheticEngine(Settings(engine="synthetic"), "cpu")
    eng.load()
    if not batch:
        eng.synthesize(text, None, SynthesisParams())
        return
    session = eng.open_batch(3)
    for i, row in enumerate(["fine", text, "also fine"]):
        session.add(str(i), row, SynthesisParams())
    while session.active():
        session.step()


def _run_child(env: dict[str, str], text: str, timeout: float = 20.0, batch: bool = False) -> int | None:
    base = {"FISH_SYNTHETIC_LOAD_S": "0", "FISH_SYNTHETIC_SECONDS_PER_CHAR": "0"}
    proc = mp.get_context("spawn").Process(target=_child, args=({**base, **env}, text, batch))
    proc.start()
    proc.join(timeout)
    if proc.is_alive():  # hung, as asked: stop it and report None
        proc.kill()
        proc.join()
        return None
    return proc.exitcode


def test_process_faults(tmp_path) -> None:
    state = {"FISH_SYNTHETIC_STATE_DIR": str(tmp_path)}
    assert _run_child({}, "fine") == 0
    assert _run_child({}, "a @@kill@@") == -signal.SIGKILL
    assert _run_child({}, "a @@segv@@") == -signal.SIGSEGV
    assert _run_child({}, "a @@exit@@") == 3
    assert _run_child({}, "a @@hang@@", timeout=1.5) is None
    assert _run_child({"FISH_SYNTHETIC_LOAD_FAULT": "die"}, "fine") == -signal.SIGKILL
    assert _run_child({"FISH_SYNTHETIC_LOAD_FAULT": "hang"}, "fine", timeout=1.5) is None
    # -once across processes: the first process dies, the retry in a new process succeeds.
    assert _run_child(state, "b @@kill-once@@") == -signal.SIGKILL
    assert _run_child(state, "b @@kill-once@@") == 0
    assert _run_child(state, "c @@exit-once@@") == 3
    assert _run_child(state, "c @@exit-once@@") == 0

    # In a batch, one row's marker acts on the whole process when that row is stepped.
    assert _run_child({}, "fine", batch=True) == 0
    assert _run_child({}, "a @@kill@@", batch=True) == -signal.SIGKILL
    assert _run_child(state, "d @@exit-once@@", batch=True) == 3
    assert _run_child(state, "d @@exit-once@@", batch=True) == 0


# ---- batched sessions (open_batch) ------------------------------------------------------------------------------
def _drain(session) -> dict[str, object]:
    out = {}
    while session.active():
        out.update(session.step())
    return out


def test_batch_audio_is_synthesize_audio_whatever_the_batch(monkeypatch) -> None:
    # Rows of three voices mixed in one session: each row's audio is its own voice's, as synthesize gives it.
    eng = _engine(monkeypatch)
    voices = [VOICE, SpeakerPrompt(key="b", tokens=VOICE.tokens, text="ref"), None]
    texts = {f"r{i}": ("word " * (3 + 7 * i), voices[i % 3]) for i in range(6)}
    alone = {k: eng.synthesize(t, v, PARAMS) for k, (t, v) in texts.items()}
    assert len({alone[k].samples.tobytes()[:4000] for k in ("r0", "r1", "r2")}) == 3  # the voices differ
    for capacity in (1, 2, 6):
        session = eng.open_batch(capacity)
        assert session.capacity == capacity and session.free_rows() == capacity
        pending, got = list(texts.items()), {}
        while pending or session.active():
            while pending and session.free_rows():  # continuous refill
                key, (text, voice) = pending.pop()
                session.add(key, text, PARAMS, voice)
            got.update(session.step())
        assert set(got) == set(texts)
        for key, audio in got.items():
            assert np.array_equal(audio.samples, alone[key].samples) and audio.tokens == alone[key].tokens
        session.close()
    with pytest.raises(RuntimeError, match="cannot add row"):
        session = eng.open_batch(1)
        session.add("x", "a", PARAMS, VOICE)
        session.add("y", "b", PARAMS, VOICE)


def test_batch_costs_base_plus_rows(monkeypatch) -> None:
    eng = _engine(monkeypatch, FISH_SYNTHETIC_STEP_S="0.0017", FISH_SYNTHETIC_STEP_ROW_S="0.0003")
    text = "x" * 80
    t0 = time.perf_counter()
    for i in range(8):
        one = eng.open_batch(1)
        one.add(str(i), text, PARAMS, VOICE)
        _drain(one)
    alone = time.perf_counter() - t0  # 8 x 80 steps x 2 ms = 1.28 s
    session = eng.open_batch(8)
    for i in range(8):
        session.add(str(i), text, PARAMS, VOICE)
    t0 = time.perf_counter()
    assert len(_drain(session)) == 8
    together = time.perf_counter() - t0  # 80 steps x (1.7 + 8 x 0.3) ms = 0.33 s
    assert alone >= 1.28 and together >= 0.32
    assert alone / together > 2.5


def test_batch_defaults_follow_seconds_per_char(monkeypatch) -> None:
    eng = _engine(monkeypatch, FISH_SYNTHETIC_SECONDS_PER_CHAR="0.004")
    assert eng.step_s + eng.step_row_s == pytest.approx(0.004)  # one row alone costs what synthesize() costs
    assert 8 * 0.004 / (eng.step_s + 8 * eng.step_row_s) > 3  # a batch of 8: several times faster
    for bad in ("0", "-2", "two"):
        monkeypatch.setenv("FISH_SYNTHETIC_MAX_ROWS", bad)
        with pytest.raises(EngineError, match="FISH_SYNTHETIC_MAX_ROWS"):
            SyntheticEngine(Settings(engine="synthetic"), "cpu")


def test_batch_faults_per_row(monkeypatch, tmp_path) -> None:
    eng = _engine(monkeypatch, FISH_SYNTHETIC_STATE_DIR=str(tmp_path / "state"), FISH_SYNTHETIC_MAX_ROWS="2")
    session = eng.open_batch(4)
    session.add("a", "fine", PARAMS, VOICE)
    with pytest.raises(TextTooLongError):  # an input error of that row, from add: the others go on
        session.add("b", "long @@toolong@@", PARAMS, VOICE)
    assert session.active() == 1 and session.free_rows() == 3
    session.add("c", "fine too", PARAMS, VOICE)
    assert set(_drain(session)) == {"a", "c"}
    for marker, error in (("@@error@@", EngineError), ("@@oom@@", EngineOutOfMemoryError),
                          ("@@cuda@@", RuntimeError)):
        session = eng.open_batch(2)
        session.add("a", "fine", PARAMS, VOICE)
        session.add("b", f"bad {marker}", PARAMS, VOICE)
        with pytest.raises(error):
            session.step()
        with pytest.raises(EngineError, match="after an error"):  # the session is unusable; the worker redoes it
            session.step()
        session.close()
    session = eng.open_batch(3)  # more rows than FISH_SYNTHETIC_MAX_ROWS: out of memory
    for key in "abc":
        session.add(key, "fine", PARAMS, VOICE)
    with pytest.raises(EngineOutOfMemoryError, match="FISH_SYNTHETIC_MAX_ROWS=2"):
        session.step()
    monkeypatch.setenv("FISH_SYNTHETIC_MAX_CAPACITY", "2")
    with pytest.raises(EngineOutOfMemoryError, match="FISH_SYNTHETIC_MAX_CAPACITY=2"):  # preallocating 3 rows
        SyntheticEngine(Settings(engine="synthetic"), "cpu").open_batch(3)
    session = eng.open_batch(2)
    session.add("a", "x @@oom-once@@", PARAMS, VOICE)
    with pytest.raises(EngineOutOfMemoryError):
        session.step()
    session = eng.open_batch(2)
    session.add("a", "x @@oom-once@@", PARAMS, VOICE)
    assert set(_drain(session)) == {"a"}  # fired once only, across sessions


# ---- bad takes for the take check (fishmp/worker/takes.py) -----------------------------------------------------------
@pytest.mark.parametrize("kind", ["runaway", "silent", "clipped", "nan", "short"])
def test_bad_take_markers_recover_from_seed_k(monkeypatch, kind) -> None:
    eng = _engine(monkeypatch)
    text = f"@@{kind}:2@@ " + "x" * 20  # 21 spoken characters (the marker is not spoken): 1.26 s when good
    good = eng.synthesize("x" * 20 + " ", VOICE, PARAMS)
    for seed in (None, 0, 1):  # unseeded or below 2: bad
        audio = eng.synthesize(text, VOICE, SynthesisParams(max_new_tokens=100, seed=seed))
        x = audio.samples
        if kind == "runaway":  # ran to max_new_tokens: 99 frames kept, as fish-speech drops the last
            assert audio.tokens == 99 and audio.seconds == pytest.approx(99 / 21.53, abs=1e-4)
        elif kind == "silent":
            assert len(x) == len(good.samples) and not x.any()
        elif kind == "clipped":
            assert np.all(np.abs(x) == 1.0)
        elif kind == "nan":
            assert np.isnan(x).sum() == -(-len(x) // 100)
        else:
            assert len(x) == len(good.samples) // 5
    for seed in (2, 3):
        assert np.array_equal(eng.synthesize(text, VOICE, SynthesisParams(seed=seed)).samples, good.samples)
    never = eng.synthesize(f"@@{kind}@@ " + "x" * 20, VOICE, SynthesisParams(max_new_tokens=100, seed=10**6))
    assert not np.array_equal(never.samples, good.samples)  # without K: never recovers


def test_bad_takes_in_a_batch_are_synthesize_takes(monkeypatch) -> None:
    eng = _engine(monkeypatch)
    texts = {"a": "@@silent:1@@ hello", "b": "@@runaway@@ hello", "c": "hello"}
    params = SynthesisParams(max_new_tokens=50, seed=0)
    session = eng.open_batch(3)
    for key, text in texts.items():
        session.add(key, text, params, VOICE)
    out = {}
    while session.active():
        out.update(dict(session.step()))
    for key, text in texts.items():
        alone = eng.synthesize(text, VOICE, params)
        assert np.array_equal(out[key].samples, alone.samples) and out[key].tokens == alone.tokens
