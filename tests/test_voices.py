"""Voices prepared beside the decode loop (fishmp/worker/voices.py): a new reference is encoded on the stage's thread
while the running rows keep stepping, on the tiny real checkpoint (real codec encode, real batch session, real
threads; the worker's own _SegmentRunner around its lanes, fed through its inbox as the reader thread feeds it)."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator

import numpy as np
import pytest
import soundfile as sf

from fishmp.config import Settings
from fishmp.engines.base import SpeakerPrompt, SynthesisParams
from fishmp.engines.fish import FishSpeechEngine
from fishmp.worker.files import write_wav
from fishmp.worker.process import _SegmentRunner
from fishmp.worker.protocol import Done, Failed, SegmentTask, SpeakerRef, Started
from fishmp.worker.references import encode_cached, speaker_key
from fishmp.worker.voices import VoiceStage

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: str) -> Iterator[FishSpeechEngine]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as tests/test_batched.py: both paths compared run with the same setting
    eng = FishSpeechEngine(Settings(checkpoint_dir=tiny_checkpoint, take_check=False), "cpu")  # one take each
    eng.load()
    yield eng
    torch.set_num_threads(threads)


def run_worker(engine: FishSpeechEngine, tmp_path, tasks: list[SegmentTask], batch_size: int) -> tuple[list, _SegmentRunner]:
    """The worker's lanes and writer on this engine: every task in the inbox, then the stop sentinel."""
    settings = Settings(checkpoint_dir=engine.settings.checkpoint_dir, batch_size=batch_size,
                        cache_dir=str(tmp_path / "cache"), take_check=False)
    messages: list = []
    lock = threading.Lock()

    def send(msg: object) -> None:
        with lock:
            messages.append(msg)

    inbox: queue.Queue = queue.Queue()
    for t in [*tasks, None]:
        inbox.put(t)
    runner = _SegmentRunner("w0", engine, settings, send, inbox, batch_size)
    try:
        runner.lanes.run()
    finally:
        runner.close()
    return messages, runner


def test_rows_keep_stepping_while_a_new_voice_is_encoded(engine, tmp_path, make_wav) -> None:
    # A long row of voice A runs; the segment of voice B arrives with it, its 8 s reference not encoded yet (the
    # encode takes many decode steps' time). The loop must step A's row meanwhile, then add B's row once its voice
    # is ready, and B's audio must be what batch 1 gives it.
    a = SpeakerRef("a", "I am a.", reference_audio=make_wav(str(tmp_path / "a.wav"), 1.0, 16000), fingerprint="a")
    b = SpeakerRef("b", "I am b.", reference_audio=make_wav(str(tmp_path / "b.wav"), 8.0, 44100), fingerprint="b")
    out = tmp_path / "wavs"
    out.mkdir()
    tasks = [SegmentTask("a0", "A long line for the first voice.", a, {"seed": 1, "max_new_tokens": 150},
                         str(out / "a0.wav")),
             SegmentTask("b0", "The new voice.", b, {"seed": 2, "max_new_tokens": 40}, str(out / "b0.wav"))]
    messages, runner = run_worker(engine, tmp_path, tasks, batch_size=4)
    assert not [m for m in messages if isinstance(m, Failed)]
    assert {m.task for m in messages if isinstance(m, Done)} == {"a0", "b0"}
    lanes = runner.lanes
    # the decode loop stepped a0's row while b's reference was being encoded on the stage's thread
    print(f"steps beside voices: {lanes.steps_beside_voices}, waits {lanes.voice_waits}")
    assert lanes.steps_beside_voices >= 2, lanes.steps_beside_voices
    assert lanes.voice_waits >= 1  # b0 waited at the head for its voice while a0 stepped
    assert lanes.voices is not None and lanes.voices.prepared == 2  # a and b, each once
    started = [m.task for m in messages if isinstance(m, Started)]
    assert started == ["a0", "b0"]

    tokens, hit = encode_cached(engine, b.reference_audio, str(tmp_path / "cache"))
    assert hit  # the stage's encode went through the reference cache
    alone = engine.synthesize("The new voice.", SpeakerPrompt(speaker_key(tokens, b.reference_text), tokens,
                                                              b.reference_text),
                              SynthesisParams(seed=2, max_new_tokens=40))
    write_wav(str(tmp_path / "alone.wav"), alone.samples, alone.sample_rate)  # as the worker's writer writes it
    assert np.array_equal(sf.read(out / "b0.wav")[0], sf.read(tmp_path / "alone.wav")[0])
    assert next(m.tokens for m in messages if isinstance(m, Done) and m.task == "b0") == alone.tokens


