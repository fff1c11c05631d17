"""The fit in a real run (`python -m fishmp generate`, worker processes, the synthetic engine): the fit-aware take
choice on takes of controlled lengths (`@@pace:...@@`), the manifest's fit records and the raw take beside the fitted
one, and the guarantee that jobs without slots, `fit: false` jobs and legacy configs write the very bytes they wrote
before fitting existed."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import soundfile as sf
from conftest import synthetic_env

from fishmp.config import Settings
from fishmp.engines.synthetic import SyntheticEngine

LINE = "Hello there, my friend."  # 23 characters: 1.38 s of synthetic tone


def _job(tmp_path, make_wav, segments: list[dict], **top) -> str:
    make_wav(str(tmp_path / "a.wav"), 1.0, 16000)
    job = {"speakers": {"a": {"reference_audio": "a.wav", "reference_text": "I am a."}},
           "segments": [{"speaker": "a", **s} for s in segments], **top}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return str(path)


def _segments(out) -> dict:
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)["segments"]


def test_the_take_needing_the_least_stretch_is_kept(tmp_path, make_wav, fishmp_cli) -> None:
    job = _job(tmp_path, make_wav, [
        # seeds none, 1, 2 make takes 1.5x, 1.3x, 1.1x the slot: the first two need more than 1.25x, the third fits
        {"id": "third", "text": f"@@pace:1.5/1.3/1.1@@ {LINE}", "max_seconds": 1.38},
        # with one more seed only: the second (1.3x) is the least stretch, still an overrun
        {"id": "second", "text": f"@@pace:1.5/1.3/1.1@@ {LINE}", "max_seconds": 1.38, "fit": {"retries": 1}},
        # a later take that is worse is not kept
        {"id": "first", "text": f"@@pace:1.3/1.6/1.4@@ {LINE}", "max_seconds": 1.38},
        # without the choice: the first take that passes the check, stretched at the cap, overrunning
        {"id": "nochoice", "text": f"@@pace:1.5/1.1@@ {LINE}", "max_seconds": 1.38, "fit": {"choose_take": False}},
        # fits at once: no extra take
        {"id": "fits", "text": f"@@pace:1.2/1.0@@ {LINE}", "start": 10.0, "end": 11.38},
    ], fit={"loudness_lufs": None})
    out = str(tmp_path / "out")
    res = fishmp_cli(["generate", job, "-o", out], str(tmp_path), synthetic_env(tmp_path, FISH_CPU_WORKERS="1"))
    assert res.returncode == 4, res.stderr  # overruns are suspect
    segs = _segments(out)

    def speeds(sid: str) -> list[float]:
        return [t["speed_needed"] for t in segs[sid]["takes"]]

    assert speeds("third") == pytest.approx([1.5, 1.3, 1.1], abs=0.002) and segs["third"]["kept_take"] == 2
    assert segs["third"]["fit"]["speed"] == pytest.approx(1.1, abs=0.002) and not segs["third"]["suspect"]
    assert "overrun" not in segs["third"]["fit"] and segs["third"]["takes"][2]["reasons"] == []
    assert speeds("second") == pytest.approx([1.5, 1.3], abs=0.002) and segs["second"]["kept_take"] == 1
    assert segs["second"]["fit"]["overrun"]["needed_speed"] == pytest.approx(1.3, abs=0.002)
    assert segs["second"]["suspect"] is True and segs["second"]["fit"]["speed"] == 1.25
    assert speeds("first") == pytest.approx([1.3, 1.6, 1.4], abs=0.002) and segs["first"]["kept_take"] == 0
    assert speeds("nochoice") == pytest.approx([1.5], abs=0.002) and segs["nochoice"]["fit"]["speed"] == 1.25
    assert speeds("fits") == pytest.approx([1.2], abs=0.002) and segs["fits"]["fit"]["speed"] == pytest.approx(1.2)
    for sid, rec in segs.items():
        fit = rec["fit"]
        audio, rate = sf.read(rec["path"])
        raw, raw_rate = sf.read(fit["raw"])
        assert fit["raw"] == rec["path"][:-4] + ".raw.wav" and raw_rate == rate, sid
        assert len(raw) / rate == pytest.approx(fit["raw_s"], abs=1e-3)
        assert len(audio) / rate == pytest.approx(fit["final_s"], abs=1e-3) == pytest.approx(rec["audio_seconds"])
        if "overrun" not in fit:
            assert fit["final_s"] == pytest.approx(1.38, abs=0.01)  # fitted to its slot
        else:
            assert fit["final_s"] == pytest.approx(fit["trimmed_s"] / 1.25, abs=0.01)  # at the cap, never cut


def _expected_bytes(tmp_path, text: str, seed: int | None = None) -> bytes:
    """What the synthetic engine's take of `text` becomes as a wav through the unfitted writer (before fitting
    existed): the engine's own audio for this speaker, encoded by fishmp.worker.files.write_wav's recipe."""
    from fishmp.engines import SpeakerPrompt, SynthesisParams
    from fishmp.worker.references import speaker_key

    engine = SyntheticEngine(Settings(), "cpu")
    tokens = engine.encode_reference(str(tmp_path / "a.wav"))
    prompt = SpeakerPrompt(speaker_key(tokens, "I am a."), tokens, "I am a.")
    audio = engine._audio(text, prompt, SynthesisParams(seed=seed))
    buf = io.BytesIO()
    sf.write(buf, np.clip(audio.samples, -1.0, 1.0), audio.sample_rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def test_jobs_without_slots_fit_false_and_legacy_configs_write_the_same_bytes(tmp_path, make_wav, fishmp_cli) -> None:
    job = _job(tmp_path, make_wav, [
        {"id": "plain", "text": LINE},
        {"id": "placed", "text": LINE, "start": 3.0},  # a start alone gives no slot
        {"id": "off", "text": LINE, "start": 1.0, "end": 1.5, "max_seconds": 0.5, "fit": False},
    ])
    out = str(tmp_path / "out")
    res = fishmp_cli(["generate", job, "-o", out], str(tmp_path), synthetic_env(tmp_path, FISH_CPU_WORKERS="1"))
    assert res.returncode in (0, 4), res.stderr  # "off" overruns its slot: suspect, as before fitting
    expected = _expected_bytes(tmp_path, LINE)
    for sid, rec in _segments(out).items():
        assert "fit" not in rec, sid
        with open(rec["path"], "rb") as f:
            assert f.read() == expected, sid
    assert not [n for n in os.listdir(out) if n.endswith(".raw.wav")]

    tokens = tmp_path / "a.npy"
    np.save(tokens, SyntheticEngine(Settings(), "cpu").encode_reference(str(tmp_path / "a.wav")))
    legacy = tmp_path / "legacy.json"
    legacy.write_text(json.dumps({"mode": "generate", "output_dir": "lout", "tasks": [
        {"segment_index": 0, "speaker_id": 1, "npy_file": "a.npy", "reference_text": "I am a.", "target_text": LINE,
         "output_file": "s0.wav", "max_seconds": 0.5}]}))
    res = fishmp_cli(["generate", str(legacy)], str(tmp_path), synthetic_env(tmp_path, FISH_CPU_WORKERS="1"))
    assert res.returncode == 0, res.stderr
    with open(tmp_path / "lout" / "s0.wav", "rb") as f:
        assert f.read() == expected
    assert not [n for n in os.listdir(tmp_path / "lout") if n.endswith(".raw.wav")]


@pytest.mark.timeout(400)
def test_a_line_of_the_real_fish_path_is_fitted(tmp_path, make_wav, fishmp_cli, tiny_checkpoint) -> None:
    """The tiny random checkpoint through the real fish-speech code path: its take (all 40 frames, no end token) is
    kept raw beside the wav, and the wav is fitted to the slot at 44.1 kHz."""
    job = _job(tmp_path, make_wav, [{"id": "a", "text": "Hello there.", "start": 0.0, "end": 1.6,
                                     "params": {"max_new_tokens": 40, "seed": 5}}], fit={"max_speed": 1.5})
    out = str(tmp_path / "out")
    env = {"FISH_ENGINE": "fish", "FISH_CHECKPOINT_DIR": tiny_checkpoint, "FISH_CPU_WORKERS": "1",
           "FISH_MULTIPROCESS_MODE": "true", "FISH_PRECISION": "float32", "FISH_CACHE_DIR": str(tmp_path / "cache"),
           "FISH_TAKE_CHECK": "false"}  # every tiny take runs to max_new_tokens: judged, it would be retried
    res = fishmp_cli(["generate", job, "-o", out], str(tmp_path), env, timeout=360)
    assert res.returncode == 0, res.stderr
    rec = _segments(out)["a"]
    raw, rate = sf.read(rec["fit"]["raw"])
    fitted, fitted_rate = sf.read(rec["path"])
    assert rate == fitted_rate == 44100 and len(raw) / rate == pytest.approx(39 * 2048 / 44100, abs=0.01)
    fit = rec["fit"]  # 39 frames = 1.811 s of noise-like audio, no silence to trim: stretched 1.132x
    assert fit["trimmed_s"] == pytest.approx(1.811, abs=0.01) and fit["speed"] == pytest.approx(1.811 / 1.6, abs=0.01)
    assert len(fitted) == round(1.6 * rate) and "overrun" not in fit
    assert fit["loudness_after"] == pytest.approx(-23.0, abs=0.5) and fit["true_peak_db"] <= -1.0
    assert "takes" not in rec  # FISH_TAKE_CHECK=false: no take choice, the one take fitted
