"""The dubbing backend's contract, played end to end through the shims `install-legacy-scripts` writes.

The client below does what the backend's batch cloner does (our own code, same contract): it writes a config to a
temp file, runs ``[its python, <its dir>/<script>, <config>]`` from another directory with stderr merged into
stdout, reads the output line by line as it comes, parses progress with its three patterns, raises on a non-zero
exit, and parses the last line as JSON. Real processes, real files, the synthetic engine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import run_fishmp, synthetic_env

from fishmp.legacy import SCRIPTS, exit_code, install_scripts, shim_text

PROGRESS = [("[BatchGen]", re.compile(r"进度:\s*(\d+)/(\d+)")),
            ("All done!", re.compile(r"Processed\s+(\d+)/(\d+)\s+segments")),
            ("[Main]", re.compile(r"Generated\s+(\d+)/(\d+)\s+segments"))]


ECHOED = ("[BatchGen]", "[Worker", "[Main]", "[GPU", "tokens/sec", "INFO")  # what the backend's client prints


ENCODE_ECHOED = ("[Encode]", "INFO")  # what its encode step prints


def echoed(lines: list[str], markers: tuple[str, ...] = ECHOED) -> list[str]:
    return [line for line in lines if any(marker in line for marker in markers)]


class BackendRun:
    def __init__(self, lines: list[str], progress: list[tuple[str, int, int]], live: int, returncode: int) -> None:
        self.lines, self.progress, self.live, self.returncode = lines, progress, live, returncode

    @property
    def result(self) -> object:
        return json.loads(self.lines[-1])


def backend_call(python: str, script: Path, config: dict, cwd: Path, env: dict[str, str]) -> BackendRun:
    """Run a legacy script the way the backend does (see the module docstring)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as f:
        json.dump(config, f, ensure_ascii=False, indent=2)
    try:
        proc = subprocess.Popen([python, str(script), f.name], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True, encoding="utf-8", errors="ignore", cwd=cwd, bufsize=1, env=env,
                                umask=0o022)
        lines, progress, live = [], [], 0
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip()
            if not line:
                continue
            lines.append(line)
            for marker, pattern in PROGRESS:
                if marker in line and (m := pattern.search(line)):
                    progress.append((marker, int(m.group(1)), int(m.group(2))))
                    live += proc.poll() is None  # read while the job still runs: streamed, not buffered
                    break
        proc.wait(timeout=120)
    finally:
        os.unlink(f.name)
    return BackendRun(lines, progress, live, proc.returncode)


@pytest.fixture
def backend(tmp_path: Path) -> dict:
    """A backend directory with the shims, its cwd (elsewhere), its output root and its environment."""
    scripts, cwd, root = tmp_path / "backend", tmp_path / "fish-speech", tmp_path / "app-output"
    cwd.mkdir()
    install = run_fishmp(["install-legacy-scripts", str(scripts), "--output-root", str(root)], cwd=str(tmp_path),
                         timeout=60)
    assert install.returncode == 0, install.stderr
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
    env.update(synthetic_env(tmp_path, FISH_CPU_WORKERS="2", FISH_SYNTHETIC_SECONDS_PER_CHAR="0.01"))
    # the backend's own interpreter need not have fishmp: the shim execs the one that installed it
    python = shutil.which("python3") or sys.executable
    return {"scripts": scripts, "cwd": cwd, "root": root, "env": env, "python": python, "tmp": tmp_path}


def _readable_by_others(path: str) -> bool:
    return bool(os.stat(path).st_mode & stat.S_IROTH)


