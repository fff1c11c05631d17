"""results.py on real files and processes: the output-directory lock, temp-file ownership, file modes, the manifest."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from fishmp.running.outputlock import LOCK_NAME, ManifestError, OutputDirBusy, OutputDirLock
from fishmp.running.results import MANIFEST, Manifest, SegmentRecord, manifest_problem, output_dir_problem
from fishmp.worker.files import TMP_PREFIX, atomic_write, remove_temp_files, write_wav

HOLDER = """
import sys, time
from fishmp.running.outputlock import OutputDirLock
lock = OutputDirLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def start_holder(directory: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, directory], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


# ------------------------------------------------------------------------------------------------------------ lock
def test_second_process_is_refused_until_the_holder_is_sigkilled(tmp_path) -> None:
    out = str(tmp_path / "out")
    holder = start_holder(out)
    try:
        with pytest.raises(OutputDirBusy) as err:
            OutputDirLock(out).acquire()
        msg = str(err.value)
        assert f"in use by pid {holder.pid} since 20" in msg and out in msg
        assert "another fishmp job" in msg and "another -o" in msg and "\n" not in msg
        assert err.value.exit_code == 3
        # a third process is refused too (the lock is the kernel's, not this test's)
        third = subprocess.run([sys.executable, "-c", HOLDER, out], capture_output=True, text=True, timeout=60)
        assert third.returncode != 0 and "OutputDirBusy" in third.stderr
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
    assert os.path.exists(os.path.join(out, LOCK_NAME))  # SIGKILL left the file, but not the lock
    with OutputDirLock(out) as lock:
        assert lock.held
        with open(lock.path) as f:
            assert f.read().split()[0] == str(os.getpid())
    assert not os.path.exists(os.path.join(out, LOCK_NAME))  # a clean release removes it


def test_same_process_cannot_take_one_directory_twice(tmp_path) -> None:
    with OutputDirLock(str(tmp_path)):
        with pytest.raises(OutputDirBusy, match=f"in use by pid {os.getpid()} since"):
            OutputDirLock(str(tmp_path)).acquire()
    with OutputDirLock(str(tmp_path)):  # released: free again
        pass


def test_garbage_in_the_lock_file_still_gives_a_one_line_refusal(tmp_path) -> None:
    with OutputDirLock(str(tmp_path)) as lock:
        with open(lock.path, "w") as f:
            f.write("x" * 40 + " nonsense\n")
        with pytest.raises(OutputDirBusy, match="in use by a process that is starting up"):
            OutputDirLock(str(tmp_path)).acquire()


def test_lock_refuses_a_symlink_planted_as_lock_file(tmp_path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).symlink_to(victim)
    with pytest.raises(Exception, match="cannot lock output directory"):
        OutputDirLock(str(out)).acquire()
    assert victim.read_text() == "keep me"


# ----------------------------------------------------------------------------------------------------- temp files
def test_temp_files_carry_the_pid_and_cleanup_spares_live_processes_and_foreign_files(tmp_path) -> None:
    seen: list[str] = []
    atomic_write(str(tmp_path / "a.npy"), lambda tmp: (seen.append(os.path.basename(tmp)), np.save(tmp, np.zeros(3))),
                 ".npy")
    assert seen[0].startswith(TMP_PREFIX) and f"-{os.getpid()}-" in seen[0] and seen[0].endswith(".npy")
    host = seen[0][len(TMP_PREFIX):].split("-")[0]

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(30)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])  # exited, not reaped yet (as a just-killed worker)
    while not os.path.exists(f"/proc/{zombie.pid}") or b") Z " not in open(f"/proc/{zombie.pid}/stat", "rb").read():
        time.sleep(0.01)
    try:
        names = {
            "mine": f"{TMP_PREFIX}{host}-{os.getpid()}-{'a' * 16}",
            "dead": f"{TMP_PREFIX}{host}-{dead.pid}-{'b' * 16}.npy",
            "live": f"{TMP_PREFIX}{host}-{live.pid}-{'c' * 16}",
            "zombie": f"{TMP_PREFIX}{host}-{zombie.pid}-{'e' * 16}",
            "other_host": f"{TMP_PREFIX}00000000-{dead.pid}-{'d' * 16}" if host != "00000000" else "x",
            "foreign": f"{TMP_PREFIX}cache",
            "unrelated": "take.wav",
        }
        for n in names.values():
            (tmp_path / n).write_bytes(b"x")
        assert remove_temp_files({str(tmp_path)}) == 3
        left = set(os.listdir(tmp_path))
        assert names["mine"] not in left and names["dead"] not in left and names["zombie"] not in left
        assert {names["live"], names["other_host"], names["foreign"], names["unrelated"]} <= left
        # a process this job started (a worker) is named explicitly: its files go even while it lives
        assert remove_temp_files({str(tmp_path)}, pids=[live.pid]) == 1
        assert names["live"] not in os.listdir(tmp_path)
    finally:
        live.kill()
        live.wait(10)
        zombie.wait(10)


