"""Review of takes in the running layer (fishmp/running/review.py, amend.py): the next seed, a retake adopted with
the old take's file kept, accept as a recorded decision, edits made through a running job's own loop (never lost to
its next save) or under the output directory's lock, and resume trusting a manifest with take history and review
(and one from before those fields). Real files, real jobs (synthetic engine) through the CLI and fishmp.Pool."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
from conftest import jsonl_events, synthetic_env

import fishmp
from fishmp.running.amend import edit_manifest
from fishmp.running.results import Manifest, OutputDirBusy, OutputDirLock, SegmentRecord
from fishmp.running.review import ReviewError, accept, adopt_retake, next_seed, take_file

pytestmark = pytest.mark.timeout(180)


def takes(*seeds: int | None) -> list[dict]:
    return [{"passed": False, "reasons": ["silent"], "seed": s} for s in seeds]


def test_the_next_seed_is_past_every_seed_tried() -> None:
    assert next_seed(SegmentRecord(takes=takes(None, 1, 2))) == 3  # unseeded first take, retries 1 and 2
    assert next_seed(SegmentRecord(takes=takes(4, 5, 6), seed=4), base=4) == 7
    assert next_seed(SegmentRecord(takes=takes(7), seed=7, history=[{"seed": None, "takes": takes(None, 1, 9)}])) == 10
    assert next_seed(SegmentRecord()) == 1  # takes not checked, no seed: as the first retry would be
    assert next_seed(SegmentRecord(), base=41) == 42
    assert next_seed(SegmentRecord(seed=3), base=None) == 4  # a retake's seed is recorded even without the check


def manifest_with(tmp_path, **records: SegmentRecord) -> Manifest:
    m = Manifest(path=str(tmp_path / "manifest.json"), segments=dict(records))
    m.save()
    return m


def test_a_retake_keeps_the_old_take_file_and_its_record(tmp_path) -> None:
    out = tmp_path / "out"
    (out / "ep1").mkdir(parents=True)
    (out / "ep1" / "a.wav").write_bytes(b"old take")
    old = SegmentRecord(status="done", path=str(out / "ep1" / "a.wav"), audio_seconds=1.5, suspect=True, seed=None,
                        kept_take=0, takes=takes(None, 1, 2), fingerprint="fp-a", tokens=32,
                        review={"decision": "accepted", "at": 1.0})
    m = Manifest(path=str(out / "manifest.json"), segments={"ep1/a": old})
    (tmp_path / "retake.wav").write_bytes(b"new take")
    new = SegmentRecord(status="done", path=str(tmp_path / "retake.wav"), audio_seconds=1.2, suspect=False, seed=3,
                        kept_take=0, takes=[{"passed": True, "reasons": [], "seed": 3}], tokens=26)
    rec = adopt_retake(m, "ep1/a", str(out), new, 3, "anna", 100.0)
    assert (out / "ep1" / "a.wav").read_bytes() == b"new take" and not (tmp_path / "retake.wav").exists()
    assert (out / ".takes" / "ep1" / "a.1.wav").read_bytes() == b"old take"  # a distinct name per take
    assert rec.path == str(out / "ep1" / "a.wav") and rec.fingerprint == "fp-a"  # what resume checks is unchanged
    assert (rec.suspect, rec.seed, rec.tokens, rec.review) == (False, 3, 26, None)
    (entry,) = rec.history
    assert entry["file"] == os.path.join(".takes", "ep1", "a.1.wav") and entry["suspect"] is True
    assert entry["takes"] == takes(None, 1, 2) and entry["review"] == {"decision": "accepted", "at": 1.0}
    assert (entry["replaced_at"], entry["replaced_by"]) == (100.0, "anna")
    assert next_seed(rec) == 4
    (tmp_path / "again.wav").write_bytes(b"third take")
    again = SegmentRecord(status="done", path=str(tmp_path / "again.wav"), suspect=False, seed=4)
    rec = adopt_retake(m, "ep1/a", str(out), again, 4, None, 101.0)
    assert [h["file"] for h in rec.history] == [".takes/ep1/a.1.wav", ".takes/ep1/a.2.wav"]
    assert (out / ".takes" / "ep1" / "a.2.wav").read_bytes() == b"new take" and "replaced_by" not in rec.history[1]
    with pytest.raises(ReviewError) as e:
        adopt_retake(m, "nope", str(out), again, 5, None, 1.0)
    assert e.value.kind == "unknown_segment"
    m.segments["p"] = SegmentRecord(status="pending", path=str(out / "p.wav"))
    with pytest.raises(ReviewError) as e:
        adopt_retake(m, "p", str(out), again, 5, None, 1.0)
    assert e.value.kind == "not_finished"


def test_a_take_file_never_takes_a_segments_own_path(tmp_path) -> None:
    m = Manifest(path=str(tmp_path / "manifest.json"), segments={
        "x": SegmentRecord(status="done", path=str(tmp_path / "x.wav")),
        "y": SegmentRecord(status="done", path=str(tmp_path / ".takes" / "x.1.wav"))})  # a job wrote there
    assert take_file(m, str(tmp_path), str(tmp_path / "x.wav"), 1) == str(tmp_path / ".takes" / "x.1_.wav")


def test_accept_is_a_recorded_decision_and_only_for_suspect_takes() -> None:
    m = Manifest(path="/nonexistent/manifest.json", segments={
        "s": SegmentRecord(status="done", suspect=True, kept_take=1, takes=takes(None, 1)),
        "ok": SegmentRecord(status="done", suspect=False), "off": SegmentRecord(status="done"),
        "f": SegmentRecord(status="failed", error="nonfinite")})
    rec = accept(m, "s", "anna", 50.0)
    assert rec.suspect is False and rec.review == {"decision": "accepted", "at": 50.0, "by": "anna",
                                                   "reasons": ["silent"]}
    for sid, kind, words in (("s", "not_suspect", "accepted already by anna"), ("ok", "not_suspect", "passed"),
                             ("off", "not_suspect", "FISH_TAKE_CHECK=false"), ("f", "not_finished", "failed"),
                             ("zz", "unknown_segment", "no segment")):
        with pytest.raises(ReviewError) as e:
            accept(m, sid, None, 1.0)
        assert e.value.kind == kind and words in str(e.value), (sid, str(e.value))


def test_an_edit_without_a_run_is_made_under_the_lock_and_keeps_the_rest(tmp_path) -> None:
    m = manifest_with(tmp_path, s=SegmentRecord(status="done", suspect=True, takes=takes(None), kept_take=0))
    m.invalid, m.summary = [{"id": "x", "reason": "empty"}], {"gpus": {"0": {"samples": 3}}}
    m.save()
    rec = edit_manifest(str(tmp_path), lambda mm: accept(mm, "s", None, 7.0))
    assert rec.review["at"] == 7.0
    data = json.loads((tmp_path / "manifest.json").read_text())
    assert data["segments"]["s"]["review"]["decision"] == "accepted" and data["counts"]["suspect"] == 0
    assert data["invalid"] == [{"id": "x", "reason": "empty"}] and data["summary"] == {"gpus": {"0": {"samples": 3}}}
    with pytest.raises(ReviewError):  # the edit's own error, nothing written
        edit_manifest(str(tmp_path), lambda mm: accept(mm, "s", None, 8.0))
    with OutputDirLock(str(tmp_path)), pytest.raises(OutputDirBusy):  # another job holds it: refused, not waited on
        edit_manifest(str(tmp_path), lambda mm: None, timeout_s=0.3)


def test_edits_go_through_a_running_job_and_survive_its_saves(tmp_path, make_wav) -> None:
    """Accept a done segment while its job still runs: the run's loop applies it and saves at once; its later saves
    (from its own records) keep it, and so does the final manifest."""
    voice = make_wav(str(tmp_path / "v.wav"), 1.0, 16000)
    job = {"speakers": {"v": {"reference_audio": voice, "reference_text": "hi"}},
           "segments": [{"id": "bad", "speaker": "v", "text": "@@clipped@@ Clipped line."}]
           + [{"id": f"s{i}", "speaker": "v", "text": f"Line {i}. @@slow=0.4@@"} for i in range(8)]}
    out = str(tmp_path / "out")
    first = threading.Event()
    with fishmp.Pool(engine="synthetic", cpu_workers=1, multiprocess_mode="true", devices="cpu",
                     cache_dir=str(tmp_path / "cache")) as pool:
        handle = pool.submit(job, output_dir=out, on_event=lambda ev: ev.get("id") == "bad" and first.set())
        assert first.wait(60)
        rec = edit_manifest(out, lambda m: accept(m, "bad", "anna", 9.0), handle)
        assert not handle.done(), "the job ended before the edit: make its segments slower"
        on_disk = json.loads(open(os.path.join(out, "manifest.json")).read())["segments"]["bad"]
        assert rec.review["by"] == "anna" and on_disk["review"]["by"] == "anna" and on_disk["suspect"] is False
        result = handle.result(120)
    assert result.count("done") == 9 and not result.records["bad"].suspect
    final = json.loads(open(os.path.join(out, "manifest.json")).read())
    assert final["segments"]["bad"]["review"] == {"decision": "accepted", "at": 9.0, "by": "anna",
                                                  "reasons": ["clipped"]}
    assert final["counts"]["suspect"] == 0
    with pytest.raises(ReviewError):  # after the run: through the file, under the lock
        edit_manifest(out, lambda m: accept(m, "bad", None, 10.0), handle)


def test_resume_trusts_a_reviewed_manifest_and_an_older_one(tmp_path, synthetic_job, fishmp_cli) -> None:
    """A job with suspect takes (exit 4), one retaken and one accepted: the re-run redoes nothing, keeps history
    and review, and exits 0; the same manifest stripped of the review fields (as older fishmp wrote it) resumes too."""
    job = synthetic_job({"v": ["@@silent:3@@ Comes right on retake.", "@@clipped@@ Always clipped.", "A fine line."]})
    env = synthetic_env(tmp_path)
    out = str(tmp_path / "out")
    first = fishmp_cli(["generate", job, "-o", out, "--progress", "jsonl"], str(tmp_path), env)
    assert first.returncode == 4, first.stderr
    m = Manifest.load(out)
    retake_wav = str(tmp_path / "retake.wav")
    shutil.copyfile(m.segments["v-002"].path, retake_wav)  # a passing take of a like text stands in for the retake
    new = SegmentRecord(status="done", path=retake_wav, audio_seconds=1.0, suspect=False, seed=3, kept_take=0,
                        takes=[{"passed": True, "reasons": [], "seed": 3}])
    edit_manifest(out, lambda mm: adopt_retake(mm, "v-000", out, new, 3, "anna", 1.0))
    edit_manifest(out, lambda mm: accept(mm, "v-001", "anna", 2.0))
    again = fishmp_cli(["generate", job, "-o", out, "--progress", "jsonl"], str(tmp_path), env)
    assert again.returncode == 0, again.stderr  # nothing suspect is left: the accept counts
    plan = next(e for e in jsonl_events(again.stdout) if e["event"] == "plan")
    assert plan["skipped"] == 3 and plan["workers"] == 0
    data = json.loads(open(os.path.join(out, "manifest.json")).read())["segments"]
    assert data["v-000"]["history"][0]["file"] == ".takes/v-000.1.wav" and data["v-000"]["seed"] == 3
    assert os.path.isfile(os.path.join(out, ".takes", "v-000.1.wav"))
    assert data["v-001"]["review"]["by"] == "anna" and data["v-001"]["suspect"] is False
    path = os.path.join(out, "manifest.json")
    raw = json.loads(open(path).read())
    for rec in raw["segments"].values():  # as a manifest from before review existed
        rec.pop("history", None)
        rec.pop("review", None)
    raw["segments"]["v-001"]["suspect"] = True
    with open(path, "w") as f:
        json.dump(raw, f)
    old = fishmp_cli(["generate", job, "-o", out, "--progress", "jsonl"], str(tmp_path), env)
    assert old.returncode == 4, old.stderr
    assert next(e for e in jsonl_events(old.stdout) if e["event"] == "plan")["skipped"] == 3
