"""fishmp.job: the output-directory guarantee (no output lands outside it, whatever the job file says)
and output_dir confinement. Pure and fast: real files in tmp_path, no engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from job_files import (
    legacy_encode,
    legacy_generate,
    new_job,
    one_problem,
    write_job,
    write_npy,
    write_wav,
)

from fishmp.job import (
    JobError,
    load_encode_config,
    load_job,
)

# ------------------------------------------------------------------------------------------------ the output guarantee


def _outside_targets(base: Path) -> dict[str, str]:
    return {"OUTSIDE": str(base / "outside"), "SIBLING": str(base) + "/out2"}


HOSTILE_OUTPUTS = [
    # (id, output as written in the job file; OUT / OUTSIDE / SIBLING are substituted, needle)
    ("parent", "../x.wav", "outside the output directory"),
    ("parent-deep", "../../../../../../../../etc/x.wav", "outside"),
    ("parent-after-subdir", "a/b/../../../x.wav", "outside"),
    ("dot-dot-only", "..", "ending in .wav"),
    ("dot", ".", "ending in .wav"),
    ("slash", "/", "ending in .wav"),
    ("absolute-system", "/etc/x.wav", "outside"),
    ("absolute-tmp", "/tmp/x.wav", "outside"),
    ("absolute-outside", "OUTSIDE/x.wav", "outside"),
    ("absolute-sibling-prefix", "SIBLING/x.wav", "outside"),  # /base/out2 shares the prefix /base/out
    ("absolute-out-dir-parent", "OUT/../x.wav", "outside"),
    ("double-slash-absolute", "//etc/x.wav", "outside"),
    ("output-dir-itself", "OUT", "ending in .wav"),
    ("output-dir-trailing-slash", "OUT/", "ending in .wav"),
    ("nul", "x\x00.wav", "control characters"),
    ("nul-truncation", "../../x.wav\x00.wav", "control characters"),
    ("newline", "x\n.wav", "control characters"),
    ("carriage-return", "x\r.wav", "control characters"),
    ("escape", "\x1b[31mx.wav", "control characters"),
    ("delete", "x\x7f.wav", "control characters"),
    ("c1-control", "x\x9b.wav", "control characters"),
    ("lone-surrogate", "x\ud800.wav", "control characters"),
    ("backslash-parent", "..\\x.wav", "backslash"),
    ("windows-absolute", "C:\\x.wav", "backslash"),
    ("not-wav", "x.mp3", "ending in .wav"),
    ("no-suffix", "x", "ending in .wav"),
    ("wav-then-other", "x.wav.sh", "ending in .wav"),
    ("suffix-only", ".wav", "ending in .wav"),
    ("trailing-slash", "x.wav/", "ending in .wav"),
    ("empty", "", "empty"),
    ("blank", "   ", "empty"),
    ("too-long-name", "a" * 300 + ".wav", "longer than 255 bytes"),
    ("symlinked-dir-escape", "link/x.wav", "outside"),
    ("symlinked-dir-parent-trick", "link/../../outside/y.wav", "outside"),
    ("symlinked-file-escape", "planted.wav", "outside"),
    ("dangling-symlink-escape", "dangling.wav", "outside"),
    ("symlink-to-output-dir-parent", "up/x.wav", "outside"),
    ("existing-directory", "adir.wav", "existing directory"),
    # Issue 25: names fishmp's clean-up deletes, and names Windows and macOS machines cannot hold.
    ("fishmp-temp-name", ".fishmp-tmp-0a1b2c3d-4242-0123456789abcdef.wav", "named like fishmp's own temp files"),
    ("fishmp-temp-any-case", ".FishMP-Tmp-x.wav", "named like fishmp's own temp files"),
    ("fishmp-temp-directory", ".fishmp-tmp-d/x.wav", "named like fishmp's own temp files"),
    ("windows-con", "CON.wav", "device name Windows reserves"),
    ("windows-aux-lower", "aux.wav", "device name Windows reserves"),
    ("windows-nul-two-suffixes", "nul.take.wav", "device name Windows reserves"),
    ("windows-com1", "COM1.wav", "device name Windows reserves"),
    ("windows-lpt-superscript", "lpt\u00b9.wav", "device name Windows reserves"),
    ("windows-reserved-directory", "con/x.wav", "device name Windows reserves"),
    ("windows-reserved-trailing-space", "PRN .wav", "device name Windows reserves"),
    ("windows-colon", "scene:1.wav", "characters Windows does not allow"),
    ("windows-question-mark", "why?.wav", "characters Windows does not allow"),
    ("windows-trailing-dot-directory", "take./x.wav", "ends in a space or a dot"),
]


def _hostile_setup(proj: Path) -> Path:
    """An output directory with planted symlinks pointing out of it."""
    out = proj / "out"
    (proj / "outside").mkdir()
    (proj / "outside" / "victim.wav").write_text("precious")
    (out / "adir.wav").mkdir(parents=True)
    (out / "link").symlink_to(proj / "outside")
    (out / "planted.wav").symlink_to(proj / "outside" / "victim.wav")
    (out / "dangling.wav").symlink_to(proj / "outside" / "not-yet.wav")
    (out / "up").symlink_to(proj)
    return out


def _substitute(raw: str, proj: Path, out: Path) -> str:
    targets = _outside_targets(proj)
    if raw.startswith("OUTSIDE"):
        return targets["OUTSIDE"] + raw[len("OUTSIDE"):]
    if raw.startswith("SIBLING"):
        return targets["SIBLING"] + raw[len("SIBLING"):]
    if raw.startswith("OUT"):
        return str(out) + raw[3:]
    return raw


@pytest.mark.parametrize("raw, needle", [c[1:] for c in HOSTILE_OUTPUTS], ids=[c[0] for c in HOSTILE_OUTPUTS])
def test_hostile_output_rejected_new_format(proj: Path, raw: str, needle: str) -> None:
    out = _hostile_setup(proj)
    data = new_job()
    data["segments"][0]["output"] = _substitute(raw, proj, out)
    one_problem(proj, data, 'segment "0001": output', needle, output_dir=out)


@pytest.mark.parametrize("raw, needle", [c[1:] for c in HOSTILE_OUTPUTS], ids=[c[0] for c in HOSTILE_OUTPUTS])
def test_hostile_output_rejected_legacy_generate(proj: Path, raw: str, needle: str) -> None:
    out = _hostile_setup(proj)
    data = legacy_generate(proj)
    del data["tasks"][2]
    data["tasks"][0]["output_file"] = _substitute(raw, proj, out)
    one_problem(proj, data, 'segment "4": output_file', needle, output_dir=out)


@pytest.mark.parametrize("raw, needle", [
    ("../s.npy", "outside"), ("/etc/s.npy", "outside"), ("link/s.npy", "outside"), ("s\x00.npy", "control"),
    ("s.wav", "ending in .npy"), ("s.npy/", "ending in .npy"),
])
def test_hostile_output_npy_rejected_legacy_encode(proj: Path, raw: str, needle: str) -> None:
    out = _hostile_setup(proj)
    data = legacy_encode(proj)
    data["speakers"][0]["output_npy"] = raw
    path = write_job(proj, data, "enc.json")
    with pytest.raises(JobError) as info:
        load_encode_config(str(path), str(out))
    assert len(info.value.problems) == 1 and needle in info.value.problems[0], info.value.problems
    assert 'speaker "3": output_npy' in info.value.problems[0]


def test_hostile_segment_id_cannot_escape_via_default_output(proj: Path) -> None:
    data = new_job()
    del data["segments"][0]["output"]
    data["segments"][0]["id"] = "../../evil"
    one_problem(proj, data, 'segment "../../evil": output', "outside")


def test_output_overwriting_a_reference_is_rejected(proj: Path) -> None:
    data = new_job()
    data["segments"][0]["output"] = "refs/alice.wav"
    one_problem(proj, data, 'segment "0001"', "would overwrite speaker \"alice\"'s reference_audio", output_dir=proj)


@pytest.mark.parametrize("raw", [
    "x.wav", "sub/dir/x.wav", "./x.wav", "a/../x.wav", "sub/../sub2/x.wav", "OUT/abs.wav", "OUT/../out/y.wav",
    "inlink/x.wav", "X.WAV", "name with spaces.wav", "ünïcødé-名前.wav", "~/x.wav", "..x.wav", "x..wav",
])
def test_benign_outputs_stay_inside(proj: Path, raw: str) -> None:
    out = proj / "out"
    (out / "inside").mkdir(parents=True)
    (out / "inlink").symlink_to(out / "inside")  # a symlink that stays inside is fine
    data = new_job()
    data["segments"][0]["output"] = _substitute(raw, proj, out)
    job = load_job(str(write_job(proj, data)), str(out))
    output = job.segments[0].output
    assert os.path.isabs(output)
    assert os.path.commonpath([output, job.output_dir]) == job.output_dir != output
    real_out = os.path.realpath(job.output_dir)
    assert os.path.commonpath([os.path.realpath(output), real_out]) == real_out


def test_every_loaded_output_is_inside_output_dir_through_a_symlinked_output_dir(tmp_path: Path) -> None:
    real = tmp_path / "real_out"
    real.mkdir()
    (tmp_path / "out_link").symlink_to(real)
    write_wav(tmp_path / "refs" / "alice.wav")
    write_npy(tmp_path / "refs" / "bob.npy")
    job = load_job(str(write_job(tmp_path, new_job())), str(tmp_path / "out_link"))
    assert job.output_dir == str(tmp_path / "out_link")
    for seg in job.segments:
        assert seg.output.startswith(job.output_dir + os.sep)
        assert os.path.realpath(seg.output).startswith(str(real) + os.sep)


# ------------------------------------------------------------------------------------------------ output_dir confinement


@pytest.mark.parametrize("fmt", ["new", "generate", "encode"])
def test_job_file_output_dir_must_stay_below_the_job_file(proj: Path, tmp_path_factory, fmt: str) -> None:
    foreign = tmp_path_factory.mktemp("foreign")
    data = {"new": new_job(), "generate": legacy_generate(proj), "encode": legacy_encode(proj)}[fmt]
    if fmt == "generate":
        del data["tasks"][2]  # its absolute output_file names the fixture's own directory
    data["output_dir"] = "../" * 8 + str(foreign).lstrip("/")
    path = write_job(proj, data, "job.json")
    loader = load_encode_config if fmt == "encode" else load_job
    with pytest.raises(JobError) as info:
        loader(str(path))
    assert any('"output_dir"' in p and "is outside the job file's directory" in p and "FISH_OUTPUT_ROOT" in p
               for p in info.value.problems), info.value.problems
    # the operator's root allows it; -o (the operator's choice) is never confined
    assert loader(str(path), output_root=str(foreign)).output_dir == str(foreign)
    assert loader(str(path), str(foreign / "x")).output_dir == str(foreign / "x")
    data["output_dir"] = "sub/../inside"
    assert loader(str(write_job(proj, data, "job.json"))).output_dir == str(proj / "inside")


def test_output_dir_through_a_symlink_out_is_outside(proj: Path, tmp_path_factory) -> None:
    foreign = tmp_path_factory.mktemp("foreign")
    (proj / "escape").symlink_to(foreign)
    data = new_job()
    data["output_dir"] = "escape/out"
    with pytest.raises(JobError, match="is outside the job file's directory"):
        load_job(str(write_job(proj, data)))


def test_the_temp_prefix_is_the_one_fishmps_clean_up_deletes(proj: Path) -> None:
    from fishmp.job.checks import TEMP_PREFIX
    from fishmp.worker.files import TMP_PREFIX, new_temp

    assert TEMP_PREFIX == TMP_PREFIX
    name = os.path.basename(new_temp(str(proj)))  # a real temp name, as a worker makes them
    data = new_job()
    data["segments"][0]["output"] = name + ".wav"
    one_problem(proj, data, "named like fishmp's own temp files")


@pytest.mark.parametrize("first, second", [
    ("A.wav", "a.wav"), ("Take/x.wav", "take/X.WAV"), ("\u00e9t\u00e9.wav", "e\u0301te\u0301.wav"),
    ("STRASSE.wav", "stra\u00dfe.wav"),
], ids=["case", "case-in-directory", "composed-decomposed", "casefold"])
def test_outputs_that_one_windows_or_macos_file_would_hold_collide(proj: Path, first: str, second: str) -> None:
    data = new_job()
    data["segments"][0]["output"], data["segments"][1]["output"] = first, second
    problem = one_problem(proj, data, 'segment "0002": output')
    assert "only in letter case or Unicode form" in problem or "is also the output of" in problem


def test_output_names_are_nfc_normalised(proj: Path) -> None:
    data = new_job()
    data["segments"][0]["output"] = "e\u0301te\u0301/cafe\u0301.wav"
    job = load_job(str(write_job(proj, data)), str(proj / "out"))
    assert job.segments[0].output == str(proj / "out" / "\u00e9t\u00e9" / "caf\u00e9.wav")


# ------------------------------------------------------------------------------------------------ reference paths


@pytest.mark.parametrize("how, needle", [
    ("self-loop", "is a symbolic link loop"), ("two-link-loop", "is a symbolic link loop"),
    ("loop-in-a-directory", "is a symbolic link loop"), ("broken", "is a broken symbolic link (to "),
    ("missing", "does not exist"),
])
@pytest.mark.parametrize("key", ["reference_audio", "prompt_tokens"])
def test_an_unreachable_reference_says_why(proj: Path, how: str, needle: str, key: str) -> None:
    refs = proj / "refs"
    name = {"self-loop": "loop.x", "two-link-loop": "a.x", "loop-in-a-directory": "d/v.x", "broken": "gone.x",
            "missing": "nope.x"}[how]
    if how == "self-loop":
        (refs / "loop.x").symlink_to(refs / "loop.x")
    elif how == "two-link-loop":
        (refs / "a.x").symlink_to(refs / "b.x")
        (refs / "b.x").symlink_to(refs / "a.x")
    elif how == "loop-in-a-directory":
        (refs / "d").symlink_to(refs / "d")
    elif how == "broken":
        (refs / "gone.x").symlink_to(refs / "never-written.wav")
    data = new_job()
    speaker = "alice" if key == "reference_audio" else "bob"
    data["speakers"][speaker][key] = f"refs/{name}"
    problem = one_problem(proj, data, f'speaker "{speaker}": {key} refs/{name}', needle)
    if how != "missing":
        assert "does not exist" not in problem.split("(to ")[0]


def test_a_legacy_npy_file_that_is_a_loop_says_so(proj: Path) -> None:
    data = legacy_generate(proj)
    (proj / "legacy" / "loop.npy").symlink_to(proj / "legacy" / "loop.npy")
    data["tasks"] = [dict(data["tasks"][0], npy_file="legacy/loop.npy")]
    one_problem(proj, data, "npy_file legacy/loop.npy", "is a symbolic link loop")


# ------------------------------------------------------------------------------------------------ FISH_OUTPUT_ROOT


@pytest.mark.parametrize("fmt", ["new", "generate", "encode"])
def test_with_a_root_set_only_the_root_counts(proj: Path, tmp_path_factory, fmt: str) -> None:
    """Issue 25 item 5: a job file (or a backend's temp config) in the tree it writes to is confined by the root."""
    root = tmp_path_factory.mktemp("root")
    data = {"new": new_job(), "generate": legacy_generate(proj), "encode": legacy_encode(proj)}[fmt]
    if fmt == "generate":
        del data["tasks"][2]
    data["output_dir"] = "out"  # beside the job file: allowed without a root
    path = write_job(proj, data, "job.json")
    loader = load_encode_config if fmt == "encode" else load_job
    assert loader(str(path)).output_dir == str(proj / "out")
    with pytest.raises(JobError) as info:
        loader(str(path), output_root=str(root))
    (problem,) = [p for p in info.value.problems if '"output_dir"' in p]
    assert f"is outside FISH_OUTPUT_ROOT {root}" in problem and "job file's directory" not in problem
    data["output_dir"] = str(root / "dub")
    assert loader(str(write_job(proj, data, "job.json")), output_root=str(root)).output_dir == str(root / "dub")


def test_a_relative_root_is_resolved_and_shown_resolved(proj: Path, tmp_path_factory, monkeypatch) -> None:
    cwd = tmp_path_factory.mktemp("cwd")
    (cwd / "dubs").mkdir()
    monkeypatch.chdir(cwd)
    data = new_job()
    data["output_dir"] = "out"
    path = write_job(proj, data)
    with pytest.raises(JobError) as info:
        load_job(str(path), output_root="dubs")
    assert f"FISH_OUTPUT_ROOT 'dubs' (resolved against the current directory: {cwd / 'dubs'})" in str(info.value)
    data["output_dir"] = str(cwd / "dubs" / "film")
    assert load_job(str(write_job(proj, data)), output_root="dubs").output_dir == str(cwd / "dubs" / "film")