# ---------------------------------------------------------------------------------------------------------- umask
@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_outputs_honour_the_umask(tmp_path, umask: int, mode: int) -> None:
    old = os.umask(umask)
    try:
        write_wav(str(tmp_path / "a.wav"), np.zeros(441, np.float32), 44100)
        atomic_write(str(tmp_path / "b.npy"), lambda tmp: np.save(tmp, np.zeros(3)), ".npy")
        m = Manifest(path=str(tmp_path / MANIFEST))
        m.save()
    finally:
        os.umask(old)
    for name in ("a.wav", "b.npy", MANIFEST):
        assert os.stat(tmp_path / name).st_mode & 0o777 == mode, name


# ------------------------------------------------------------------------------------------------------- manifest
def _manifest(tmp_path, n: int) -> Manifest:
    m = Manifest(path=str(tmp_path / MANIFEST), job="job.json")
    for i in range(n):
        m.segments[f"seg-{i:04d}"] = SegmentRecord(status="done", path=f"/o/{i}.wav", speaker="a", audio_seconds=1.5,
                                                   fingerprint=f"fp{i}")
    m.save()
    return m


def test_manifest_identifies_itself_and_round_trips(tmp_path) -> None:
    _manifest(tmp_path, 3)
    data = json.loads((tmp_path / MANIFEST).read_text())
    assert data["fishmp"] == {"version": 1} and data["counts"]["done"] == 3
    back = Manifest.load(str(tmp_path))
    assert back.segments["seg-0002"].fingerprint == "fp2" and back.job == "job.json"


@pytest.mark.parametrize("content", [
    '{"name": "my web app", "icons": []}\n', '[1, 2, 3]\n', "not json at all", '{"version": 1, "segments": {}}\n',
    '{"name": "cut sh', "\x00\x01binary",
])
def test_foreign_manifest_is_never_overwritten(tmp_path, content: str) -> None:
    (tmp_path / MANIFEST).write_text(content)
    with pytest.raises(ManifestError, match=f"{MANIFEST}.*(not written by fishmp|not a manifest fishmp can read)"):
        Manifest.load(str(tmp_path))
    assert manifest_problem(str(tmp_path)) is not None and output_dir_problem(str(tmp_path)) is not None
    assert (tmp_path / MANIFEST).read_text() == content
    assert [p for p in os.listdir(tmp_path) if p != MANIFEST] == []


def test_manifest_of_an_earlier_fishmp_is_still_recognised(tmp_path) -> None:
    old = {"version": 1, "job": "j.json", "updated_at": 1.0, "counts": {"done": 1},
           "segments": {"s1": {"status": "done", "path": "/o/s1.wav", "fingerprint": "f"}}}
    (tmp_path / MANIFEST).write_text(json.dumps(old))
    assert Manifest.load(str(tmp_path)).segments["s1"].status == "done"


def test_truncated_manifest_keeps_every_intact_record(tmp_path, caplog) -> None:
    _manifest(tmp_path, 100)
    path = tmp_path / MANIFEST
    raw = path.read_bytes()
    cut = raw[: raw.rindex(b'"seg-0099"') + 20]  # the last record is cut in the middle
    path.write_bytes(cut)
    with caplog.at_level(logging.WARNING, logger="fishmp"):
        m = Manifest.load(str(tmp_path))
    assert len(m.segments) == 99 and m.segments["seg-0098"].fingerprint == "fp98" and "seg-0099" not in m.segments
    copies = [p for p in os.listdir(tmp_path) if p.startswith(MANIFEST + ".damaged-")]
    assert len(copies) == 1 and (tmp_path / copies[0]).read_bytes() == cut
    assert "recovered 99 segment records" in caplog.text and copies[0] in caplog.text
    m.save()  # the repaired manifest is whole again
    assert len(Manifest.load(str(tmp_path)).segments) == 99