def test_backend_contract_end_to_end_through_the_shims(backend: dict, make_wav) -> None:
    tmp, root = backend["tmp"], backend["root"]
    voices = tmp / "voices"
    voices.mkdir()
    for sid in (0, 1):
        make_wav(str(voices / f"spk{sid}.wav"), 1.0)
    npy_dir = root / "job1" / "npy"
    encode_config = {"mode": "encode", "fish_speech_dir": str(backend["cwd"]), "checkpoint_dir": "/nowhere",
                     "output_dir": str(npy_dir), "speakers": [
                         {"speaker_id": sid, "reference_audio": str(voices / f"spk{sid}.wav"),
                          "reference_text": f"I am speaker {sid}.", "output_npy": str(npy_dir / f"speaker_{sid}_codes.npy")}
                         for sid in (0, 1, 2)]}  # speaker 2's reference does not exist: skipped
    enc = backend_call(backend["python"], backend["scripts"] / "fish_simple_encode.py", encode_config, backend["cwd"],
                       backend["env"])
    assert enc.returncode == 0, enc.lines
    npys = {item["speaker_id"]: item["npy_file"] for item in enc.result}
    assert sorted(npys) == [0, 1]  # integer ids, as the backend's dict keys
    assert all(os.path.isfile(p) and _readable_by_others(p) for p in npys.values())
    # the encode step's client echoes only [Encode] / INFO lines: why speaker 2 was dropped must be among them
    assert any("skipped" in line and 'speaker "2"' in line for line in echoed(enc.lines, ENCODE_ECHOED)), enc.lines

    texts = ["Hello there.", "", "This one fails @@error@@.", "Good morning.", "See you @@slow=1@@ later.", "Bye."]
    tasks = [{"segment_index": i, "speaker_id": i % 2, "target_text": text, "npy_file": npys[i % 2],
              "reference_text": f"I am speaker {i % 2}.", "output_file": str(root / "job1" / f"segment_{i}.wav")}
             for i, text in enumerate(texts)]
    config = {"mode": "generate", "fish_speech_dir": str(backend["cwd"]), "checkpoint_dir": "/nowhere",
              "output_dir": str(root / "job1"), "tasks": tasks}
    good = {0, 3, 4, 5}
    for script in ("fish_batch_generate.py", "fish_multiprocess_generate.py"):  # the second run resumes
        gen = backend_call(backend["python"], backend["scripts"] / script, config, backend["cwd"], backend["env"])
        assert gen.returncode == 0, gen.lines
        mapping = {int(k): v for k, v in gen.result.items()}
        assert set(mapping) == good
        assert all(mapping[i] == tasks[i]["output_file"] and _readable_by_others(mapping[i]) for i in good)
        assert not os.path.exists(tasks[1]["output_file"]) and not os.path.exists(tasks[2]["output_file"])
        text = "\n".join(gen.lines)
        assert 'segment "1": target_text is empty' in text and "FAILED" in text
        # the backend's client echoes only lines with its markers: the failure must be among them
        assert any("2 FAILED (engine_error)" in line for line in echoed(gen.lines)), gen.lines
        assert any('skipped: segment "1": target_text is empty' in line for line in echoed(gen.lines))
        counts = [n for _, n, _ in gen.progress]
        assert {m for _, _, m in gen.progress} == {6} and counts == sorted(counts) and counts[-1] == 6
        assert {marker for marker, _, _ in gen.progress} == {"[BatchGen]", "[Main]", "All done!"}
    manifest = json.loads((root / "job1" / "manifest.json").read_text())
    assert _readable_by_others(str(root / "job1" / "manifest.json"))
    assert "failed" in json.dumps(manifest)


def test_progress_is_streamed_while_the_job_runs(backend: dict, make_wav) -> None:
    tmp = backend["tmp"]
    make_wav(str(tmp / "v.wav"), 1.0)
    npy = backend["root"] / "s.npy"
    enc = backend_call(backend["python"], backend["scripts"] / "fish_simple_encode.py",
                       {"mode": "encode", "output_dir": str(backend["root"]), "speakers": [
                           {"speaker_id": 7, "reference_audio": str(tmp / "v.wav"), "reference_text": "Seven.",
                            "output_npy": str(npy)}]}, backend["cwd"], backend["env"])
    assert enc.returncode == 0 and enc.result == [{"speaker_id": 7, "npy_file": str(npy)}]
    tasks = [{"segment_index": i, "speaker_id": 7, "target_text": "Line @@slow=0.4@@.", "npy_file": str(npy),
              "reference_text": "Seven.", "output_file": str(backend["root"] / f"seg_{i}.wav")} for i in range(6)]
    t0 = time.monotonic()
    gen = backend_call(backend["python"], backend["scripts"] / "fish_batch_generate.py",
                       {"mode": "generate", "output_dir": str(backend["root"]), "tasks": tasks}, backend["cwd"],
                       backend["env"])
    assert gen.returncode == 0 and len(gen.result) == 6, gen.lines
    assert gen.live >= 4, (gen.live, time.monotonic() - t0)  # lines arrived before the process ended


def test_nothing_done_is_still_an_error_and_a_bad_config_is_exit_2(backend: dict) -> None:
    bad = backend_call(backend["python"], backend["scripts"] / "fish_batch_generate.py",
                       {"mode": "generate", "tasks": "nope"}, backend["cwd"], backend["env"])
    assert bad.returncode == 2 and any('"tasks" must be a list' in line for line in bad.lines)
    env = {**backend["env"], "FISH_SYNTHETIC_LOAD_FAULT": "raise", "FISH_MAX_RESTARTS": "0"}
    npy = backend["tmp"] / "t.npy"
    np.save(npy, np.zeros((10, 5), dtype=np.int64))
    tasks = [{"segment_index": 0, "speaker_id": 1, "target_text": "Hi.", "npy_file": str(npy),
              "reference_text": "r", "output_file": str(backend["root"] / "seg_0.wav")}]
    none = backend_call(backend["python"], backend["scripts"] / "fish_multiprocess_generate.py",
                        {"mode": "generate", "output_dir": str(backend["root"]), "tasks": tasks}, backend["cwd"], env)
    assert none.returncode == 1 and none.result == {}  # no worker: nothing could be done


