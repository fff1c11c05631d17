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
