"""The take check (fishmp/worker/takes.py) and its retries (fishmp/worker/lanes.py): pure checks on constructed signals with
hand-computed numbers, then whole jobs through the CLI with the synthetic engine's bad-take markers, then real takes
of the tiny Fish Speech checkpoint through the real checks."""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest
import soundfile as sf
from conftest import jsonl_events, synthetic_env

from fishmp.config import ConfigError, Settings
from fishmp.worker.takes import (
    RateModel,
    TakeLimits,
    best_index,
    check_take,
    prior_seconds,
    retry_max_new_tokens,
    retry_seed,
    script_counts,
    take_record,
)

SR = 44100
LIMITS = TakeLimits()


def tone(seconds: float, amplitude: float = 0.3, freq: float = 220.0) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def judge(samples: np.ndarray, expected: float = 1.0, tokens: int = 20, max_new: int | None = 1024,
          max_seconds: float | None = None):
    return check_take(samples, SR, tokens, max_new, "text", expected, LIMITS, max_seconds, seed=None)


# ---- expected durations -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, counts, seconds", [
    ("Hello, world.", {"latin": 10}, 0.3 + 10 / 13 + 2 * 0.1),  # spaces are not counted; 2 pauses
    ("你好，世界。", {"han": 4}, 0.3 + 4 / 4.5 + 2 * 0.1),
    ("こんにちは", {"kana": 5}, 0.3 + 5 / 7.5),
    ("안녕하세요", {"hangul": 5}, 0.3 + 5 / 6.0),
    ("Привет", {"cyrillic": 6}, 0.3 + 6 / 12.0),
    ("2024", {"digit": 4}, 0.3 + 4 / 4.0),
    ("東京へ行く", {"han": 3, "kana": 2}, 0.3 + 3 / 4.5 + 2 / 7.5),  # mixed scripts add up
    ("@@silent:2@@ Hi", {"latin": 2}, 0.3 + 2 / 13),  # the synthetic engine's markers are not spoken
])
def test_prior_counts_characters_per_script(text, counts, seconds) -> None:
    assert {k: v for k, v in script_counts(text.replace("@@silent:2@@", "")).items()} == counts
    assert prior_seconds(text) == pytest.approx(seconds, abs=1e-9)


def test_speaker_rate_is_learned_after_enough_passed_takes() -> None:
    rate = RateModel(learn_after=3)
    text = "Hello, world."  # prior 1.26923 s
    prior = prior_seconds(text)
    for _ in range(2):
        rate.accept(text, 2 * prior)
        assert rate.expected_seconds(text) == pytest.approx(prior)  # not enough takes yet: the prior
    rate.accept(text, 2 * prior)
    assert rate.expected_seconds(text) == pytest.approx(2 * prior)  # this speaker speaks at half the prior's rate
    for _ in range(10):
        rate.accept(text, 10 * prior)
    assert rate.factor() == 3.0  # clamped: one wild speaker cannot make every take pass


# ---- the checks on constructed signals ----------------------------------------------------------------------------
def test_a_clean_tone_passes_with_its_numbers() -> None:
    v = judge(tone(1.0))
    assert v.passed and v.reasons == ()
    n = v.numbers
    assert n["duration_s"] == 1.0 and n["expected_s"] == 1.0
    assert n["rms"] == pytest.approx(0.3 / math.sqrt(2), abs=1e-4)  # 0.21213
    assert n["active_ratio"] == 1.0 and n["clipped_ratio"] == 0.0 and n["nonfinite"] == 0
    assert n["tokens"] == 20 and n["max_new_tokens"] == 1024