def test_a_temp_config_under_tmp_writes_only_below_the_output_root(backend: dict, make_wav) -> None:
    """Issue 25 item 5: the backend's configs are temp files under /tmp; with the shims' FISH_OUTPUT_ROOT set, an
    output_dir elsewhere under /tmp is refused (the config's own directory no longer counts)."""
    make_wav(str(backend["tmp"] / "v.wav"), 1.0)
    elsewhere = Path(tempfile.gettempdir()) / f"fishmp-test-elsewhere-{os.getpid()}"
    cfg = {"mode": "encode", "output_dir": str(elsewhere), "speakers": [
        {"speaker_id": 1, "reference_audio": str(backend["tmp"] / "v.wav"), "reference_text": "One."}]}
    try:
        enc = backend_call(backend["python"], backend["scripts"] / "fish_simple_encode.py", cfg, backend["cwd"],
                           backend["env"])
        assert enc.returncode == 2 and not elsewhere.exists(), enc.lines
        assert any(f"is outside FISH_OUTPUT_ROOT {backend['root']}" in line for line in enc.lines), enc.lines
    finally:
        shutil.rmtree(elsewhere, ignore_errors=True)


def test_a_duplicate_speaker_names_the_entry_it_leaves_out(backend: dict, make_wav) -> None:
    for name in ("first", "second"):
        make_wav(str(backend["tmp"] / f"{name}.wav"), 1.0 if name == "first" else 2.0)
    out = backend["root"] / "npy"
    cfg = {"mode": "encode", "output_dir": str(out), "speakers": [
        {"speaker_id": 1, "reference_audio": str(backend["tmp"] / "first.wav"), "reference_text": "One."},
        {"speaker_id": 1, "reference_audio": str(backend["tmp"] / "second.wav"), "reference_text": "Again.",
         "output_npy": str(out / "other.npy")}]}
    enc = backend_call(backend["python"], backend["scripts"] / "fish_simple_encode.py", cfg, backend["cwd"],
                       backend["env"])
    assert enc.returncode == 0 and enc.result == [{"speaker_id": 1, "npy_file": str(out / "speaker_1.npy")}]
    assert any('skipped: speakers[1] (speaker "1"): duplicate speaker_id: speakers[0] already defines it' in line
               for line in echoed(enc.lines, ENCODE_ECHOED)), enc.lines


def test_encode_rerun_reuses_the_cache_and_failures_are_echoed(backend: dict, make_wav) -> None:
    """Issue 32 item 4: a re-run of the encode step takes its speakers from the reference cache (no worker, no model
    load) and leaves an npy whose content would not change; a reference that cannot be read is echoed."""
    tmp, out = backend["tmp"], backend["root"] / "npy"
    make_wav(str(tmp / "one.wav"), 1.0)
    (tmp / "broken.wav").write_bytes(b"RIFF....WAVEfmt nothing more")
    cfg = {"mode": "encode", "output_dir": str(out), "speakers": [
        {"speaker_id": 1, "reference_audio": str(tmp / "one.wav"), "reference_text": "One."},
        {"speaker_id": 2, "reference_audio": str(tmp / "broken.wav"), "reference_text": "Two."}]}
    script = backend["scripts"] / "fish_simple_encode.py"
    first = backend_call(backend["python"], script, cfg, backend["cwd"], backend["env"])
    npy = out / "speaker_1.npy"
    assert first.returncode == 0 and first.result == [{"speaker_id": 1, "npy_file": str(npy)}], first.lines
    assert any("speaker 2 failed" in line and "broken.wav" in line
               for line in echoed(first.lines, ENCODE_ECHOED)), first.lines
    stamp, content = os.stat(npy).st_mtime_ns, npy.read_bytes()
    cfg["speakers"] = cfg["speakers"][:1]
    again = backend_call(backend["python"], script, cfg, backend["cwd"], backend["env"])
    assert again.returncode == 0 and again.result == first.result, again.lines
    assert any("speaker 1" in line and "from the reference cache, unchanged" in line
               for line in echoed(again.lines, ENCODE_ECHOED)), again.lines
    assert not any("worker" in line for line in again.lines), again.lines  # no worker started, no model loaded
    assert os.stat(npy).st_mtime_ns == stamp and npy.read_bytes() == content  # left as it was
    npy.unlink()  # gone: written again from the cache, still without a worker
    third = backend_call(backend["python"], script, cfg, backend["cwd"], backend["env"])
    assert third.returncode == 0 and npy.read_bytes() == content, third.lines
    assert not any("worker" in line for line in third.lines), third.lines


