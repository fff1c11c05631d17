"""Fault injection: real worker processes, real signals, real files. Each test asserts the exit code, the manifest
states, readable wavs, no temp files left, and that no worker process outlives the run.

The synthetic engine's text markers inject the faults (see fishmp/engines/synthetic.py): @@kill@@, @@segv@@,
@@exit@@, @@hang@@, @@oom@@, @@error@@, @@slow=S@@; with -once they fire only on the first attempt.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import soundfile as sf
from conftest import jsonl_events, synthetic_env

from fishmp.worker.files import TMP_PREFIX

pytestmark = pytest.mark.timeout(120)


def processes_with(marker: str) -> list[int]:
    """PIDs of live processes whose environment mentions `marker` (our workers inherit FISH_CACHE_DIR=tmp_path)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in env and state != "Z":
            pids.append(int(pid))
    return pids


def assert_no_workers_left(tmp_path, within_s: float = 5.0) -> None:
    deadline = time.monotonic() + within_s
    while processes_with(str(tmp_path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert processes_with(str(tmp_path)) == []


def check_outputs(out_dir) -> dict[str, dict]:
    """Manifest consistent with the files: done -> readable wav; failed -> a reason; no temp files anywhere."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    for sid, rec in manifest["segments"].items():
        assert rec["status"] in ("done", "failed", "pending"), sid
        if rec["status"] == "done":
            info = sf.info(rec["path"])
            assert info.frames > 0 and info.samplerate == 44100
        elif rec["status"] == "failed":
            assert rec["error"] and rec["error_kind"]
    leftovers = [f for _, _, files in os.walk(out_dir) for f in files if f.startswith(TMP_PREFIX)]
    assert leftovers == []
    return manifest["segments"]


def run(fishmp_cli, job, tmp_path, **env) -> tuple[subprocess.CompletedProcess, list[dict], dict[str, dict]]:
    out = fishmp_cli(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path), synthetic_env(tmp_path, **env))
    segments = check_outputs(tmp_path / "out")
    assert_no_workers_left(tmp_path)
    return out, jsonl_events(out.stdout), segments


@pytest.mark.parametrize("marker", ["kill", "segv", "exit"])
def test_worker_death_requeues_and_replaces(marker, tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": ["First line.", f"Dies once @@{marker}-once@@ here."] + [f"Line {i} @@slow=0.3@@"
                                                                                      for i in range(8)],
                         "b": ["Other speaker."]})
    out, events, segs = run(fishmp_cli, job, tmp_path)
    assert out.returncode == 0, out.stderr
    assert {r["status"] for r in segs.values()} == {"done"}
    assert segs["a-001"]["attempts"] == 2
    died = [e for e in events if e["event"] == "worker_died"]
    assert len(died) == 1 and died[0]["pid"] and died[0]["device"] == "cpu"
    assert sum(1 for e in events if e["event"] == "worker_ready") == 3  # two at start, one replacement
    requeued = [e for e in events if e["event"] == "segment_requeued" and e["id"] == "a-001"]
    assert requeued and requeued[0]["attempts"] == 1


def test_poison_segment_fails_after_max_attempts(tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": ["Fine.", "Always kills @@kill@@.", "Also fine."], "b": ["Fine too."]})
    out, events, segs = run(fishmp_cli, job, tmp_path, FISH_MAX_RESTARTS="5")
    assert out.returncode == 1
    assert segs["a-001"]["status"] == "failed" and segs["a-001"]["error_kind"] == "poison"
    assert "3 times" in segs["a-001"]["error"]
    assert [s for s, r in segs.items() if r["status"] == "done"] == ["a-000", "a-002", "b-000"]


@pytest.mark.parametrize("workers", ["1", "2"])
def test_poison_segments_do_not_use_up_the_restart_budget(workers, tmp_path, synthetic_job, fishmp_cli) -> None:
    """Issue 11 item 2: deaths caused by segments that end as poison must not starve the innocent ones."""
    job = synthetic_job({"a": ["First poison @@kill@@.", "Second poison @@kill@@.", "Third poison here @@kill@@."],
                         "b": ["Hi.", "Fine line."]})
    out, events, segs = run(fishmp_cli, job, tmp_path, FISH_CPU_WORKERS=workers)
    assert out.returncode == 1, out.stderr
    assert {s for s, r in segs.items() if r["status"] == "done"} == {"b-000", "b-001"}
    assert {r["error_kind"] for s, r in segs.items() if s.startswith("a")} == {"poison"}
    assert "no_workers" not in out.stdout


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_killer_in_a_batch_dies_alone_and_spares_its_batchmates(workers, tmp_path, synthetic_job,
                                                                  fishmp_cli) -> None:
    """Lanes: a death with several segments running blames none; they come back solo, so only the killer is poison
    and its batchmates keep attempts == 1 (a death while running alone is the only one that counts)."""
    job = synthetic_job({"a": [f"Line number {i} of a @@slow=0.2@@." for i in range(7)] + ["Killer @@kill@@ here."]})
    out, events, segs = run(fishmp_cli, job, tmp_path, FISH_CPU_WORKERS=workers, FISH_BATCH_SIZE="4")
    assert out.returncode == 1, out.stderr
    assert segs["a-007"]["error_kind"] == "poison" and "3 times" in segs["a-007"]["error"]
    innocent = {s: r for s, r in segs.items() if s != "a-007"}
    assert {r["status"] for r in innocent.values()} == {"done"}
    assert {r["attempts"] for r in innocent.values()} == {1}
    assert max(e["batch_size"] for e in events if e["event"] == "worker_ready") == 4


def test_restart_budget_drops_the_slot_and_the_job_goes_on(tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": [f"Line {i}." for i in range(6)] + ["Boom @@kill-once@@."]})
    out, events, segs = run(fishmp_cli, job, tmp_path, FISH_MAX_RESTARTS="0")
    assert out.returncode == 0, out.stderr
    assert sum(1 for e in events if e["event"] == "worker_ready") == 2  # no replacement
    assert "used its 0 restarts" in out.stderr
    assert {r["status"] for r in segs.values()} == {"done"}


def test_oom_once_is_retried_in_the_same_worker(tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": ["Needs memory @@oom-once@@.", "Next."]})
    out, events, segs = run(fishmp_cli, job, tmp_path)
    assert out.returncode == 0, out.stderr
    assert not [e for e in events if e["event"] == "worker_died"]
    assert segs["a-000"]["attempts"] == 1


def test_oom_twice_fails_segment_and_recycles_worker(tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": ["Too big @@oom@@.", "Small one.", "Another."]})
    out, events, segs = run(fishmp_cli, job, tmp_path)
    assert out.returncode == 1
    assert segs["a-000"]["error_kind"] == "out_of_memory"
    assert "FISH_MODEL_MEMORY_GB" in segs["a-000"]["error"] and "max_new_tokens" in segs["a-000"]["error"]
    assert segs["a-001"]["status"] == "done" and segs["a-002"]["status"] == "done"
    assert [e["reason"] for e in events if e["event"] == "worker_died"] == ["recycled after a failure"]


@pytest.mark.parametrize("fault,expect", [("raise", "EngineError"), ("oom", "EngineOutOfMemoryError"),
                                          ("die", "SIGKILL")])
def test_load_failure_is_reported_with_its_cause(fault, expect, tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": ["One.", "Two."]})
    out, events, segs = run(fishmp_cli, job, tmp_path, FISH_SYNTHETIC_LOAD_FAULT=fault, FISH_MAX_RESTARTS="1")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert {r["error_kind"] for r in segs.values()} == {"no_workers"}
    assert expect in out.stderr


def test_hung_segment_is_killed_and_requeued(tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": ["Hangs once @@hang-once@@.", "Fine."], "b": ["Fine as well."]})
    t0 = time.monotonic()
    out, events, segs = run(fishmp_cli, job, tmp_path, FISH_SEGMENT_TIMEOUT_S="1.5",
                            FISH_SEGMENT_TIMEOUT_PER_CHAR_S="0", FISH_SEGMENT_TIMEOUT_PER_FRAME_S="0")
    assert out.returncode == 0, out.stderr
    assert time.monotonic() - t0 < 30
    died = [e for e in events if e["event"] == "worker_died"]
    assert len(died) == 1 and "deadline" in died[0]["reason"] and "FISH_SEGMENT_TIMEOUT_S" in died[0]["reason"]
    assert segs["a-000"]["attempts"] == 2


def test_the_segment_deadline_scales_with_max_new_tokens(tmp_path, synthetic_job, fishmp_cli) -> None:
    """Issue 25: a segment allowed many frames gets time for them (FISH_SEGMENT_TIMEOUT_PER_FRAME_S x max_new_tokens),
    so a healthy long take is not killed as a hang; one allowed few frames is still caught at its (short) deadline."""
    job = synthetic_job({"a": ["Long take @@slow=2.5-once@@.", "Short take @@slow=2.5-once@@."]})
    data = json.loads(open(job).read())
    data["segments"][0]["params"] = {"max_new_tokens": 1000}  # 1 + 0.006 x 1000 = 7 s
    data["segments"][1]["params"] = {"max_new_tokens": 20}  # 1 + 0.006 x 20 = 1.12 s
    open(job, "w").write(json.dumps(data))
    out, events, segs = run(fishmp_cli, job, tmp_path, FISH_SEGMENT_TIMEOUT_S="1", FISH_SEGMENT_TIMEOUT_PER_CHAR_S="0",
                            FISH_SEGMENT_TIMEOUT_PER_FRAME_S="0.006")
    assert out.returncode == 0, out.stderr
    died = [e for e in events if e["event"] == "worker_died"]
    assert len(died) == 1 and "segment a-001 ran past its 1s deadline" in died[0]["reason"], died
    assert "FISH_SEGMENT_TIMEOUT_PER_FRAME_S x max_new_tokens" in died[0]["reason"]
    assert segs["a-000"]["attempts"] == 1 and segs["a-001"]["attempts"] == 2


def test_the_default_deadline_formula(tmp_path, synthetic_job) -> None:
    from fishmp.config import Settings
    from fishmp.job import load_job
    from fishmp.running.jobrun import JobRun

    job = synthetic_job({"a": ["x" * 20, "y" * 20]})
    data = json.loads(open(job).read())
    data["segments"][1]["params"] = {"max_new_tokens": 2048}
    open(job, "w").write(json.dumps(data))
    run = JobRun(load_job(job, str(tmp_path / "out")), "synthetic", Settings())
    assert run.timeout_for("a-000") == pytest.approx(120 + 1.0 * 20 + 0.2 * 1024)  # 344.8 s
    assert run.timeout_for("a-001") == pytest.approx(120 + 1.0 * 20 + 0.2 * 2048)


def start(job, tmp_path, **env) -> subprocess.Popen:
    full = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
    full.update(synthetic_env(tmp_path, **env))
    return subprocess.Popen([sys.executable, "-m", "fishmp", "generate", job, "-o", "out", "--progress", "jsonl"],
                            cwd=tmp_path, env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_event(proc: subprocess.Popen, kind: str, n: int = 1) -> list[dict]:
    seen = []
    for line in proc.stdout:
        ev = json.loads(line)
        seen.append(ev)
        if sum(1 for e in seen if e["event"] == kind) >= n:
            return seen
    raise AssertionError(f"stream ended before {n} {kind} events")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_stops_gracefully_and_rerun_resumes(sig, code, tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": [f"Sentence number {i} @@slow=0.4@@" for i in range(12)],
                         "b": [f"Other sentence {i} @@slow=0.4@@" for i in range(12)]})
    proc = start(job, tmp_path)
    wait_for_event(proc, "segment_done", 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    segs = check_outputs(tmp_path / "out")
    states = [r["status"] for r in segs.values()]
    assert states.count("done") >= 2 and states.count("pending") > 0 and "failed" not in states
    assert_no_workers_left(tmp_path)
    again = fishmp_cli(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path), synthetic_env(tmp_path))
    assert again.returncode == 0
    plan = jsonl_events(again.stdout)[0]
    assert plan["skipped"] == states.count("done")
    assert {r["status"] for r in check_outputs(tmp_path / "out").values()} == {"done"}


def test_second_ctrl_c_is_immediate(tmp_path, synthetic_job) -> None:
    job = synthetic_job({"a": [f"Long one {i} @@slow=20@@" for i in range(4)]})
    proc = start(job, tmp_path, FISH_SHUTDOWN_GRACE_S="60")
    wait_for_event(proc, "worker_ready", 2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=20)
    assert proc.returncode == 130 and time.monotonic() - t0 < 10
    assert {r["status"] for r in check_outputs(tmp_path / "out").values()} == {"pending"}
    assert_no_workers_left(tmp_path)


def test_workers_die_with_a_sigkilled_main_process(tmp_path, synthetic_job) -> None:
    job = synthetic_job({"a": [f"Long {i} @@slow=30@@" for i in range(4)]})
    proc = start(job, tmp_path)
    events = wait_for_event(proc, "worker_ready", 2)
    pids = [e["pid"] for e in events if e["event"] == "worker_ready"]
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 10
    while any(os.path.exists(f"/proc/{p}") and processes_with(str(tmp_path)) for p in pids):
        assert time.monotonic() < deadline, "workers outlived the main process"
        time.sleep(0.1)


@pytest.mark.parametrize("kind", ["corrupt", "silent", "short"])
def test_bad_reference_fails_only_that_speaker(kind, tmp_path, synthetic_job, make_wav, fishmp_cli) -> None:
    job = synthetic_job({"good": ["One.", "Two."], "bad": ["Three.", "Four.", "Five."]})
    bad = tmp_path / "bad.wav"
    if kind == "corrupt":
        bad.write_bytes(b"RIFF\x00\x00\x00\x00WAVEfmt garbage" * 10)
    elif kind == "silent":
        make_wav(str(bad), 2.0, 16000, kind="silent")
    else:
        make_wav(str(bad), 0.1, 16000)
    out, events, segs = run(fishmp_cli, job, tmp_path)
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert {s for s, r in segs.items() if r["status"] == "done"} == {"good-000", "good-001"}
    bad_recs = [r for s, r in segs.items() if s.startswith("bad")]
    assert all(r["status"] == "failed" and r["error_kind"] == "bad_reference" and "bad.wav" in r["error"]
               for r in bad_recs)


def test_missing_reference_is_a_validation_error(tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": ["One."]})
    os.unlink(tmp_path / "a.wav")
    out = fishmp_cli(["generate", job, "-o", "out"], str(tmp_path), synthetic_env(tmp_path))
    assert out.returncode == 2 and "a.wav" in out.stderr and "Traceback" not in out.stderr


@pytest.fixture
def small_tmpfs(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=160k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_full_disk_fails_segments_cleanly(tmp_path, synthetic_job, fishmp_cli, small_tmpfs) -> None:
    job = synthetic_job({"a": ["Short.", "x" * 80, "y" * 80, "Tiny."]})  # 4.8 s of audio (423 kB) cannot fit
    out = fishmp_cli(["generate", job, "-o", str(small_tmpfs), "--progress", "jsonl"], str(tmp_path),
                     synthetic_env(tmp_path))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    segs = check_outputs(small_tmpfs)
    assert segs["a-001"]["status"] == "failed" and segs["a-001"]["error_kind"] == "write_error"
    assert "No space left" in segs["a-001"]["error"]
    assert segs["a-000"]["status"] == "done" and segs["a-003"]["status"] == "done"
    assert_no_workers_left(tmp_path)


def test_unwritable_output_dir_is_exit_2(tmp_path, synthetic_job, fishmp_cli) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True).returncode:
        pytest.skip("cannot mount a read-only tmpfs here (needs root)")
    try:
        job = synthetic_job({"a": ["One."]})
        out = fishmp_cli(["generate", job, "-o", str(ro)], str(tmp_path), synthetic_env(tmp_path))
        assert out.returncode == 2 and "not writable" in out.stderr and "Traceback" not in out.stderr
    finally:
        subprocess.run(["umount", "-l", str(ro)], check=False)


def test_hostile_texts_are_handled(tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": ["Mixed 中文 and English, ça va? Привет!", "Control\x07chars\x00 inside\ttext.",
                               "Long. " * 400]})
    out, events, segs = run(fishmp_cli, job, tmp_path, FISH_SEGMENT_TIMEOUT_PER_CHAR_S="1")
    assert out.returncode == 0, out.stderr
    assert {r["status"] for r in segs.values()} == {"done"}


def test_repeated_oom_on_a_device_drops_a_worker_slot(tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": ["Big one @@oom@@.", "Normal."] + [f"Line {i} @@slow=0.3@@" for i in range(6)],
                         "b": ["Big two @@oom@@.", "Normal too."] + [f"Other {i} @@slow=0.3@@" for i in range(6)]})
    out, events, segs = run(fishmp_cli, job, tmp_path)
    assert out.returncode == 1
    assert sorted(s for s, r in segs.items() if r["status"] == "failed") == ["a-000", "b-000"]
    assert "repeated out-of-memory on cpu: dropping a worker there" in out.stderr
    # Two workers recycled after their OOMs; only one of the two slots got a replacement.
    assert sum(1 for e in events if e["event"] == "worker_ready") <= 3


def test_legacy_encode_with_a_bad_reference_writes_the_rest(tmp_path, make_wav, fishmp_cli) -> None:
    make_wav(str(tmp_path / "good.wav"), 1.0, 16000)
    (tmp_path / "bad.wav").write_bytes(b"not audio at all" * 100)
    cfg = {"mode": "encode", "output_dir": "npy", "speakers": [
        {"speaker_id": 1, "reference_audio": "good.wav", "reference_text": "Hi."},
        {"speaker_id": 2, "reference_audio": "bad.wav", "reference_text": "Hi."}]}
    (tmp_path / "enc.json").write_text(json.dumps(cfg))
    out = fishmp_cli(["encode", "enc.json"], str(tmp_path), synthetic_env(tmp_path, FISH_CPU_WORKERS="1"))
    assert out.returncode == 0 and "Traceback" not in out.stderr  # the legacy contract: exit 0 with what succeeded
    assert "speaker 2" in out.stderr and "bad.wav" in out.stderr
    listed = json.loads(out.stdout.strip().splitlines()[-1])
    assert listed == [{"speaker_id": 1, "npy_file": str(tmp_path / "npy" / "speaker_1.npy")}]
    assert (tmp_path / "npy" / "speaker_1.npy").exists() and not (tmp_path / "npy" / "speaker_2.npy").exists()
    assert_no_workers_left(tmp_path)


def test_legacy_encode_survives_a_load_failure_with_a_clear_error(tmp_path, make_wav, fishmp_cli) -> None:
    make_wav(str(tmp_path / "good.wav"), 1.0, 16000)
    cfg = {"mode": "encode", "output_dir": "npy",
           "speakers": [{"speaker_id": 1, "reference_audio": "good.wav", "reference_text": "Hi."}]}
    (tmp_path / "enc.json").write_text(json.dumps(cfg))
    out = fishmp_cli(["encode", "enc.json"], str(tmp_path),
                     synthetic_env(tmp_path, FISH_SYNTHETIC_LOAD_FAULT="raise", FISH_MAX_RESTARTS="1"))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "no worker could load the model" in out.stderr and "FISH_SYNTHETIC_LOAD_FAULT" in out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []


def test_a_backend_that_stops_reading_costs_nothing(tmp_path, synthetic_job) -> None:
    job = synthetic_job({"a": [f"Line {i} @@slow=0.2@@" for i in range(6)]})
    proc = start(job, tmp_path)
    proc.stdout.readline()  # the plan event, then the reader goes away
    proc.stdout.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0 and "Traceback" not in err
    assert {r["status"] for r in check_outputs(tmp_path / "out").values()} == {"done"}
    assert_no_workers_left(tmp_path)


def _pool(tmp_path, **kw):
    import fishmp

    return fishmp.Pool(engine="synthetic", multiprocess_mode="true", devices="cpu", cache_dir=str(tmp_path / "cache"),
                       **{"cpu_workers": 2, **kw})


def _voice_job(make_wav, tmp_path, prefix: str, texts: list[str], speakers: int = 1) -> dict:
    voice = make_wav(str(tmp_path / "v.wav"), 1.0, 16000)
    return {"speakers": {f"s{k}": {"reference_audio": voice, "reference_text": "hi"} for k in range(speakers)},
            "segments": [{"id": f"{prefix}{i}", "speaker": f"s{i % speakers}", "text": t} for i, t in enumerate(texts)]}


@pytest.mark.parametrize("n", [1, 2])
def test_a_worker_frozen_while_idle_is_replaced_and_its_segment_done_elsewhere(n, tmp_path, make_wav, clean_env):
    """Issue 25 item 3: a task sent to a SIGSTOPped idle worker never starts; past FISH_START_TIMEOUT_S it is taken
    back (not blamed) and done by the other worker, and the frozen one is killed and replaced."""
    events: list[dict] = []
    with _pool(tmp_path, start_timeout_s=3.0) as pool:
        warm = pool.submit(_voice_job(make_wav, tmp_path, "w", ["Warm one.", "Warm two."]), output_dir=str(tmp_path / "w"),
                           on_event=events.append)
        assert warm.result(timeout=60).exit_code == 0
        # Under load one worker can do both warm segments before the other is ready: wait for both.
        deadline = time.monotonic() + 60
        while pool.stats()["workers"].get("ready", 0) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = {h.id: h.pid for h in pool._workers.handles.values() if h.state == "ready"}
        frozen = ready["w0"]  # the first worker: the one a lone segment is sent to
        os.kill(frozen, signal.SIGSTOP)
        try:
            events.clear()
            t0 = time.monotonic()
            result = pool.generate(_voice_job(make_wav, tmp_path, "j", [f"Line {i}." for i in range(n)]),
                                   output_dir=str(tmp_path / "out"), on_event=events.append)
            took = time.monotonic() - t0
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(frozen, signal.SIGCONT)
    assert result.exit_code == 0 and result.count("done") == n
    assert {r.attempts for r in result.records.values()} == {1}  # not blamed
    died = [e for e in events if e["event"] == "worker_died"]
    assert [e["pid"] for e in died] == [frozen] and "FISH_START_TIMEOUT_S=3s" in died[0]["reason"]
    requeued = [e for e in events if e["event"] == "segment_requeued"]
    assert len(requeued) == 1 and requeued[0]["attempts"] == 0 and requeued[0]["pid"] == frozen
    assert took < 40, took
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{frozen}") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not os.path.exists(f"/proc/{frozen}")


@pytest.mark.parametrize("batch", [1, 2])
def test_a_busy_worker_whose_queued_task_waits_is_not_taken_for_frozen(batch, tmp_path, make_wav, clean_env):
    """A task queued behind running rows (another speaker's at batch 2, the next one at batch 1) has no Started for
    longer than FISH_START_TIMEOUT_S: that is not a frozen worker."""
    events: list[dict] = []
    texts = ["Slow one @@slow=4@@.", "Slow two @@slow=4@@.", "Then this."]
    job = _voice_job(make_wav, tmp_path, "j", texts, speakers=2 if batch > 1 else 1)
    if batch > 1:  # two rows of s0 run, s1's task waits for that session to drain
        job["segments"][1]["speaker"], job["segments"][2]["speaker"] = "s0", "s1"
    with _pool(tmp_path, cpu_workers=1, batch_size=batch, start_timeout_s=3.0) as pool:
        result = pool.generate(job, output_dir=str(tmp_path / "out"), on_event=events.append)
    assert result.exit_code == 0 and result.count("done") == 3
    assert not [e for e in events if e["event"] in ("worker_died", "segment_requeued")]


@pytest.mark.parametrize("kind", ["a-file", "read-only", "full"])
def test_an_unusable_cache_dir_costs_one_warning_not_the_segments(kind, tmp_path, synthetic_job, fishmp_cli) -> None:
    """Issue 25 item 7: every segment failed as poison after 3 reloads each; the cache is only an optimisation."""
    cache = tmp_path / "cache-here"
    if kind == "a-file":
        cache.write_text("not a directory")
    else:
        cache.mkdir()
        opts = "ro,size=64k" if kind == "read-only" else "size=16k"
        if subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(cache)], capture_output=True).returncode:
            pytest.skip("cannot mount a tmpfs here (needs root)")
        if kind == "full":
            with contextlib.suppress(OSError), open(cache / "filler", "wb") as f:
                while True:
                    f.write(b"\0" * 4096)
                    f.flush()
    try:
        job = synthetic_job({"a": ["One.", "Two."], "b": ["Three."]})
        out, events, segs = run(fishmp_cli, job, tmp_path, FISH_CACHE_DIR=str(cache))
    finally:
        if kind != "a-file":
            subprocess.run(["umount", "-l", str(cache)], check=False)
    assert out.returncode == 0, out.stderr
    assert {r["status"] for r in segs.values()} == {"done"} and {r["attempts"] for r in segs.values()} == {1}
    assert not [e for e in events if e["event"] in ("worker_died", "segment_requeued")]
    warnings = [line for line in out.stderr.splitlines() if "FISH_CACHE_DIR" in line]
    assert len(warnings) == 1 and str(cache) in warnings[0] and "without the cache" in warnings[0], out.stderr


def test_a_final_manifest_the_disk_cannot_hold_is_said_and_exit_5(tmp_path, synthetic_job, fishmp_cli) -> None:
    """Issue 25 item 8: the result line said done while manifest.json on disk said pending, exit 0. The disk is filled
    up front to leave room for exactly the lock, the first manifest and the one wav: the final write cannot fit."""
    import math

    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        text = "Hello there."
        wav_pages = math.ceil((44 + 2 * round(len(text) * 0.06 * 44100)) / 4096)  # the synthetic engine's output
        free = os.statvfs(mnt).f_bavail
        (mnt / "filler").write_bytes(b"\0" * ((free - wav_pages - 2) * 4096))  # + the lock and the first manifest
        job = synthetic_job({"a": [text]})
        out = fishmp_cli(["generate", job, "-o", str(mnt / "out"), "--progress", "jsonl"], str(tmp_path),
                         synthetic_env(tmp_path, FISH_CPU_WORKERS="1"))
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert out.returncode == 5, out.stderr
        assert result["exit_code"] == 5 and result["done"] == 1 and "No space left" in result["manifest_error"]
        assert "manifest.json NOT written" in out.stderr and "wavs and manifest" not in out.stderr
        assert sf.info(str(mnt / "out" / "a-000.wav")).frames > 0  # the work is on disk
        assert jsonl_events(out.stdout)[-1]["manifest_error"] == result["manifest_error"]
        assert not [f for f in os.listdir(mnt / "out") if f.startswith(TMP_PREFIX)]
        os.unlink(mnt / "filler")  # room again: the re-run redoes what the manifest lacked, and writes it
        again = fishmp_cli(["generate", job, "-o", str(mnt / "out"), "--progress", "jsonl"], str(tmp_path),
                           synthetic_env(tmp_path, FISH_CPU_WORKERS="1"))
        assert again.returncode == 0 and "manifest_error" not in again.stdout.splitlines()[-1]
        assert {r["status"] for r in check_outputs(mnt / "out").values()} == {"done"}
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)
    assert_no_workers_left(tmp_path)


@pytest.mark.parametrize("batch", [1, 4])
def test_single_process_mode_blames_a_hang_only_on_a_segment_that_ran_alone(batch, tmp_path, synthetic_job,
                                                                             fishmp_cli) -> None:
    """Issue 25 item 9: in FISH_MULTIPROCESS_MODE=false a hang in a batch failed every batchmate as `timeout` (and,
    at batch 1, every other segment of the job too). Only a segment that ran alone is known to have hung."""
    mate = "a line long enough to outlast the first steps of the batch it is decoded in, " * 2
    job = synthetic_job({"a": [f"Mate one, {mate}", f"Mate two, {mate}", f"Mate three, {mate}", "Hangs @@hang@@.",
                               "Later.", "Last."]})  # longest first: the mates start before the hang joins them
    out = fishmp_cli(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path),
                     synthetic_env(tmp_path, FISH_MULTIPROCESS_MODE="false", FISH_BATCH_SIZE=str(batch),
                                   FISH_SEGMENT_TIMEOUT_S="1", FISH_SEGMENT_TIMEOUT_PER_CHAR_S="0",
                                   FISH_SEGMENT_TIMEOUT_PER_FRAME_S="0"), timeout=60)
    assert out.returncode == 1, out.stderr
    segs = json.loads((tmp_path / "out" / "manifest.json").read_text())["segments"]
    kinds = {sid: r.get("error_kind") or r["status"] for sid, r in segs.items()}
    if batch == 1:  # the mates ran (alone) before it; the hang ran alone: it is the culprit
        assert kinds == {"a-000": "done", "a-001": "done", "a-002": "done", "a-003": "timeout",
                         "a-004": "no_workers", "a-005": "no_workers"}
    else:  # it hung a batch of four: nobody is blamed, the four are named
        assert set(kinds.values()) == {"no_workers"}
        mates = [sid for sid, r in segs.items() if "one of these 4 segments hung" in r["error"]]
        assert sorted(mates) == ["a-000", "a-001", "a-002", "a-003"]
    assert all("FISH_MULTIPROCESS_MODE" in r["error"] for r in segs.values() if r["status"] == "failed")
    assert "Traceback" not in out.stderr and "terminate called" not in out.stderr
