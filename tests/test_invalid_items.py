"""Items left out as invalid (`--skip-invalid`, legacy configs) are listed in manifest.json's top-level "invalid"
(id, index, speaker, reason), replaced by each run and never read back by resume. Real files and processes, the
synthetic engine."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import jsonl_events, run_fishmp, synthetic_env
from job_files import legacy_generate, new_job, write_job

from fishmp.job import load_job


def test_the_job_lists_each_left_out_item_with_its_reason(proj: Path) -> None:
    data = new_job()
    data["speakers"]["bob"]["prompt_tokens"] = "refs/missing.npy"  # spoils bob, so segment 0002
    data["segments"][0]["text"] = " "
    data["segments"].append({"id": "bad\u202eid", "speaker": "alice", "text": "Hi."})
    job = load_job(str(write_job(proj, data)), str(proj / "o"), skip_invalid=True)
    assert [s.id for s in job.segments] == ["0003"]
    by_key = {(e.get("id"), e.get("index"), e.get("speaker")): e["reason"] for e in job.invalid}
    assert set(by_key) == {(None, None, "bob"), ("0001", 0, None), (None, 3, None), ("0002", 1, "bob")}
    assert by_key[(None, None, "bob")].startswith('speaker "bob": prompt_tokens refs/missing.npy')
    assert by_key[("0001", 0, None)].startswith('segment "0001": text is empty')
    assert by_key[(None, 3, None)].startswith("segments[3]: id must be a non-empty string")
    assert by_key[("0002", 1, "bob")] == 'segment "0002": skipped: speaker "bob" has a problem'
    assert load_job(str(write_job(proj, new_job(), "ok.json")), str(proj / "o")).invalid == ()


def test_legacy_tasks_are_named_by_segment_index_and_position(proj: Path) -> None:
    data = legacy_generate(proj)
    data["tasks"][1]["target_text"] = "  "
    data["tasks"].append({"segment_index": 4, "speaker_id": 3, "target_text": "Again.", "npy_file":
                          "legacy/speaker_3.npy", "reference_text": "Ref three.", "output_file": "dup.wav"})
    job = load_job(str(write_job(proj, data)), skip_invalid=None)  # legacy configs skip
    assert [s.legacy_index for s in job.segments] == [4, 9]
    assert [(e.get("id"), e["index"]) for e in job.invalid] == [("0", 1), (None, 3)]  # the duplicate: by position
    assert "target_text is empty" in job.invalid[0]["reason"] and "duplicate segment_index" in job.invalid[1]["reason"]


def _manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def test_the_manifest_lists_invalid_items_and_each_run_replaces_the_list(tmp_path: Path, synthetic_job) -> None:
    job = synthetic_job({"alice": ["One.", "\u200b", "Three."], "bob": ["Four."]})
    env = synthetic_env(tmp_path)
    args = ["generate", job, "-o", "out", "--progress", "jsonl"]
    run = run_fishmp([*args, "--skip-invalid"], str(tmp_path), env)
    assert run.returncode == 1, run.stderr
    manifest = _manifest(tmp_path / "out")
    assert manifest["invalid"] == [{"id": "alice-001", "index": 1, "reason": 'segment "alice-001": text is empty '
                                    "(only whitespace, control or zero-width characters)"}]
    assert sorted(manifest["segments"]) == ["alice-000", "alice-002", "bob-000"]  # the invalid one is no segment

    fixed = json.loads(Path(job).read_text())
    fixed["segments"][1]["text"] = "Two."
    Path(job).write_text(json.dumps(fixed))
    again = run_fishmp(args, str(tmp_path), env)
    assert again.returncode == 0, again.stderr
    manifest = _manifest(tmp_path / "out")
    assert manifest["invalid"] == [] and manifest["counts"]["done"] == 4
    done = [e for e in jsonl_events(again.stdout) if e["event"] == "segment_done"]
    assert sorted(e["id"] for e in done if not e.get("skipped")) == ["alice-001"]  # resume redid nothing else
