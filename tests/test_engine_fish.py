"""FishSpeechEngine through fish-speech's real code, on a tiny random checkpoint (noise-like audio, real code paths)."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from fishmp.config import ConfigError, Settings
from fishmp.engines.base import (
    BadReferenceError,
    EngineError,
    EngineOutOfMemoryError,
    SpeakerPrompt,
    SynthesisParams,
    TextTooLongError,
)
from fishmp.engines.fish import FishSpeechEngine
from fishmp.engines.fish_common import guard_oom, split_text
from fishmp.planning.checkpoint import checkpoint_fingerprint

pytestmark = pytest.mark.slow
ENV_AT_COLLECTION = dict(os.environ)  # before any test of this session imported fish_speech
FAST = SynthesisParams(max_new_tokens=30, seed=7)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: str) -> FishSpeechEngine:
    eng = FishSpeechEngine(Settings(checkpoint_dir=tiny_checkpoint, precision="bfloat16"), "cpu")
    eng.load()
    return eng


@pytest.fixture
def voice(engine: FishSpeechEngine, make_wav, tmp_path) -> SpeakerPrompt:
    tokens = engine.encode_reference(make_wav(str(tmp_path / "ref.wav"), 2.0))
    return SpeakerPrompt(key="voice-a", tokens=tokens, text="This is the reference speaker.")


def test_clone_two_texts(engine: FishSpeechEngine, voice: SpeakerPrompt, tmp_path, monkeypatch) -> None:
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)  # the engine must not write into the cwd
    assert engine.sample_rate == 44100
    for text in ("Hello there, how are you?", "The second line of the dub."):
        audio = engine.synthesize(text, voice, FAST)
        assert audio.sample_rate == 44100 and audio.samples.dtype == np.float32
        assert 0 < audio.tokens <= FAST.max_new_tokens
        assert len(audio.samples) == audio.tokens * 2048  # one codec frame = 2048 samples
        assert np.isfinite(audio.samples).all() and np.abs(audio.samples).max() > 1e-3
    assert os.listdir(cwd) == []


def test_no_surprises_in_environment(engine: FishSpeechEngine) -> None:
    for key in ("TOKENIZERS_PARALLELISM", "PROJECT_ROOT", "TORCHINDUCTOR_CACHE_DIR"):
        assert os.environ.get(key) == ENV_AT_COLLECTION.get(key)


def test_seed_reproduces_and_restores_global_rng(engine: FishSpeechEngine, voice: SpeakerPrompt) -> None:
    import torch

    state = torch.get_rng_state()
    a = engine.synthesize("Same seed, same samples.", voice, SynthesisParams(max_new_tokens=20, seed=123))
    b = engine.synthesize("Same seed, same samples.", voice, SynthesisParams(max_new_tokens=20, seed=123))
    c = engine.synthesize("Same seed, same samples.", voice, SynthesisParams(max_new_tokens=20, seed=124))
    assert np.array_equal(a.samples, b.samples)
    assert a.samples.shape != c.samples.shape or not np.array_equal(a.samples, c.samples)
    assert torch.equal(torch.get_rng_state(), state)  # counter-based noise: the global RNG is never drawn from
    up = [engine.synthesize_upstream("Same seed, same samples.", voice, SynthesisParams(max_new_tokens=20, seed=s))
          for s in (123, 123)]
    assert np.array_equal(up[0].samples, up[1].samples)
    assert torch.equal(torch.get_rng_state(), state)  # fish-speech's own path seeds inside fork_rng


def test_speaker_prompt_prepared_once(engine: FishSpeechEngine, voice: SpeakerPrompt) -> None:
    engine.synthesize("One.", voice, SynthesisParams(max_new_tokens=3, seed=1))
    prepared = engine._prompt
    engine.synthesize("Two.", voice, SynthesisParams(max_new_tokens=3, seed=1))
    assert engine._prompt is prepared
    engine.synthesize("No voice.", None, SynthesisParams(max_new_tokens=3, seed=1))
    assert engine._prompt is prepared  # kept for the last key


@pytest.mark.parametrize("rate,channels", [(16000, 2), (48000, 1), (44100, 1)])
def test_reference_any_rate_and_channels(engine: FishSpeechEngine, make_wav, tmp_path, rate, channels) -> None:
    tokens = engine.encode_reference(make_wav(str(tmp_path / "r.wav"), 2.0, rate, channels))
    assert tokens.shape[0] == 10 and abs(tokens.shape[1] - 2.0 * 21.53) <= 2
    assert np.issubdtype(tokens.dtype, np.integer)
    assert 0 <= tokens[0].min() and tokens[0].max() < 4096 and tokens[1:].max() < 1024


@pytest.mark.parametrize("case", ["missing", "corrupt", "short", "silent"])
def test_bad_reference(engine: FishSpeechEngine, make_wav, tmp_path, case) -> None:
    path = str(tmp_path / f"{case}-ref.wav")
    if case == "corrupt":
        with open(path, "wb") as f:
            f.write(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 10)
    elif case == "short":
        make_wav(path, 0.1)
    elif case == "silent":
        make_wav(path, 2.0, kind="silent")
    with pytest.raises(BadReferenceError, match=f"{case}-ref.wav"):
        engine.encode_reference(path)


def test_reference_longer_than_the_codec_takes(engine: FishSpeechEngine, make_wav, tmp_path) -> None:
    assert 90 < engine.max_reference_s < 100 and engine.max_frames == 2048  # tiny codec: block sizes 8192 / 2048
    with pytest.raises(BadReferenceError, match="long-ref.wav"):
        engine.encode_reference(make_wav(str(tmp_path / "long-ref.wav"), engine.max_reference_s + 1, 8000))


def test_out_of_memory_is_translated() -> None:
    import torch

    def cuda_oom() -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def runtime_oom() -> None:
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate: out of memory")

    for fn in (cuda_oom, runtime_oom):
        with pytest.raises(EngineOutOfMemoryError, match="step: out of memory") as info:
            guard_oom("step", fn)
        assert info.value.__context__ is None  # the traceback (and its tensors) is not kept alive
    with pytest.raises(RuntimeError, match="other"):
        guard_oom("step", lambda: (_ for _ in ()).throw(RuntimeError("other")))


def test_split_text_levels() -> None:
    def short(t: str) -> bool:
        return len(t) <= 20

    def tiny(t: str) -> bool:
        return len(t) <= 12

    assert split_text("One two. Three four! Five six?", tiny) == ["One two.", "Three four!", "Five six?"]
    assert split_text("One two. Three four! Five six?", short) == ["One two. Three four!", "Five six?"]  # packed
    cjk = split_text("第一句话。第二句话！第三句话？", lambda t: len(t) <= 6)
    assert cjk == ["第一句话。", "第二句话！", "第三句话？"]
    assert split_text("line one\nline two\nline three", short) == ["line one\nline two", "line three"]
    assert split_text("Pi is 3.14159 and e is 2.71828 exactly", short) == ["Pi is 3.14159 and e", "is 2.71828 exactly"]
    assert split_text("alpha, beta, gamma, delta, epsilon", short) == ["alpha, beta, gamma,", "delta, epsilon"]
    with pytest.raises(TextTooLongError):
        split_text("x" * 30, short)


def test_long_text_is_split_to_fit(engine: FishSpeechEngine, voice: SpeakerPrompt) -> None:
    # The tiny model takes max_seq_len 2560 - 2048 = 512 prompt tokens (one per byte): ~450 bytes after the voice.
    text = " ".join(f"Sentence number {i} of a rather long paragraph that goes on." for i in range(20))
    prompt = engine._speaker_prompt(voice)
    limit = engine.max_seq_len - 2048
    chunks = split_text(text, lambda t: engine.prompt_length(t, prompt) < limit)
    assert len(chunks) >= 3 and " ".join(chunks) == text
    audio = engine.synthesize(text, voice, SynthesisParams(max_new_tokens=4, seed=3))
    assert len(chunks) <= audio.tokens <= 4 * len(chunks)  # max_new_tokens applies per chunk
    with pytest.raises(TextTooLongError):
        engine.synthesize("x" * 1000, voice, FAST)


def test_sampling_params_checked(engine: FishSpeechEngine, voice: SpeakerPrompt) -> None:
    with pytest.raises(ValueError, match="out of range"):
        engine.synthesize("Hi.", voice, SynthesisParams(temperature=2.5))
    engine.release_memory()  # a no-op on CPU; must not fail


def test_max_seq_len_lowers_kv_cache(tiny_checkpoint: str) -> None:
    eng = FishSpeechEngine(Settings(checkpoint_dir=tiny_checkpoint, max_seq_len=2304), "cpu")
    eng.load()
    assert eng.max_seq_len == 2304
    session = eng.open_batch(1)  # the batch sessions' KV cache (fish-speech's own is not allocated at load)
    assert session._net.k[0].shape[2] == 2304
    session.close()
    assert getattr(eng._model.layers[0].attention, "kv_cache", None) is None
    assert eng._model.causal_mask.shape == (2304, 2304)
    with pytest.raises(ConfigError, match="max_seq_len"):  # rejected as configuration, before any model loads
        Settings(checkpoint_dir=tiny_checkpoint, max_seq_len=2048)


def test_missing_or_corrupt_checkpoint(tiny_checkpoint: str, tmp_path) -> None:
    with pytest.raises(EngineError, match="model.pth"):
        FishSpeechEngine(Settings(checkpoint_dir=str(tmp_path)), "cpu").load()
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    (broken / "model.pth").write_bytes(b"truncated")
    with pytest.raises(EngineError, match="cannot load"):
        FishSpeechEngine(Settings(checkpoint_dir=str(broken)), "cpu").load()


def test_fingerprint_follows_content(engine: FishSpeechEngine, tiny_checkpoint: str, tmp_path) -> None:
    assert engine.fingerprint() == "fish-" + checkpoint_fingerprint(tiny_checkpoint)
    copy = shutil.copytree(tiny_checkpoint, tmp_path / "copy")
    same = FishSpeechEngine(Settings(checkpoint_dir=str(copy)), "cpu")
    assert same.fingerprint() == engine.fingerprint()  # content, not path; no load needed
    with open(copy / "config.json", "a") as f:
        f.write("\n")
    assert FishSpeechEngine(Settings(checkpoint_dir=str(copy)), "cpu").fingerprint() != engine.fingerprint()


@pytest.mark.parametrize("seconds,ref_text", [(1.0, "Hi."), (4.0, "A much longer reference transcript, " * 4)])
def test_auto_max_seq_len_fits_the_real_prompt(engine: FishSpeechEngine, make_wav, tmp_path, seconds, ref_text) -> None:
    """FISH_MAX_SEQ_LEN=auto (sized from the job in the main process, no torch) must leave the real prompt room."""
    from fishmp.api import sized_max_seq_len
    from fishmp.job import job_from_dict

    wav = make_wav(str(tmp_path / "r.wav"), seconds, 22050)
    text = "Ünïcode and English text, 中文也有. " * 3
    job = job_from_dict({"speakers": {"s": {"reference_audio": wav, "reference_text": ref_text}},
                         "segments": [{"id": "1", "speaker": "s", "text": text}]}, str(tmp_path), str(tmp_path / "o"))
    tokens = engine.encode_reference(wav)
    real = engine.prompt_length(text, engine._speaker_prompt(SpeakerPrompt("auto", tokens, ref_text)))
    sized = sized_max_seq_len(job)
    assert sized - 2048 > real  # fish-speech's rule: prompt < max_seq_len - 2048
    assert sized - 2048 < real + 400  # and not wastefully larger


@pytest.mark.slow
def test_compile_warm_up_is_paid_at_load(tiny_checkpoint: str, voice: SpeakerPrompt) -> None:
    """FISH_COMPILE=true: the compile happens inside load(), so the first real segment is not the slow one."""
    import time

    from torch._dynamo.utils import counters

    eng = FishSpeechEngine(Settings(checkpoint_dir=tiny_checkpoint, compile=True), "cpu")
    t0 = time.perf_counter()
    eng.load()
    load_s = time.perf_counter() - t0
    graphs = counters["stats"]["unique_graphs"]
    t0 = time.perf_counter()
    audio = eng.synthesize("Hello there.", voice, SynthesisParams(max_new_tokens=8, seed=1))
    first_s = time.perf_counter() - t0
    assert audio.tokens > 0 and np.isfinite(audio.samples).all()
    assert first_s < load_s  # the trace was paid at load
    assert counters["stats"]["unique_graphs"] == graphs  # and every graph the segment needed was compiled there
