"""Prompt-token files, the reference encode cache (keys, hits, misses, corruption, concurrency), speaker keys."""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest

from fishmp.config import Settings
from fishmp.engines.base import BadReferenceError
from fishmp.engines.synthetic import SyntheticEngine
from fishmp.worker.references import cache_path, encode_cached, load_prompt_tokens, speaker_key


class CountingEngine(SyntheticEngine):
    """The synthetic engine, counting real encodes (a subclass, not a mock: the encode itself is real)."""

    def __init__(self, fingerprint: str = "synthetic") -> None:
        super().__init__(Settings(engine="synthetic"), "cpu")
        self.encodes = 0
        self._fp = fingerprint

    def encode_reference(self, audio_path: str) -> np.ndarray:
        self.encodes += 1
        return super().encode_reference(audio_path)

    def fingerprint(self) -> str:
        return self._fp


def test_load_prompt_tokens(tmp_path) -> None:
    good = np.arange(50, dtype=np.int32).reshape(10, 5)
    np.save(tmp_path / "good.npy", good)
    assert np.array_equal(load_prompt_tokens(str(tmp_path / "good.npy")), good)


@pytest.mark.parametrize("case", ["missing", "corrupt", "1d", "nine-rows", "float", "empty", "negative"])
def test_load_prompt_tokens_rejects(tmp_path, case) -> None:
    path = tmp_path / f"{case}-tokens.npy"
    arrays = {"1d": np.zeros(10, np.int64), "nine-rows": np.zeros((9, 4), np.int64),
              "float": np.zeros((10, 4)), "empty": np.zeros((10, 0), np.int64),
              "negative": -np.ones((10, 4), np.int64)}
    if case == "corrupt":
        path.write_bytes(b"\x93NUMPY garbage")
    elif case in arrays:
        np.save(path, arrays[case])
    with pytest.raises(BadReferenceError, match=f"{case}-tokens.npy"):
        load_prompt_tokens(str(path))


def test_cache_hit_miss_and_invalidation(make_wav, tmp_path) -> None:
    engine, cache = CountingEngine(), str(tmp_path / "cache")
    ref = make_wav(str(tmp_path / "ref.wav"), 1.0)
    first, hit = encode_cached(engine, ref, cache)
    assert not hit and engine.encodes == 1
    again, hit = encode_cached(engine, ref, cache)
    assert hit and engine.encodes == 1 and np.array_equal(first, again)
    make_wav(ref, 1.5)  # the audio changes: a miss
    changed, hit = encode_cached(engine, ref, cache)
    assert not hit and engine.encodes == 2 and changed.shape != first.shape
    _, hit = encode_cached(CountingEngine("other-checkpoint"), ref, cache)
    assert not hit  # another model: another entry
    assert not [n for n in os.listdir(cache) if n.startswith(".tmp-")]


def test_corrupt_cache_entry_is_rewritten(make_wav, tmp_path) -> None:
    engine, cache = CountingEngine(), str(tmp_path / "cache")
    ref = make_wav(str(tmp_path / "ref.wav"), 1.0)
    tokens, _ = encode_cached(engine, ref, cache)
    entry = cache_path(ref, engine.fingerprint(), cache)
    with open(entry, "wb") as f:
        f.write(b"not an npy file")
    again, hit = encode_cached(engine, ref, cache)
    assert not hit and np.array_equal(tokens, again)
    assert encode_cached(engine, ref, cache)[1]  # rewritten: a hit now


def test_missing_reference(tmp_path) -> None:
    with pytest.raises(BadReferenceError, match="nope.wav"):
        encode_cached(CountingEngine(), str(tmp_path / "nope.wav"), str(tmp_path / "cache"))


def test_concurrent_writers(make_wav, tmp_path) -> None:
    ref = make_wav(str(tmp_path / "ref.wav"), 1.0)
    cache = str(tmp_path / "cache")
    results: list[np.ndarray] = []
    errors: list[BaseException] = []

    def work() -> None:
        try:
            results.append(encode_cached(CountingEngine(), ref, cache)[0])
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 8
    assert all(np.array_equal(results[0], r) for r in results)
    assert os.listdir(cache) == [os.path.basename(cache_path(ref, "synthetic", cache))]


