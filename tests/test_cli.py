"""`python -m fishmp generate` as a user runs it: --skip-invalid, where a job file may write, resume planning, and
install-legacy-scripts' errors. Real processes and files, the synthetic engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import jsonl_events, run_fishmp, synthetic_env


def _result(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def test_skip_invalid_runs_the_valid_segments_of_a_fishmp_job(tmp_path: Path, synthetic_job) -> None:
    job = synthetic_job({"alice": ["One.", "\u200b", "Three."], "bob": ["Four."]})
    env = synthetic_env(tmp_path)
    strict = run_fishmp(["generate", job, "-o", "out"], str(tmp_path), env)
    assert strict.returncode == 2 and 'segment "alice-001": text is empty' in strict.stderr
    assert not (tmp_path / "out" / "manifest.json").exists()
    run = run_fishmp(["generate", job, "-o", "out", "--skip-invalid", "--progress", "legacy"], str(tmp_path), env)
    assert run.returncode == 1, run.stderr  # not everything in the file was done
    assert _result(run.stdout) | {"output_dir": None, "manifest": None} == {
        "output_dir": None, "manifest": None, "done": 3, "failed": 0, "pending": 0, "invalid": 1, "suspect": 0,
        "exit_code": 1}
    assert '[Main] skipped: segment "alice-001": text is empty' in run.stderr
    assert "[BatchGen] 进度: 4/4" in run.stderr and "All done! Processed 4/4 segments" in run.stderr
    assert sorted(os.listdir(tmp_path / "out")) == ["alice-000.wav", "alice-002.wav", "bob-000.wav", "manifest.json"]


def test_a_job_files_output_dir_stays_below_it_unless_the_operator_says(tmp_path: Path, synthetic_job) -> None:
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    job = synthetic_job({"alice": ["One."]}, output_dir=f"../{victim.name}")
    env = synthetic_env(tmp_path)
    refused = run_fishmp(["generate", job], str(tmp_path), env)
    assert refused.returncode == 2 and not victim.exists()
    assert f"\"output_dir\" '../{victim.name}' ({victim}) is outside the job file's directory" in refused.stderr
    assert "Traceback" not in refused.stderr
    by_root = run_fishmp(["generate", job], str(tmp_path), {**env, "FISH_OUTPUT_ROOT": str(victim)})
    assert by_root.returncode == 0, by_root.stderr
    assert _result(by_root.stdout)["output_dir"] == str(victim)
    by_flag = run_fishmp(["generate", job, "-o", str(victim / "o")], str(tmp_path), env)
    assert by_flag.returncode == 0 and (victim / "o" / "alice-000.wav").exists()


def test_resume_plans_workers_for_the_segments_left(tmp_path: Path, synthetic_job) -> None:
    job = synthetic_job({"alice": ["One.", "Two."], "bob": ["Three.", "Four."]})
    env = synthetic_env(tmp_path, FISH_CPU_WORKERS="2")
    first = run_fishmp(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path), env)
    assert first.returncode == 0 and jsonl_events(first.stdout)[0]["workers"] == 2
    os.remove(tmp_path / "out" / "bob-001.wav")
    again = run_fishmp(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path), env)
    assert again.returncode == 0, again.stderr
    plan = jsonl_events(again.stdout)[0]
    assert plan["event"] == "plan" and plan["skipped"] == 3 and plan["workers"] == 1
    assert len([e for e in jsonl_events(again.stdout) if e["event"] == "worker_ready"]) == 1


def test_a_rerun_with_nothing_left_starts_no_worker(tmp_path: Path, synthetic_job) -> None:
    """Issue 25: it started a worker and loaded the model (41 s on a 100,000-segment job) before reporting 0 left. A
    load fault on the re-run proves no worker starts: the run still ends cleanly, exit 0."""
    job = synthetic_job({"alice": ["One.", "Two."], "bob": ["Three."]})
    env = synthetic_env(tmp_path)
    first = run_fishmp(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path), env)
    assert first.returncode == 0, first.stderr
    again = run_fishmp(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path),
                       {**env, "FISH_SYNTHETIC_LOAD_FAULT": "die"})
    assert again.returncode == 0, again.stderr
    events = jsonl_events(again.stdout)
    assert events[0]["event"] == "plan" and events[0]["workers"] == 0 and events[0]["skipped"] == 3
    assert [e["event"] for e in events[1:]] == ["segment_done"] * 3 + ["finished"]
    assert all(e["skipped"] for e in events[1:4]) and events[-1]["done"] == 3 and events[-1]["exit_code"] == 0
    assert _result(again.stdout)["done"] == 3 and "no worker started" in again.stderr
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["counts"]["done"] == 3
    legacy = run_fishmp(["generate", job, "-o", "out", "--progress", "legacy"], str(tmp_path),
                        {**env, "FISH_SYNTHETIC_LOAD_FAULT": "die"})
    assert legacy.returncode == 0 and "[BatchGen] 进度: 3/3" in legacy.stderr and "All done!" in legacy.stderr


def test_the_one_off_generate_with_nothing_left_starts_no_worker(tmp_path: Path, make_wav, clean_env,
                                                                monkeypatch) -> None:
    import fishmp

    make_wav(str(tmp_path / "v.wav"), 1.0, 16000)
    job = {"speakers": {"v": {"reference_audio": str(tmp_path / "v.wav"), "reference_text": "hi"}},
           "segments": [{"id": "a", "speaker": "v", "text": "One."}]}
    kw = {"engine": "synthetic", "devices": "cpu", "multiprocess_mode": "true", "cache_dir": str(tmp_path / "c")}
    assert fishmp.generate(job, output_dir=str(tmp_path / "out"), **kw).exit_code == 0
    monkeypatch.setenv("FISH_SYNTHETIC_LOAD_FAULT", "die")
    events: list[dict] = []
    again = fishmp.generate(job, output_dir=str(tmp_path / "out"), on_event=events.append, **kw)
    assert again.exit_code == 0 and again.skipped == 1 and events[0]["workers"] == 0
    assert events[-1]["event"] == "finished" and not [e for e in events if e["event"] == "worker_ready"]


def test_install_legacy_scripts_into_a_file_is_one_clear_line(tmp_path: Path) -> None:
    (tmp_path / "afile").write_text("x")
    out = run_fishmp(["install-legacy-scripts", "afile", "--output-root", "out"], str(tmp_path), timeout=60)
    assert out.returncode == 2 and out.stderr.startswith("fishmp: cannot install the legacy scripts in afile")
    assert len(out.stderr.strip().splitlines()) == 1


def test_install_legacy_scripts_needs_the_output_root(tmp_path: Path) -> None:
    out = run_fishmp(["install-legacy-scripts", "scripts"], str(tmp_path), timeout=60)
    assert out.returncode == 2 and "--output-root" in out.stderr and not (tmp_path / "scripts").exists()


def test_a_second_job_on_a_busy_output_directory_is_one_line_and_exit_3(tmp_path: Path, synthetic_job) -> None:
    job = synthetic_job({"alice": ["Long @@slow=5@@ line."]})
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")} | synthetic_env(tmp_path)
    first = subprocess.Popen([sys.executable, "-m", "fishmp", "generate", job, "-o", "out"], cwd=tmp_path, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert first.stderr is not None
        for line in first.stderr:  # wait until the first job holds the directory
            if "segments to synthesize" in line:
                break
        second = run_fishmp(["generate", job, "-o", "out"], str(tmp_path), synthetic_env(tmp_path), timeout=60)
        assert second.returncode == 3, second.stderr
        assert second.stderr.strip().splitlines()[-1].startswith(f"fishmp: output directory {tmp_path / 'out'} is in "
                                                                 f"use by pid {first.pid}")
        assert "Traceback" not in second.stderr and second.stdout == ""
    finally:
        first.communicate(timeout=60)
    assert first.returncode == 0
