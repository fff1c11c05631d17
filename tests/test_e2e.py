"""End to end through `python -m fishmp` as a subprocess: the real Fish Speech engine on the tiny checkpoint with
2 CPU workers, for the new job format and both legacy configs; resume and the jsonl stream with the synthetic engine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf
from conftest import jsonl_events, synthetic_env

pytestmark = pytest.mark.timeout(600)


def fish_env(tmp_path, checkpoint: str, **extra: str) -> dict[str, str]:
    env = {"FISH_ENGINE": "fish", "FISH_CHECKPOINT_DIR": checkpoint, "FISH_CPU_WORKERS": "2",
           "FISH_MULTIPROCESS_MODE": "true", "FISH_PRECISION": "float32", "FISH_CACHE_DIR": str(tmp_path / "cache"),
           # The tiny random model never ends a take, so every take would fail the take check and be retried twice:
           # these tests are about the pipeline (tests/test_takes.py judges the tiny model's real takes).
           "FISH_TAKE_CHECK": "false"}
    env.update(extra)
    return env


def assert_wav(path: str) -> float:
    data, sr = sf.read(path)
    assert sr == 44100 and len(data) > 0 and np.isfinite(data).all() and np.abs(data).max() > 0
    return len(data) / sr


@pytest.mark.slow
def test_legacy_encode_then_generate_with_fish_engine(tmp_path, tiny_checkpoint, make_wav, fishmp_cli) -> None:
    refs = tmp_path / "refs"
    refs.mkdir()
    make_wav(str(refs / "a.wav"), 2.0, 16000, channels=2)
    make_wav(str(refs / "b.wav"), 1.5, 48000)
    enc = {"mode": "encode", "checkpoint_dir": tiny_checkpoint, "output_dir": str(tmp_path / "npy"),
           "speakers": [{"speaker_id": 3, "reference_audio": str(refs / "a.wav"), "reference_text": "Hello there.",
                         "output_npy": str(tmp_path / "npy" / "speaker_3.npy")},
                        {"speaker_id": 5, "reference_audio": str(refs / "b.wav"), "reference_text": "Hi."}]}
    (tmp_path / "encode.json").write_text(json.dumps(enc))
    out = fishmp_cli(["encode", "encode.json"], str(tmp_path), fish_env(tmp_path, tiny_checkpoint))
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout.strip().splitlines()[-1])
    assert [x["speaker_id"] for x in listed] == [3, 5]
    for item in listed:
        tokens = np.load(item["npy_file"])
        assert tokens.shape[0] == 10 and tokens.shape[1] > 10

    gen = {"mode": "generate", "checkpoint_dir": tiny_checkpoint, "output_dir": str(tmp_path / "wavs"),
           "max_new_tokens": 12,
           "tasks": [{"segment_index": i, "speaker_id": sid, "target_text": text, "npy_file": npy,
                      "reference_text": ref_text, "output_file": f"seg_{i}.wav"}
                     for i, (sid, npy, ref_text, text) in enumerate([
                         (3, listed[0]["npy_file"], "Hello there.", "Good morning."),
                         (5, listed[1]["npy_file"], "Hi.", "How are you today?"),
                         (3, listed[0]["npy_file"], "Hello there.", "Fine, thanks."),
                         (5, listed[1]["npy_file"], "Hi.", "See you."),
                     ])]}
    (tmp_path / "generate.json").write_text(json.dumps(gen))
    out = fishmp_cli(["generate", "generate.json", "--progress", "jsonl"], str(tmp_path),
                     fish_env(tmp_path, tiny_checkpoint))
    assert out.returncode == 0, out.stderr
    mapping = json.loads(out.stdout.strip().splitlines()[-1])  # the legacy contract: the LAST stdout line
    assert sorted(mapping) == ["0", "1", "2", "3"]
    for i, path in mapping.items():
        assert path == str(tmp_path / "wavs" / f"seg_{i}.wav")
        assert 0.05 < assert_wav(path) < 2.0  # 12 frames of 2048 samples at most
    events = jsonl_events(out.stdout)
    ready = [e for e in events if e["event"] == "worker_ready"]
    assert events[0]["workers"] == 2  # two worker processes planned; under load one may do all 4 before the other
    assert ready and len({e["pid"] for e in ready}) == len(ready) and events[0]["pid"] not in {e["pid"] for e in ready}
    assert {e["device"] for e in ready} == {"cpu"}


@pytest.mark.slow
def test_new_format_with_reference_audio_fish_engine(tmp_path, tiny_checkpoint, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"alice": ["One two three.", "Four five."], "bob": ["Six seven eight nine."]},
                        params={"max_new_tokens": 10, "seed": 7})
    out = fishmp_cli(["generate", job, "-o", "out"], str(tmp_path), fish_env(tmp_path, tiny_checkpoint))
    assert out.returncode == 0, out.stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {r["status"] for r in manifest["segments"].values()} == {"done"}
    for sid, rec in manifest["segments"].items():
        assert rec["path"] == str(tmp_path / "out" / f"{sid}.wav")
        assert abs(assert_wav(rec["path"]) - rec["audio_seconds"]) < 0.01
        assert rec["worker"] and rec["device"] == "cpu" and rec["attempts"] == 1
    assert "[Main] No usable GPU: using 2 worker(s) on the CPU" in out.stderr


def test_resume_redoes_only_missing_or_changed(tmp_path, synthetic_job, fishmp_cli) -> None:
    texts = {"a": [f"Line number {i} of a." for i in range(4)], "b": [f"Line {i} of b." for i in range(3)]}
    job = synthetic_job(texts)
    env = synthetic_env(tmp_path)
    first = fishmp_cli(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path), env)
    assert first.returncode == 0, first.stderr
    os.unlink(tmp_path / "out" / "a-001.wav")  # lost
    data = json.loads(open(job).read())
    data["segments"][5]["text"] = "A changed line of b."  # b-001 changed
    open(job, "w").write(json.dumps(data))
    second = fishmp_cli(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path), env)
    assert second.returncode == 0, second.stderr
    events = jsonl_events(second.stdout)
    redone = sorted(e["id"] for e in events if e["event"] == "segment_done" and not e.get("skipped"))
    assert redone == ["a-001", "b-001"]
    assert next(e for e in events if e["event"] == "plan")["skipped"] == 5
    third = fishmp_cli(["generate", job, "-o", "out", "--progress", "jsonl", "--no-resume"], str(tmp_path), env)
    redone = [e for e in jsonl_events(third.stdout) if e["event"] == "segment_done" and not e.get("skipped")]
    assert len(redone) == 7


def test_jsonl_stream_accounts_for_every_segment(tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": ["Hello.", "Bad one @@error@@", "World."], "b": ["Other voice."]})
    out = fishmp_cli(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path),
                     synthetic_env(tmp_path, FISH_MAX_ATTEMPTS="2"))
    assert out.returncode == 1  # one segment failed, the rest are written
    events = jsonl_events(out.stdout)
    assert all("time" in e and "event" in e for e in events)
    assert events[0]["event"] == "plan" and events[-1]["event"] == "finished"
    done = {e["id"] for e in events if e["event"] == "segment_done"}
    failed = {e["id"] for e in events if e["event"] == "segment_failed"}
    assert done == {"a-000", "a-002", "b-000"} and failed == {"a-001"}
    for e in events:
        if e["event"] in ("worker_ready", "worker_died"):
            assert e["pid"] and e["device"] == "cpu"
    assert events[-1]["done"] == 3 and events[-1]["failed"] == 1 and events[-1]["exit_code"] == 1
    assert "Traceback" not in out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["done"] == 3 and result["failed"] == 1


def test_invalid_job_exits_2_before_any_model_loads(tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": ["Hello."]})
    data = json.loads(open(job).read())
    data["segments"].append({"id": "x", "speaker": "nobody", "text": "   "})
    data["segments"].append({"id": "y", "speaker": "a", "text": "Hi", "output": "../escape.wav"})
    open(job, "w").write(json.dumps(data))
    out = fishmp_cli(["generate", job, "-o", "out"], str(tmp_path), synthetic_env(tmp_path))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "nobody" in out.stderr and "escape.wav" in out.stderr and '"x"' in out.stderr
    assert not (tmp_path / "out").exists()


def test_single_mode_runs_in_process(tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": ["One.", "Two."], "b": ["Three."]})
    out = fishmp_cli(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path),
                     synthetic_env(tmp_path, FISH_MULTIPROCESS_MODE="false"))
    assert out.returncode == 0, out.stderr
    events = jsonl_events(out.stdout)
    ready = [e for e in events if e["event"] == "worker_ready"]
    assert len(ready) == 1 and ready[0]["pid"] == events[0]["pid"]  # the worker is the main process itself
    assert "Single-process mode" in out.stderr


def test_library_pool_is_reused_across_jobs(tmp_path, make_wav, monkeypatch) -> None:
    import fishmp

    for k in [k for k in os.environ if k.startswith("FISH_")]:
        monkeypatch.delenv(k)
    make_wav(str(tmp_path / "v.wav"), 1.0, 16000)
    events: list[dict] = []
    job = {"speakers": {"v": {"reference_audio": str(tmp_path / "v.wav"), "reference_text": "hi"}},
           "segments": [{"id": str(i), "speaker": "v", "text": f"Sentence {i}."} for i in range(3)]}
    with fishmp.Pool(engine="synthetic", cpu_workers=2, multiprocess_mode="true", devices="cpu",
                     cache_dir=str(tmp_path / "c")) as pool:
        r1 = pool.generate(job, output_dir=str(tmp_path / "o1"), on_event=events.append)
        r2 = pool.generate(job, output_dir=str(tmp_path / "o2"), on_event=events.append)
    assert r1.ok and r2.ok and r1.exit_code == 0
    ready = [e for e in events if e["event"] == "worker_ready"]  # each job hears of the workers that serve it
    assert len({e["pid"] for e in ready}) == 2  # loaded once, used by both jobs
    assert len(os.listdir(tmp_path / "o2")) == 4  # 3 wavs + manifest


def test_reused_pool_sees_a_new_voice_behind_the_same_speaker_id(tmp_path, make_wav, tiny_checkpoint,
                                                                  monkeypatch) -> None:
    """Backends reuse speaker ids and reference paths per video: a long-lived pool must not keep the old voice."""
    import fishmp

    for k in [k for k in os.environ if k.startswith("FISH_")]:
        monkeypatch.delenv(k)
    ref = str(tmp_path / "speaker_3.wav")
    job = {"speakers": {"3": {"reference_audio": ref, "reference_text": "Hello."}},
           "segments": [{"id": "1", "speaker": "3", "text": "Same text.", "params": {"max_new_tokens": 6, "seed": 3}}]}
    with fishmp.Pool(engine="fish", checkpoint_dir=tiny_checkpoint, devices="cpu", multiprocess_mode="false",
                     precision="float32", cache_dir=str(tmp_path / "c")) as pool:
        make_wav(ref, 1.0, 16000)
        first = pool.generate(job, output_dir=str(tmp_path / "video1"))
        sf.write(ref, 0.3 * np.sin(np.arange(48000) / 48000 * 2 * np.pi * 330).astype(np.float32), 48000)
        second = pool.generate(job, output_dir=str(tmp_path / "video2"))
    assert first.ok and second.ok
    a, _ = sf.read(str(tmp_path / "video1" / "1.wav"))
    b, _ = sf.read(str(tmp_path / "video2" / "1.wav"))
    assert not (len(a) == len(b) and np.allclose(a, b))  # same seed and text: only the voice differs


@pytest.mark.slow
def test_main_process_never_imports_torch(tmp_path, tiny_checkpoint, make_wav) -> None:
    """Planning, scheduling and writing results need no torch: only workers import it (the design's promise)."""
    make_wav(str(tmp_path / "v.wav"), 1.0, 16000)
    code = f"""
import sys, fishmp
job = {{"speakers": {{"v": {{"reference_audio": {str(tmp_path / "v.wav")!r}, "reference_text": "hi"}}}},
       "segments": [{{"id": "1", "speaker": "v", "text": "Hello.", "params": {{"max_new_tokens": 4}}}}]}}
r = fishmp.generate(job, output_dir={str(tmp_path / "o")!r}, engine="fish", checkpoint_dir={tiny_checkpoint!r},
                    devices="cpu", multiprocess_mode="true", cache_dir={str(tmp_path / "c")!r}, precision="float32")
print(r.exit_code, "torch" in sys.modules, "fish_speech" in sys.modules)
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.split() == ["0", "False", "False"], out.stderr


def test_simulated_gpus_get_pinned_workers_per_the_plan(tmp_path, synthetic_job, fishmp_cli) -> None:
    """The guide's 2x RTX 4090 at 6.0 GB: 3 workers per GPU, each a process labelled with its GPU (synthetic engine)."""
    job = synthetic_job({f"s{i}": [f"Line {j} of speaker {i}." for j in range(4)] for i in range(6)})
    out = fishmp_cli(["generate", job, "-o", "out", "--progress", "jsonl", "--gpus", "RTX 4090:24,RTX 4090:24"],
                     str(tmp_path), synthetic_env(tmp_path, FISH_MODEL_MEMORY_GB="6.0"))
    assert out.returncode == 0, out.stderr
    assert "[Main] Using 6 parallel workers across 2 GPU(s)" in out.stderr
    assert "[Main] GPU 0: 3 workers" in out.stderr and "[Main] GPU 1: 3 workers" in out.stderr
    ready = [e for e in jsonl_events(out.stdout) if e["event"] == "worker_ready"]
    assert sorted(e["device"] for e in ready) == ["cuda:0"] * 3 + ["cuda:1"] * 3
    assert len({e["pid"] for e in ready}) == 6


def _start(job: str, tmp_path, env: dict[str, str]) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
    full.update(env)
    return subprocess.Popen([sys.executable, "-m", "fishmp", "generate", job, "-o", "out", "--progress", "jsonl"],
                            cwd=tmp_path, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _read_until(proc: subprocess.Popen, kind: str) -> None:
    for line in proc.stdout:
        if json.loads(line)["event"] == kind:
            return
    raise AssertionError(f"no {kind} event")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["false", "auto"])
@pytest.mark.parametrize("when", ["load", "generation"])
def test_sigterm_with_one_fish_worker_exits_143_cleanly(mode, when, tmp_path, tiny_checkpoint, synthetic_job) -> None:
    """Issue 11 item 3: one worker (what `auto` used to run in this process) + SIGTERM during model load or
    generation: exit 143 without "terminate called without an active exception" (SIGABRT, 134)."""
    job = synthetic_job({"a": [f"A rather long sentence number {i} to synthesize." for i in range(6)]},
                        params={"max_new_tokens": 400, "seed": 1})
    proc = _start(job, tmp_path, fish_env(tmp_path, tiny_checkpoint, FISH_CPU_WORKERS="1",
                                          FISH_MULTIPROCESS_MODE=mode, FISH_SHUTDOWN_GRACE_S="0.5"))
    _read_until(proc, "plan" if when == "load" else "worker_ready")
    time.sleep(0.3 if when == "load" else 1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "terminate called" not in err and "Traceback" not in err
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert "pending" in {r["status"] for r in manifest["segments"].values()}


def test_auto_with_one_worker_enforces_the_segment_timeout(tmp_path, synthetic_job, fishmp_cli) -> None:
    """Issue 11 item 5: `auto` runs even a lone worker as a child process, so a hung segment is killed and retried."""
    job = synthetic_job({"a": ["Hangs once @@hang-once@@.", "Fine."]})
    out = fishmp_cli(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path),
                     synthetic_env(tmp_path, FISH_CPU_WORKERS="1", FISH_MULTIPROCESS_MODE="auto",
                                   FISH_SEGMENT_TIMEOUT_S="1.5", FISH_SEGMENT_TIMEOUT_PER_CHAR_S="0",
                                   FISH_SEGMENT_TIMEOUT_PER_FRAME_S="0"), timeout=60)
    assert out.returncode == 0, out.stderr
    events = jsonl_events(out.stdout)
    assert events[0]["pid"] not in {e["pid"] for e in events if e["event"] == "worker_ready"}  # a child process
    died = [e for e in events if e["event"] == "worker_died"]
    assert len(died) == 1 and "deadline" in died[0]["reason"]


def test_single_process_mode_gives_up_on_a_hung_segment(tmp_path, synthetic_job, fishmp_cli) -> None:
    """`false` keeps the model in this process, where a hung segment cannot be killed: past its deadline the job
    stops with the segment failed (timeout), the manifest written and exit 1, instead of hanging forever."""
    job = synthetic_job({"a": ["Hangs @@hang@@.", "Never reached."]})
    out = fishmp_cli(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path),
                     synthetic_env(tmp_path, FISH_MULTIPROCESS_MODE="false", FISH_SEGMENT_TIMEOUT_S="1",
                                   FISH_SEGMENT_TIMEOUT_PER_CHAR_S="0", FISH_SEGMENT_TIMEOUT_PER_FRAME_S="0"), timeout=60)
    assert out.returncode == 1, out.stderr
    segs = json.loads((tmp_path / "out" / "manifest.json").read_text())["segments"]
    assert segs["a-000"]["error_kind"] == "timeout" and "FISH_MULTIPROCESS_MODE" in segs["a-000"]["error"]
    assert segs["a-001"]["status"] == "failed"
    assert "Traceback" not in out.stderr and "terminate called" not in out.stderr