def test_silence_and_low_activity() -> None:
    silent = judge(np.zeros(SR, np.float32))
    assert silent.reasons == ("silent",) and silent.numbers["rms"] == 0.0
    burst = np.zeros(SR, np.float32)
    burst[: SR // 10] = tone(0.1)  # 5 of 50 frames of 20 ms are active
    v = judge(burst)
    assert v.reasons == ("low_activity",)
    assert v.numbers["active_ratio"] == 0.1
    assert v.numbers["rms"] == pytest.approx(math.sqrt(0.1) * 0.3 / math.sqrt(2), abs=1e-4)  # 0.0671: not "silent"


def test_clipping_counts_samples_at_full_scale() -> None:
    x = tone(1.0)
    x[::100] = 1.0  # 441 of 44100 samples: 1 %
    v = judge(x)
    assert v.reasons == ("clipped",) and v.numbers["clipped_ratio"] == 0.01
    y = tone(1.0)
    y[::1000] = 1.0  # 0.1 %: under the 0.5 % default
    assert judge(y).passed


def test_nan_samples_fail_and_are_counted() -> None:
    x = tone(1.0)
    x[::100] = np.nan
    v = judge(x)
    assert "nonfinite" in v.reasons and v.numbers["nonfinite"] == 441
    assert math.isfinite(v.numbers["rms"])
    assert judge(np.zeros(0, np.float32)).reasons == ("empty",)


def test_max_new_tokens_and_duration_bounds() -> None:
    # fish-speech drops the last frame, so a take that ran out reports max_new_tokens - 1 frames
    assert judge(tone(1.0), tokens=1023, max_new=1024).reasons == ("max_tokens",)
    assert judge(tone(1.0), tokens=1022, max_new=1024).passed
    assert judge(tone(1.0), tokens=5000, max_new=None).passed  # no limit known: not checked
    assert judge(tone(1.0), tokens=3100, max_new=1024).passed  # a long text's chunks: each had its own limit
    # too long: above expected x 2.5 + 1.0 s slack
    assert judge(tone(3.6), expected=1.0).reasons == ("too_long",)
    assert judge(tone(3.4), expected=1.0).passed
    # too short: below (expected - 1.0 s slack) x 0.35: (5 - 1) x 0.35 = 1.4 s
    assert judge(tone(1.3), expected=5.0).reasons == ("too_short",)
    assert judge(tone(1.5), expected=5.0).passed
    assert judge(tone(0.05), expected=0.5).passed  # a short line is never "too short" by ratio alone


def test_over_the_slot() -> None:
    v = judge(tone(2.5), expected=2.0, max_seconds=2.0)
    assert v.reasons == ("over_slot",) and v.numbers["over_slot_s"] == 0.5 and v.numbers["max_seconds"] == 2.0
    assert judge(tone(1.5), expected=2.0, max_seconds=2.0).passed


def test_the_best_take_when_none_passes() -> None:
    nan = tone(1.0)
    nan[0] = np.nan
    takes = [judge(nan), judge(tone(3.6), expected=1.0), judge(tone(4.0), expected=1.0)]
    assert best_index(takes) == 1  # never the NaN take when another exists; then the closest to expected
    slot = [judge(tone(4.0), max_seconds=2.0), judge(tone(2.2), max_seconds=2.0), judge(tone(3.0), max_seconds=2.0)]
    assert best_index(slot) == 1  # over the slot, all of them: the closest to the slot
    assert best_index([judge(tone(1.0), tokens=1023), judge(tone(1.0))]) == 1  # a take that passed wins
    record = take_record(slot, 1, [None, 1, 2])
    assert record["suspect"] and record["seed"] == 1 and record["tried"] == 3 and record["over_slot_s"] == 0.2


def test_retry_seeds_are_deterministic() -> None:
    assert [retry_seed(None, a) for a in range(3)] == [None, 1, 2]  # unseeded first take, as before the check
    assert [retry_seed(42, a) for a in range(3)] == [42, 43, 44]


def test_a_runaway_retry_gets_a_limit_from_its_text() -> None:
    # 1023 frames in 47.5 s (21.54 frames/s); expected 1.0 s: too long past 3.5 s = 75.4 frames -> 76 + 2
    v = judge(tone(47.5), expected=1.0, tokens=1023, max_new=1024)
    assert v.reasons == ("max_tokens", "too_long")
    assert retry_max_new_tokens(v, LIMITS) == math.ceil(3.5 * 1023 / 47.5) + 2 == 78
    assert retry_max_new_tokens(judge(np.zeros(SR, np.float32)), LIMITS) is None  # silence: keep the limit


def test_settings_feed_the_limits() -> None:
    limits = TakeLimits.from_settings(Settings(take_retries=5, take_max_ratio=3.0))
    assert (limits.retries, limits.max_ratio, limits.min_ratio) == (5, 3.0, 0.35)
    with pytest.raises(ConfigError, match="FISH_TAKE_RETRIES"):
        Settings.from_env({"FISH_TAKE_RETRIES": "-1"})
    with pytest.raises(ConfigError, match="FISH_TAKE_MAX_RATIO"):
        Settings.from_env({"FISH_TAKE_MAX_RATIO": "0.5"})


# ---- whole jobs through the CLI, synthetic engine ---------------------------------------------------------------
LINE = "Hello there, my friend."


def _job(tmp_path, make_wav, segments: list[dict], **top) -> str:
    make_wav(str(tmp_path / "a.wav"), 1.0, 16000)
    job = {"speakers": {"a": {"reference_audio": "a.wav", "reference_text": "I am a."}},
           "segments": [{"speaker": "a", **s} for s in segments], **top}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return str(path)


def _manifest(out) -> dict:
    with open(os.path.join(out, "manifest.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("batch", ["1", "4"])
def test_bad_takes_are_retried_kept_and_marked_suspect(tmp_path, make_wav, fishmp_cli, batch) -> None:
    job = _job(tmp_path, make_wav, [
        {"id": "ok", "text": LINE},
        {"id": "silent", "text": f"@@silent:1@@ {LINE}"},  # bad at attempt 0
        {"id": "runaway", "text": f"@@runaway:2@@ {LINE}", "params": {"max_new_tokens": 200}},  # bad at 0 and 1
        {"id": "nan", "text": f"@@nan:1@@ {LINE}", "params": {"seed": 0}},  # seeded: seeds 0 (bad), 1
        {"id": "clipped", "text": f"@@clipped@@ {LINE}"},  # never recovers
    ])
    out = str(tmp_path / "out")
    res = fishmp_cli(["generate", job, "-o", out, "--progress", "jsonl"], str(tmp_path),
                     synthetic_env(tmp_path, FISH_CPU_WORKERS="1", FISH_BATCH_SIZE=batch))
    assert res.returncode == 4, res.stderr
    assert "1 of 5 segments are suspect" in res.stderr
    result = json.loads(res.stdout.splitlines()[-1])
    assert (result["done"], result["failed"], result["suspect"], result["exit_code"]) == (5, 0, 1, 4)
    segs = _manifest(out)["segments"]
    assert _manifest(out)["counts"] == {"done": 5, "failed": 0, "pending": 0, "suspect": 1}

    def takes(sid: str) -> list[list[str]]:
        return [t["reasons"] for t in segs[sid]["takes"]]

    assert takes("ok") == [[]] and segs["ok"]["suspect"] is False and "seed" not in segs["ok"]
    assert takes("silent") == [["silent"], []] and segs["silent"]["seed"] == 1 and segs["silent"]["kept_take"] == 1
    runaway = segs["runaway"]["takes"]
    assert takes("runaway")[0] == ["max_tokens", "too_long"] and "max_tokens" in takes("runaway")[1]
    assert takes("runaway")[2] == [] and segs["runaway"]["seed"] == 2
    assert runaway[0]["tokens"] == 199 and runaway[0]["duration_s"] > 9
    # the retries stop where a take would be too long anyway: (expected x 2.5 + 1 s) x 21.53 frames/s + 2
    cap = math.ceil((runaway[0]["expected_s"] * 2.5 + 1.0) * 199 / runaway[0]["duration_s"]) + 2
    assert runaway[1]["max_new_tokens"] == cap < 200 and runaway[1]["tokens"] == cap - 1
    assert takes("nan") == [["nonfinite"], []] and [t["seed"] for t in segs["nan"]["takes"]] == [0, 1]
    assert takes("clipped") == [["clipped"]] * 3 and segs["clipped"]["suspect"] is True
    assert [t["seed"] for t in segs["clipped"]["takes"]] == [None, 1, 2]
    clipped = segs["clipped"]
    assert clipped.get("seed") == clipped["takes"][clipped["kept_take"]]["seed"]  # absent: the unseeded take
    for rec in segs.values():
        assert rec["status"] == "done" and rec["attempts"] == 1  # a retry is the same task, not a requeue
        audio, rate = sf.read(rec["path"])
        assert len(audio) / rate == pytest.approx(rec["audio_seconds"], abs=1e-3)
        kept = rec["takes"][rec["kept_take"]]
        assert kept["duration_s"] == pytest.approx(rec["audio_seconds"], abs=1e-3)  # the kept take was written
    events = jsonl_events(res.stdout)
    assert not [e for e in events if e["event"] in ("segment_requeued", "segment_failed", "worker_died")]
    done = {e["id"]: e for e in events if e["event"] == "segment_done"}
    assert done["clipped"]["suspect"] is True and len(done["clipped"]["takes"]) == 3
    assert done["silent"]["seed"] == 1 and done["silent"]["suspect"] is False
    assert events[-1]["event"] == "finished" and events[-1]["suspect"] == 1

    # Resume: the suspect segment is done (never lose work) and nothing is redone.
    mtimes = {sid: os.stat(rec["path"]).st_mtime_ns for sid, rec in segs.items()}
    again = fishmp_cli(["generate", job, "-o", out, "--progress", "jsonl"], str(tmp_path),
                       synthetic_env(tmp_path, FISH_CPU_WORKERS="1", FISH_BATCH_SIZE=batch))
    assert again.returncode == 4, again.stderr  # the output directory still holds a suspect segment
    plan = jsonl_events(again.stdout)[0]
    assert plan["event"] == "plan" and plan["skipped"] == 5
    assert {sid: os.stat(rec["path"]).st_mtime_ns for sid, rec in segs.items()} == mtimes
    assert _manifest(out)["segments"]["clipped"]["suspect"] is True


def test_max_seconds_keeps_the_closest_take_with_its_overrun(tmp_path, make_wav, fishmp_cli) -> None:
    # 23 characters at the synthetic engine's 0.06 s: 1.38 s; attempt 0 runs away (9.2 s); nothing fits 0.5 s
    job = _job(tmp_path, make_wav, [
        {"id": "slot", "text": f"@@runaway:1@@ {LINE}", "max_seconds": 0.5, "params": {"max_new_tokens": 200}},
        {"id": "fits", "text": LINE, "max_seconds": 2.0},
    ], fit=False)  # a slot is fitted by default (tests/test_fit_run.py); unfitted, it only judges takes
    out = str(tmp_path / "out")
    res = fishmp_cli(["generate", job, "-o", out], str(tmp_path), synthetic_env(tmp_path, FISH_CPU_WORKERS="1"))
    assert res.returncode == 4, res.stderr
    segs = _manifest(out)["segments"]
    slot = segs["slot"]
    assert [t["reasons"] for t in slot["takes"]] == [["max_tokens", "too_long", "over_slot"], ["over_slot"],
                                                     ["over_slot"]]
    assert slot["takes"][1]["max_new_tokens"] < 200  # the runaway's retry was capped (it did not need it)
    assert slot["kept_take"] == 1 and slot["seed"] == 1 and slot["suspect"] is True
    assert slot["over_slot_s"] == pytest.approx(1.38 - 0.5, abs=1e-3)
    assert segs["fits"]["suspect"] is False and "over_slot_s" not in segs["fits"]


def test_no_retries_and_the_check_switched_off(tmp_path, make_wav, fishmp_cli) -> None:
    job = _job(tmp_path, make_wav, [{"id": "s", "text": f"@@silent:1@@ {LINE}"}])
    res = fishmp_cli(["generate", job, "-o", str(tmp_path / "o1")], str(tmp_path),
                     synthetic_env(tmp_path, FISH_CPU_WORKERS="1", FISH_TAKE_RETRIES="0"))
    assert res.returncode == 4, res.stderr
    rec = _manifest(tmp_path / "o1")["segments"]["s"]
    assert len(rec["takes"]) == 1 and rec["suspect"] is True
    res = fishmp_cli(["generate", job, "-o", str(tmp_path / "o2")], str(tmp_path),
                     synthetic_env(tmp_path, FISH_CPU_WORKERS="1", FISH_TAKE_CHECK="false"))
    assert res.returncode == 0, res.stderr
    rec = _manifest(tmp_path / "o2")["segments"]["s"]
    assert "takes" not in rec and "suspect" not in rec  # written unjudged, as before the check existed


@pytest.mark.parametrize("value, allowed", [(-1, "> 0"), ("long", "> 0"), (7200, "<= 3600")])
def test_max_seconds_is_validated_in_the_job_file(tmp_path, make_wav, fishmp_cli, value, allowed) -> None:
    job = _job(tmp_path, make_wav, [{"id": "x", "text": LINE, "max_seconds": value}])
    res = fishmp_cli(["generate", job, "-o", str(tmp_path / "o")], str(tmp_path), synthetic_env(tmp_path))
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert 'segment "x": max_seconds must be a number of seconds' in res.stderr and allowed in res.stderr


def test_the_schema_knows_max_seconds() -> None:
    from fishmp.job.schema import job_schema

    prop = job_schema()["properties"]["segments"]["items"]["properties"]["max_seconds"]
    assert prop["exclusiveMinimum"] == 0 and prop["maximum"] == 3600


# ---- real takes: the tiny Fish Speech checkpoint ------------------------------------------------------------------
@pytest.mark.timeout(400)
def test_fish_takes_that_hit_max_new_tokens_are_retried_and_marked_suspect(tmp_path, make_wav, fishmp_cli,
                                                                          tiny_checkpoint) -> None:
    """The tiny random model never says its end token: every take runs to max_new_tokens and is judged so."""
    job = _job(tmp_path, make_wav, [{"id": "a", "text": "Hello there.", "params": {"max_new_tokens": 8, "seed": 5}},
                                    {"id": "b", "text": "Yes.", "params": {"max_new_tokens": 8}}])
    out = str(tmp_path / "out")
    env = {"FISH_ENGINE": "fish", "FISH_CHECKPOINT_DIR": tiny_checkpoint, "FISH_CPU_WORKERS": "1",
           "FISH_MULTIPROCESS_MODE": "true", "FISH_PRECISION": "float32", "FISH_CACHE_DIR": str(tmp_path / "cache")}
    res = fishmp_cli(["generate", job, "-o", out], str(tmp_path), env, timeout=360)
    assert res.returncode == 4, res.stderr
    segs = _manifest(out)["segments"]
    a, b = segs["a"], segs["b"]
    assert [t["seed"] for t in a["takes"]] == [5, 6, 7] and [t["seed"] for t in b["takes"]] == [None, 1, 2]
    for rec in (a, b):
        assert rec["suspect"] is True and rec["status"] == "done"
        for t in rec["takes"]:
            assert "max_tokens" in t["reasons"] and t["tokens"] == 7  # fish-speech drops the last of 8 frames
            assert t["rms"] > 0 and 0 <= t["active_ratio"] <= 1 and t["expected_s"] > 0
        audio, rate = sf.read(rec["path"])
        assert len(audio) / rate == pytest.approx(rec["takes"][rec["kept_take"]]["duration_s"], abs=1e-3)


def test_legacy_configs_keep_exit_0_with_suspect_segments(tmp_path, fishmp_cli) -> None:
    """The dubbing backends raise on any non-zero exit: a suspect take is written audio, so their contract holds."""
    npy = tmp_path / "codes.npy"
    np.save(npy, np.zeros((10, 20), np.int64))
    tasks = [{"segment_index": i, "speaker_id": 1, "target_text": text, "npy_file": str(npy), "reference_text": "Hi.",
              "output_file": str(tmp_path / "out" / f"segment_{i}.wav")}
             for i, text in enumerate([f"@@clipped@@ {LINE}", LINE])]
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"mode": "generate", "output_dir": str(tmp_path / "out"), "tasks": tasks}))
    res = fishmp_cli(["generate", str(config)], str(tmp_path), synthetic_env(tmp_path, FISH_CPU_WORKERS="1"))
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout.splitlines()[-1]) == {"0": tasks[0]["output_file"], "1": tasks[1]["output_file"]}
    segs = _manifest(tmp_path / "out")["segments"]
    assert sorted(r["suspect"] for r in segs.values()) == [False, True]