def test_speaker_key() -> None:
    tokens = np.arange(40).reshape(10, 4)
    key = speaker_key(tokens, "hello")
    assert key == speaker_key(tokens.astype(np.int32), "hello")
    assert key != speaker_key(tokens, "hello!")
    assert key != speaker_key(tokens + 1, "hello")
    assert key != speaker_key(tokens.reshape(10, 4)[:, :3], "hello")


@pytest.mark.slow
def test_cache_with_fish_engine(tiny_checkpoint, make_wav, tmp_path) -> None:
    from fishmp.engines.fish import FishSpeechEngine

    engine = FishSpeechEngine(Settings(checkpoint_dir=tiny_checkpoint), "cpu")
    engine.load()
    ref = make_wav(str(tmp_path / "ref.wav"), 1.0, 22050)
    tokens, hit = encode_cached(engine, ref, str(tmp_path / "cache"))
    assert not hit and tokens.shape[0] == 10
    again, hit = encode_cached(engine, ref, str(tmp_path / "cache"))
    assert hit and np.array_equal(tokens, again)
    assert engine.fingerprint() in os.listdir(tmp_path / "cache")[0]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_cache_entries_honour_the_umask(make_wav, tmp_path, umask: int, mode: int) -> None:
    """Like wavs and the manifest: 0666 minus the umask, so another user of a shared cache directory can read it."""
    ref = make_wav(str(tmp_path / "ref.wav"), 0.5)
    old = os.umask(umask)
    try:
        encode_cached(CountingEngine(), ref, str(tmp_path / "cache"))
    finally:
        os.umask(old)
    (entry,) = os.listdir(tmp_path / "cache")  # and no temp file left beside it
    assert os.stat(tmp_path / "cache" / entry).st_mode & 0o777 == mode


@pytest.mark.parametrize("row, code, dtype", [
    (0, 4096, np.int64), (0, 5000, np.int64), (3, 1024, np.int64), (9, 2**31 + 5, np.int64), (0, 2**62, np.int64),
    (1, 2**63 + 7, np.uint64), (0, 70000, np.int32),
], ids=["semantic-4096", "semantic-5000", "residual-1024", "int32-overflow", "2**62", "uint64", "int32-file"])
def test_codes_beyond_the_checkpoints_codebooks_are_a_bad_reference(tmp_path, row, code, dtype) -> None:
    """Issue 25 item 6: such a code indexes past the model's embeddings (a crash, or a silently wrapped prompt)."""
    tokens = np.zeros((10, 6), dtype=dtype)
    tokens[row, 2] = code
    path = tmp_path / "voice-tokens.npy"
    np.save(path, tokens)
    with pytest.raises(BadReferenceError, match=rf"voice-tokens\.npy: code {code} in the .* is beyond"):
        load_prompt_tokens(str(path), (4096, 1024))
    tokens[row, 2] = (4095 if row == 0 else 1023)  # the largest valid code
    np.save(path, tokens)
    assert load_prompt_tokens(str(path), (4096, 1024)).shape == (10, 6)


def test_codebook_sizes_come_from_the_checkpoint(tiny_checkpoint, tmp_path) -> None:
    import json
    import shutil

    from fishmp.worker.references import codebook_sizes

    assert codebook_sizes(Settings(checkpoint_dir=tiny_checkpoint)) == (4096, 1024)
    assert codebook_sizes(Settings(engine="synthetic")) == (4096, 1024)
    other = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["codebook_size"] = 2048  # a smaller LLM embedding bounds every row
    (other / "config.json").write_text(json.dumps(cfg))
    assert codebook_sizes(Settings(checkpoint_dir=str(other))) == (2048, 1024)