def test_install_keeps_the_backends_own_scripts_and_honours_the_environment(tmp_path: Path) -> None:
    (tmp_path / "fish_batch_generate.py").write_text("print('the original')\n")
    lines = install_scripts(str(tmp_path))
    assert (tmp_path / "fish_batch_generate.py.orig").read_text() == "print('the original')\n"
    assert any(".orig" in line for line in lines) and sorted(os.listdir(tmp_path)) == sorted(
        [*SCRIPTS, "fish_batch_generate.py.orig"])
    install_scripts(str(tmp_path))  # again: shims are replaced, the .orig is left alone
    assert (tmp_path / "fish_batch_generate.py.orig").read_text() == "print('the original')\n"
    code = shim_text("generate", sys.executable, None).splitlines()
    assert code[2:] == ["import os, sys", f'os.execv({sys.executable!r}, [{sys.executable!r}, "-m", "fishmp", '
                        "'generate', *sys.argv[1:]])"]
    probe = tmp_path / "probe.py"  # a shim whose target prints what it got: the real environment wins
    probe.write_text(shim_text("generate", sys.executable, "/srv/out").replace('"-m", "fishmp", ', '"-c", '
                     '"import os, sys; print(os.environ[\'FISH_OUTPUT_ROOT\'], sys.argv[1:])", '))
    out = subprocess.run([sys.executable, str(probe), "cfg.json"], capture_output=True, text=True, timeout=30,
                         env={**os.environ, "FISH_OUTPUT_ROOT": "/mine"})
    assert out.stdout.strip() == "/mine ['generate', 'cfg.json']"
    out = subprocess.run([sys.executable, str(probe), "x"], capture_output=True, text=True, timeout=30,
                         env={k: v for k, v in os.environ.items() if k != "FISH_OUTPUT_ROOT"})
    assert out.stdout.strip() == "/srv/out ['generate', 'x']"


@pytest.mark.parametrize("done, code, expected", [(5, 1, 0), (0, 1, 1), (5, 0, 0), (3, 130, 130), (0, 143, 143)])
def test_legacy_exit_code(done: int, code: int, expected: int) -> None:
    assert exit_code(done, code) == expected


@pytest.mark.slow
def test_shims_with_the_fish_engine_in_one_process(backend: dict, tiny_checkpoint: str, make_wav) -> None:
    """FISH_MULTIPROCESS_MODE=false: Fish Speech inside the main process. Its logs must not follow the result line
    on the merged stream."""
    env = {k: v for k, v in backend["env"].items() if not k.startswith("FISH_")}
    env.update({"FISH_CACHE_DIR": str(backend["tmp"] / "cache"), "FISH_MULTIPROCESS_MODE": "false"})
    root = backend["root"]
    make_wav(str(backend["tmp"] / "ref.wav"), 1.5, 16000)
    npy = str(root / "npy" / "speaker_1_codes.npy")
    enc = backend_call(backend["python"], backend["scripts"] / "fish_simple_encode.py",
                       {"mode": "encode", "checkpoint_dir": tiny_checkpoint, "output_dir": str(root / "npy"),
                        "speakers": [{"speaker_id": 1, "reference_audio": str(backend["tmp"] / "ref.wav"),
                                      "reference_text": "Hello.", "output_npy": npy}]}, backend["cwd"], env)
    assert enc.returncode == 0 and enc.result == [{"speaker_id": 1, "npy_file": npy}], enc.lines
    tasks = [{"segment_index": i, "speaker_id": 1, "target_text": text, "npy_file": npy, "reference_text": "Hello.",
              "output_file": str(root / f"segment_{i}.wav")} for i, text in enumerate(["Good morning.", "", "Bye."])]
    gen = backend_call(backend["python"], backend["scripts"] / "fish_batch_generate.py",
                       {"mode": "generate", "checkpoint_dir": tiny_checkpoint, "output_dir": str(root),
                        "max_new_tokens": 8, "tasks": tasks}, backend["cwd"], env)
    assert gen.returncode == 0, gen.lines
    assert gen.result == {"0": tasks[0]["output_file"], "2": tasks[2]["output_file"]}
    assert [n for _, n, _ in gen.progress][-1] == 3 and any("1 workers" in line for line in gen.lines)