def test_each_retake_gets_the_segments_full_deadline(tmp_path, make_wav, fishmp_cli) -> None:
    # Three takes of ~1.1 s each against a 2.5 s deadline: each take alone is well inside it, all three are not. A
    # retake restarts the deadline (Started again), so the healthy-but-retried segment is not killed as a hang.
    job = _job(tmp_path, make_wav, [{"id": "slow", "text": f"@@silent:2@@ {LINE}"}])
    out = str(tmp_path / "out")
    res = fishmp_cli(["generate", job, "-o", out, "--progress", "jsonl"], str(tmp_path),
                     synthetic_env(tmp_path, FISH_CPU_WORKERS="1", FISH_SYNTHETIC_SECONDS_PER_CHAR="0.03",
                                   FISH_SEGMENT_TIMEOUT_S="2.5", FISH_SEGMENT_TIMEOUT_PER_CHAR_S="0",
                                   FISH_SEGMENT_TIMEOUT_PER_FRAME_S="0"))
    assert res.returncode == 0, res.stderr
    rec = _manifest(out)["segments"]["slow"]
    assert [t["reasons"] for t in rec["takes"]] == [["silent"], ["silent"], []] and rec["attempts"] == 1
    assert rec["synthesis_seconds"] > 2.5  # the three takes together did outlast one deadline
    assert not [e for e in jsonl_events(res.stdout) if e["event"] in ("worker_died", "segment_requeued")]