def test_a_prompt_with_out_of_range_codes_fails_its_speaker_not_the_worker(tmp_path, make_wav, fishmp_cli) -> None:
    import json

    from conftest import jsonl_events, synthetic_env

    make_wav(str(tmp_path / "good.wav"), 1.0, 16000)
    bad = np.zeros((10, 8), np.int64)
    bad[0, 3] = 5000
    np.save(tmp_path / "bad.npy", bad)
    job = {"speakers": {"good": {"reference_audio": "good.wav", "reference_text": "Good."},
                        "bad": {"prompt_tokens": "bad.npy", "reference_text": "Bad."}},
           "segments": [{"id": f"{s}{i}", "speaker": s, "text": f"Line {i}."} for s in ("good", "bad") for i in range(3)]}
    (tmp_path / "job.json").write_text(json.dumps(job))
    out = fishmp_cli(["generate", "job.json", "-o", "out", "--progress", "jsonl"], str(tmp_path), synthetic_env(tmp_path))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    segs = json.loads((tmp_path / "out" / "manifest.json").read_text())["segments"]
    assert {s: r["status"] for s, r in segs.items() if s.startswith("good")} == dict.fromkeys(["good0", "good1", "good2"],
                                                                                            "done")
    for sid in ("bad0", "bad1", "bad2"):
        assert segs[sid]["error_kind"] == "bad_reference" and "bad.npy" in segs[sid]["error"]
        assert "code 5000" in segs[sid]["error"] and segs[sid]["attempts"] == 1
    assert not [e for e in jsonl_events(out.stdout) if e["event"] in ("worker_died", "segment_requeued")]


@pytest.mark.slow
def test_bad_references_with_the_fish_engine_fail_their_speaker_by_name(tiny_checkpoint, tmp_path, make_wav,
                                                                        clean_env) -> None:
    """The real path, one worker: out-of-range prompt codes crashed it (poison after 3 reloads for one segment);
    a transcript too long for the model was reported as `speaker <content hash>`. Both now fail their speaker
    (bad_reference), by its name, without a model reload."""
    import fishmp

    rng = np.random.default_rng(0)
    good = np.concatenate([rng.integers(0, 4096, (1, 20)), rng.integers(0, 1024, (9, 20))]).astype(np.int64)
    bad = good.copy()
    bad[0, 5] = 5000
    np.save(tmp_path / "good.npy", good)
    np.save(tmp_path / "bad.npy", bad)
    make_wav(str(tmp_path / "v.wav"), 1.0)
    params = {"max_new_tokens": 8, "seed": 1}
    job = {"speakers": {"good": {"prompt_tokens": str(tmp_path / "good.npy"), "reference_text": "Good."},
                        "bad": {"prompt_tokens": str(tmp_path / "bad.npy"), "reference_text": "Bad."},
                        "narrator": {"reference_audio": str(tmp_path / "v.wav"), "reference_text": "Long. " * 120}},
           "segments": [{"id": sid, "speaker": sid, "text": "Hello.", "params": params}
                        for sid in ("bad", "narrator", "good")]}
    events: list[dict] = []
    with fishmp.Pool(engine="fish", checkpoint_dir=tiny_checkpoint, devices="cpu", cpu_workers=1, take_check=False,
                     multiprocess_mode="true", precision="float32", cache_dir=str(tmp_path / "c")) as pool:
        result = pool.generate(job, output_dir=str(tmp_path / "out"), on_event=events.append)
    assert result.records["good"].status == "done"
    assert result.records["bad"].error_kind == "bad_reference" and "bad.npy" in result.records["bad"].error
    narrator = result.records["narrator"]
    assert narrator.error_kind == "bad_reference" and 'speaker "narrator"' in narrator.error, narrator.error
    words = narrator.error.replace(":", " ").split()
    assert not any(len(w) == 32 and all(c in "0123456789abcdef" for c in w) for w in words)  # no content hash
    assert sum(e["event"] == "worker_ready" for e in events) == 1 and not any(e["event"] == "worker_died"
                                                                              for e in events)