def test_a_bad_voice_fails_its_segments_only(engine, tmp_path, make_wav) -> None:
    # The stage's failure stays the voice's: its two segments fail bad_reference, naming the speaker; the rows of
    # the good voice (running while the bad one was tried) finish.
    good = SpeakerRef("good", "I am good.", reference_audio=make_wav(str(tmp_path / "g.wav"), 1.0, 16000),
                      fingerprint="g")
    (tmp_path / "bad.wav").write_bytes(b"RIFF not a wav at all")
    bad = SpeakerRef("bad", "I am bad.", reference_audio=str(tmp_path / "bad.wav"), fingerprint="b")
    out = tmp_path / "wavs"
    out.mkdir()
    tasks = [SegmentTask("g0", "Good line.", good, {"seed": 1, "max_new_tokens": 60}, str(out / "g0.wav")),
             SegmentTask("x0", "Bad line.", bad, {"seed": 2, "max_new_tokens": 20}, str(out / "x0.wav")),
             SegmentTask("g1", "Good again.", good, {"seed": 3, "max_new_tokens": 20}, str(out / "g1.wav")),
             SegmentTask("x1", "Bad again.", bad, {"seed": 4, "max_new_tokens": 20}, str(out / "x1.wav"))]
    messages, runner = run_worker(engine, tmp_path, tasks, batch_size=4)
    failed = {m.task: m for m in messages if isinstance(m, Failed)}
    assert set(failed) == {"x0", "x1"}
    assert all(f.kind == "bad_reference" and f.input_error for f in failed.values())
    assert {m.task for m in messages if isinstance(m, Done)} == {"g0", "g1"}
    assert runner.lanes.voices is not None and not runner.lanes.voices.pending()  # nothing left queued


def test_stage_prepares_each_voice_once_in_order_and_forgets_failures() -> None:
    # The stage alone, around a plain callable: one preparation per voice however often it is wanted, in order; a
    # failure is raised to the taker and forgotten (the next want tries again).
    calls: list[str] = []
    release = threading.Event()

    def prepare(ref: str) -> str:
        release.wait(10)
        calls.append(ref)
        if ref == "bad":
            raise ValueError("unusable")
        return ref.upper()

    stage = VoiceStage(prepare)
    try:
        stage.want(["a", "bad", "a", "b"])
        assert stage.pending() == ["a", "bad", "b"] and not stage.ready("a")
        release.set()
        assert stage.take("a") == "A"
        with pytest.raises(ValueError, match="unusable"):
            stage.take("bad")
        assert stage.take("b") == "B"
        assert calls == ["a", "bad", "b"] and stage.prepared == 3
        stage.want(["bad", "c"])  # tried again; a voice no task needs any more is forgotten
        stage.forget(["c"])
        with pytest.raises(ValueError, match="unusable"):
            stage.take("bad")
        assert calls.count("bad") == 2 and stage.pending() == []
    finally:
        stage.close()


def test_the_main_process_knows_the_engines_fingerprint(engine) -> None:
    # `fishmp encode` reuses cache entries without loading a model: the fingerprint it computes must be the one the
    # loaded engine names its entries with
    from fishmp.worker.references import engine_fingerprint

    assert engine_fingerprint(engine.settings) == engine.fingerprint()


def test_a_new_voice_is_prefilled_with_its_rows_text(engine) -> None:
    # Three rows start at once, two of them of a voice the prefix cache has never seen and one of another new voice:
    # each prefills its whole prompt in the one forward of the starting rows (no forward of its own for the prefix),
    # the voices' prefixes are then cached once each, and every row's audio is what batch 1 gives it from the cache.
    rng = np.random.default_rng(7)
    voices = [SpeakerPrompt(f"joint-{k}", rng.integers(0, 1024, (10, n)), f"Voice {k} speaking.")
              for k, n in ((1, 50), (2, 30))]
    items = [("r0", "First row here.", voices[0], 7), ("r1", "Second, another voice.", voices[1], 8),
             ("r2", "Third row, first voice again.", voices[0], 9)]
    before = engine.prefixes.prefills
    session = engine.open_batch(4)
    try:
        for key, text, voice, seed in items:
            session.add(key, text, SynthesisParams(seed=seed, max_new_tokens=12), voice)
        assert engine.prefixes.prefills == before  # nothing prefilled on add
        got = {}
        while session.active():
            got.update(dict(session.step()))
    finally:
        session.close()
    assert engine.prefixes.prefills - before == 2 and len({p for p in ("joint-1", "joint-2")
                                                           if engine.prefixes.peek(p) is not None}) == 2
    for key, text, voice, seed in items:  # batch 1, the prefixes now copied from the cache
        alone = engine.synthesize(text, voice, SynthesisParams(seed=seed, max_new_tokens=12))
        assert got[key].tokens == alone.tokens and np.array_equal(got[key].samples, alone.samples), key
    assert engine.prefixes.prefills - before == 2


def test_the_engines_tokenizer_gives_fish_speechs_tokens(engine) -> None:
    # fishmp.engines.fish_common.encode_inline: fish-speech's FishTokenizer.encode without a thread per call and with
    # only the special tokens the text holds allowed; the same tokens for texts with specials, partial ones, others
    from fish_speech.tokenizer import FishTokenizer

    upstream = FishTokenizer.from_pretrained(engine.settings.checkpoint_dir)
    texts = ["<|interleave|><|speaker:0|>This is it.<|im_end|>", "Hi <|semantic:12|><|semantic:4095|> <|foo|> "
             "<|<|speaker:0|>|> ä 中文 <|im_end", "", "plain text " * 40]
    for text in texts:
        for allowed in (True, False, {"<|im_end|>"}):
            assert engine._model.tokenizer.encode(text, allowed_special=allowed) == \
                upstream.encode(text, allowed_special=allowed), (text, allowed)