@pytest.mark.parametrize("batch, check", [("1", "true"), ("4", "true"), ("1", "false")])
def test_a_segment_whose_every_take_is_nan_fails_and_writes_nothing(tmp_path, make_wav, fishmp_cli, batch,
                                                                     check) -> None:
    """Issue 25 item 10: all 21 takes NaN wrote a full-scale buzz (-32768 every 100 samples) as the kept take."""
    job = _job(tmp_path, make_wav, [{"id": "nan", "text": f"@@nan@@ {LINE}"}, {"id": "after", "text": LINE}])
    out = str(tmp_path / "out")
    res = fishmp_cli(["generate", job, "-o", out, "--progress", "jsonl"], str(tmp_path),
                     synthetic_env(tmp_path, FISH_CPU_WORKERS="1", FISH_BATCH_SIZE=batch, FISH_TAKE_RETRIES="20",
                                   FISH_TAKE_CHECK=check))
    assert res.returncode == 1, res.stderr
    segs = _manifest(out)["segments"]
    assert segs["nan"]["status"] == "failed" and segs["nan"]["error_kind"] == "nonfinite"
    assert ("all 21 takes (FISH_TAKE_RETRIES=20)" if check == "true" else "FISH_TAKE_CHECK=false") in segs["nan"]["error"]
    assert not os.path.exists(os.path.join(out, "nan.wav"))
    assert segs["after"]["status"] == "done"  # the worker was kept: no reload for a bad take
    assert not [e for e in jsonl_events(res.stdout) if e["event"] in ("worker_died", "segment_requeued")]