def test_garbled_line_loses_only_that_record(tmp_path) -> None:
    _manifest(tmp_path, 10)
    path = tmp_path / MANIFEST
    lines = path.read_text().split("\n")
    lines[4] = lines[4][:15] + "\x00garbage"
    path.write_text("\n".join(lines))
    assert len(Manifest.load(str(tmp_path), repair=False).segments) == 9
    assert os.listdir(tmp_path) == [MANIFEST]  # repair=False writes nothing


def test_empty_manifest_is_a_damaged_one(tmp_path) -> None:
    (tmp_path / MANIFEST).write_bytes(b"")
    assert Manifest.load(str(tmp_path)).segments == {}
    assert any(p.startswith(MANIFEST + ".damaged-") for p in os.listdir(tmp_path))


def test_manifest_that_is_a_directory_is_an_error(tmp_path) -> None:
    (tmp_path / MANIFEST).mkdir()
    with pytest.raises(ManifestError, match="is a directory"):
        Manifest.load(str(tmp_path))
    assert "is a directory" in (output_dir_problem(str(tmp_path)) or "")


def test_saving_a_10000_segment_manifest_stays_fast(tmp_path) -> None:
    m = _manifest(tmp_path, 10_000)
    t0 = time.perf_counter()
    m.save()
    assert time.perf_counter() - t0 < 1.0  # ~50 ms on a laptop; a loose bound against an accidental O(n^2)
    assert len(Manifest.load(str(tmp_path)).segments) == 10_000


def test_take_records_round_trip_and_survive_a_damaged_manifest(tmp_path) -> None:
    """The take check's fields (fishmp/worker/takes.py) are plain JSON in each record; `counts` and the header's summary."""
    from fishmp.running.results import suspect_count, take_fields

    m = Manifest(os.path.join(str(tmp_path), MANIFEST), job="job.json")
    takes = [{"passed": False, "reasons": ["clipped"], "seed": None, "duration_s": 1.2},
             {"passed": False, "reasons": ["clipped"], "seed": 1, "duration_s": 1.2}]
    record = {"tried": 2, "kept": 1, "seed": 1, "suspect": True, "takes": takes, "over_slot_s": 0.2}
    for i in range(3):
        rec = SegmentRecord(status="done", path=f"/x/{i}.wav", fingerprint=f"fp{i}")
        for name, value in take_fields(record if i == 0 else None).items():
            setattr(rec, name, value)
        m.segments[f"s{i}"] = rec
    m.segments["s1"].suspect, m.segments["s2"].status = False, "failed"
    m.summary["gpus"] = {"0": {"peak_used_gib": 1.5}}
    m.save()
    data = json.loads((tmp_path / MANIFEST).read_text())
    assert data["counts"] == {"done": 2, "failed": 1, "pending": 0, "suspect": 1}
    assert data["summary"] == {"gpus": {"0": {"peak_used_gib": 1.5}}}
    assert data["segments"]["s0"] | {"path": None} == {
        "status": "done", "path": None, "attempts": 0, "fingerprint": "fp0", "suspect": True, "seed": 1,
        "kept_take": 1, "takes": takes, "over_slot_s": 0.2}
    assert "takes" not in data["segments"]["s2"]  # unchecked: absent, not null
    back = Manifest.load(str(tmp_path))
    assert back.segments["s0"].takes == takes and suspect_count(back.segments) == 1
    raw = (tmp_path / MANIFEST).read_bytes()
    (tmp_path / MANIFEST).write_bytes(raw[: raw.rindex(b'"s2"') + 5])  # cut inside the last record
    damaged = Manifest.load(str(tmp_path))
    assert set(damaged.segments) == {"s0", "s1"} and damaged.segments["s0"].suspect is True


def test_an_unwritten_final_manifest_wins_the_exit_code_and_legacy_keeps_its_own() -> None:
    from fishmp.legacy import exit_code
    from fishmp.running.jobrun import MANIFEST_EXIT, JobResult
    from fishmp.running.results import SegmentRecord

    done = {"a": SegmentRecord(status="done")}
    for interrupted, outcome in ((None, 0), (15, 143)):
        r = JobResult("/o", "/o/manifest.json", done, interrupted=interrupted, manifest_error="No space left on device")
        assert r.exit_code == MANIFEST_EXIT == 5 and r.outcome_exit_code == outcome
        assert exit_code(1, r.outcome_exit_code) == (0 if interrupted is None else 143)  # the backends' contract
    assert JobResult("/o", "/o/manifest.json", done).exit_code == 0
