"""fishmp.job: the three input formats (the new job format, legacy generate and encode configs) and
skipping invalid items. Pure and fast: real files in tmp_path, no engine."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from job_files import (
    legacy_encode,
    legacy_generate,
    new_job,
    one_problem,
    problems_of,
    write_job,
    write_npy,
    write_wav,
)

from fishmp.job import (
    EncodeItem,
    EncodeJob,
    Job,
    JobError,
    Params,
    Speaker,
    default_output_dir,
    detect_format,
    encode_job_from_dict,
    job_from_dict,
    load_config,
    load_encode_config,
    load_job,
)

# ------------------------------------------------------------------------------------------------ new format


def test_new_format_parses(proj: Path) -> None:
    path = write_job(proj, new_job())
    out = proj / "dub"
    job = load_job(str(path), str(out))
    assert isinstance(job, Job)
    assert job.legacy is None and job.checkpoint_dir is None
    assert job.source == str(path)
    assert job.output_dir == str(out)
    assert job.speakers == {
        "alice": Speaker("alice", "Hello, I am Alice.", reference_audio=str(proj / "refs" / "alice.wav")),
        "bob": Speaker("bob", "Bob here.", prompt_tokens=str(proj / "refs" / "bob.npy")),
    }
    assert [s.id for s in job.segments] == ["0001", "0002", "0003"]  # third: default id = 1-based position
    assert [s.order for s in job.segments] == [0, 1, 2]
    assert [s.speaker for s in job.segments] == ["alice", "bob", "alice"]
    assert [s.output for s in job.segments] == [
        str(out / "0001.wav"), str(out / "0002.wav"), str(out / "alice" / "third.wav")]
    assert all(s.legacy_index is None for s in job.segments)
    assert job.segments[0].params == Params(temperature=0.7, top_p=0.8)
    # per-segment params override the job's, the rest is inherited
    assert job.segments[1].params == Params(temperature=0.5, top_p=0.8, seed=7)
    assert isinstance(job.segments[1].params.temperature, float)


def test_relative_references_resolve_against_job_file_not_cwd(tmp_path: Path, monkeypatch) -> None:
    jobdir = tmp_path / "jobs" / "ep1"
    write_wav(jobdir / "refs" / "alice.wav")
    write_npy(jobdir / "refs" / "bob.npy")
    path = write_job(jobdir, new_job())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    job = load_job(os.path.relpath(path, elsewhere))  # relative job path, default output dir
    assert job.speakers["alice"].reference_audio == str(jobdir / "refs" / "alice.wav")
    assert job.speakers["bob"].prompt_tokens == str(jobdir / "refs" / "bob.npy")
    assert job.output_dir == str(elsewhere / "fishmp-out" / "job")  # relative to cwd, named after the stem
    assert job.segments[0].output == str(elsewhere / "fishmp-out" / "job" / "0001.wav")
    assert os.path.isabs(job.source)


def test_absolute_reference_paths_and_absolute_output_inside(proj: Path) -> None:
    data = new_job()
    data["speakers"]["alice"]["reference_audio"] = str(proj / "refs" / "alice.wav")
    data["speakers"]["bob"]["prompt_tokens"] = "../refs/bob.npy"  # relative to the job file in sub/
    data["segments"][0]["output"] = str(proj / "out" / "abs.wav")
    job = load_job(str(write_job(proj / "sub", data)), str(proj / "out"))
    assert job.speakers["alice"].reference_audio == str(proj / "refs" / "alice.wav")
    assert job.speakers["bob"].prompt_tokens == str(proj / "refs" / "bob.npy")
    assert job.segments[0].output == str(proj / "out" / "abs.wav")


def test_output_dir_key_in_new_format(proj: Path) -> None:
    data = new_job()
    data["output_dir"] = "rendered"
    path = write_job(proj, data)
    assert load_job(str(path)).output_dir == str(proj / "rendered")
    assert load_job(str(path), str(proj / "override")).output_dir == str(proj / "override")


def test_job_from_dict(proj: Path) -> None:
    job = job_from_dict(new_job(), str(proj), str(proj / "o"))
    assert job.source is None
    assert job.speakers["alice"].reference_audio == str(proj / "refs" / "alice.wav")
    with pytest.raises(JobError) as info:
        job_from_dict({"speakers": {}, "segments": []}, str(proj), str(proj / "o"))
    assert any("no segments" in p for p in info.value.problems)


def test_segment_order_kept_and_unused_speaker_allowed(proj: Path) -> None:
    data = new_job()
    data["segments"] = [{"id": i, "speaker": "alice", "text": f"line {i}"} for i in ("z", "a", "m")]
    job = load_job(str(write_job(proj, data)), str(proj / "o"))
    assert [s.id for s in job.segments] == ["z", "a", "m"]
    assert "bob" in job.speakers


def test_params_merged_and_to_dict() -> None:
    job = Params(temperature=0.7, top_p=0.8, seed=1)
    seg = Params(temperature=0.9, max_new_tokens=100)
    assert job.merged(seg) == Params(temperature=0.9, top_p=0.8, max_new_tokens=100, seed=1)
    assert job.merged(Params()) == job
    assert Params().merged(job) == job
    assert job.to_dict() == {"temperature": 0.7, "top_p": 0.8, "seed": 1}
    assert Params().to_dict() == {}
    assert Params.from_dict({"temperature": 1, "seed": 3}) == Params(temperature=1.0, seed=3)
    with pytest.raises(JobError) as info:
        Params.from_dict({"temperature": 0, "top_k": 5})
    assert len(info.value.problems) == 2


# ------------------------------------------------------------------------------------------------ legacy


def test_legacy_generate_parses(proj: Path) -> None:
    path = write_job(proj, legacy_generate(proj), "generate_config.json")
    job = load_job(str(path))
    out = proj / "legacy"
    assert job.legacy == "generate"
    assert job.output_dir == str(out)  # the config's output_dir, resolved against the config's directory
    assert job.checkpoint_dir == str(proj / "checkpoints" / "openaudio-s1-mini")
    assert job.speakers == {
        "3": Speaker("3", "Ref three.", prompt_tokens=str(out / "speaker_3.npy")),
        "5": Speaker("5", "Ref five.", prompt_tokens=str(out / "speaker_5.npy")),
    }
    assert [(s.id, s.legacy_index, s.order, s.speaker) for s in job.segments] == [
        ("4", 4, 0, "3"), ("0", 0, 1, "5"), ("9", 9, 2, "3")]
    assert [s.output for s in job.segments] == [
        str(out / "seg_4.wav"), str(out / "seg_0.wav"), str(out / "wavs" / "seg_9.wav")]
    # the backends' scripts sampled at 0.7 / 0.7 / 1.2: legacy configs keep those defaults, overridable
    assert job.segments[0].params == Params(temperature=0.6, top_p=0.7, repetition_penalty=1.2)
    assert job.segments[1].params == Params(temperature=0.6, top_p=0.9, repetition_penalty=1.2, seed=11)


def test_legacy_generate_output_dir_override(proj: Path) -> None:
    data = legacy_generate(proj)
    del data["tasks"][2]  # its absolute output lies in the config's output_dir, not the override
    job = load_job(str(write_job(proj, data)), str(proj / "elsewhere"))
    assert job.output_dir == str(proj / "elsewhere")
    assert job.segments[0].output == str(proj / "elsewhere" / "seg_4.wav")
    # speakers' npy files still resolve against the config's directory
    assert job.speakers["3"].prompt_tokens == str(proj / "legacy" / "speaker_3.npy")


def test_legacy_generate_absolute_output_outside_override_is_rejected(proj: Path) -> None:
    problems = problems_of(proj, legacy_generate(proj), proj / "elsewhere")
    assert len(problems) == 1 and 'segment "9": output_file' in problems[0] and "outside" in problems[0]


def test_legacy_generate_without_mode_is_detected(proj: Path) -> None:
    data = legacy_generate(proj)
    del data["mode"]
    assert detect_format(data) == "generate"
    assert load_job(str(write_job(proj, data))).legacy == "generate"


def test_legacy_generate_nested_params_and_string_speaker_ids(proj: Path) -> None:
    data = legacy_generate(proj)
    data["tasks"][0]["params"] = {"repetition_penalty": 1.3}
    data["tasks"][2]["speaker_id"] = "3"  # "3" and 3 are the same speaker
    job = load_job(str(write_job(proj, data)))
    assert job.segments[0].params == Params(temperature=0.6, top_p=0.7, repetition_penalty=1.3)
    assert set(job.speakers) == {"3", "5"}


@pytest.mark.parametrize("field, value, needle", [
    ("npy_file", "legacy/speaker_5.npy", "npy_file"),
    ("reference_text", "Something else.", "different reference_text"),
])
def test_legacy_generate_conflicting_speaker(proj: Path, field: str, value: str, needle: str) -> None:
    data = legacy_generate(proj)
    data["tasks"][2][field] = value
    one_problem(proj, data, 'speaker "3"', needle, 'segment "9"', 'segment "4"', output_dir=proj / "legacy")


def test_legacy_generate_problems(proj: Path) -> None:
    data = legacy_generate(proj)
    data["tasks"] = [
        {"segment_index": 1, "speaker_id": 3, "target_text": "ok", "npy_file": "legacy/missing.npy",
         "reference_text": "r", "output_file": "a.wav"},
        {"segment_index": 1, "speaker_id": 5, "target_text": " \n ", "npy_file": "legacy/speaker_5.npy",
         "reference_text": "", "output_file": "a.wav", "temperature": 3},
        {"segment_index": -2, "speaker_id": True, "target_text": 5, "output_file": "../up.wav"},
        "not a task",
    ]
    problems = problems_of(proj, data)
    text = "\n".join(problems)
    for needle in [
        'speaker "3" (segment "1"): npy_file legacy/missing.npy',
        'tasks[1] (segment "1"): duplicate segment_index: tasks[0] already has it',
        'tasks[1] (segment "1"): target_text is empty',
        'speaker "5" (tasks[1] (segment "1")): reference_text is empty',
        'tasks[1] (segment "1"): temperature must be',
        'tasks[1] (segment "1"): output_file \'a.wav\' is also the output of segment "1"',
        'tasks[2]: "segment_index" must be an integer >= 0',
        'tasks[2]: "speaker_id" must be an integer or a non-empty string',
        "tasks[2]: target_text must be a string",
        "tasks[2]: output_file '../up.wav' is outside",
        "tasks[3]: must be an object",
    ]:
        assert needle in text, (needle, problems)


def test_legacy_generate_missing_tasks(proj: Path) -> None:
    one_problem(proj, {"mode": "generate", "output_dir": "x"}, 'missing "tasks"')
    one_problem(proj, {"mode": "generate", "tasks": []}, "no tasks")
    one_problem(proj, {"mode": "generate", "tasks": {}}, '"tasks" must be a list')


def test_legacy_encode_parses(proj: Path) -> None:
    path = write_job(proj, legacy_encode(proj), "encode_config.json")
    enc = load_encode_config(str(path))
    out = proj / "npys"
    assert enc == EncodeJob(
        items=(
            EncodeItem(3, str(proj / "voices" / "three.wav"), "Three.", str(out / "s3.npy")),
            EncodeItem("five", str(proj / "voices" / "five.wav"), "Five.", str(out / "speaker_five.npy")),
        ),
        output_dir=str(out), checkpoint_dir="/models/s1-mini", source=str(path), listed=2)
    assert load_config(str(path)) == enc
    assert isinstance(load_config(str(write_job(proj, new_job(), "new.json"))), Job)
    with pytest.raises(JobError, match="load_encode_config"):
        load_job(str(path))
    with pytest.raises(JobError, match="not a legacy encode config"):
        load_encode_config(str(write_job(proj, new_job(), "new.json")))
    assert encode_job_from_dict(legacy_encode(proj), str(proj), str(proj / "o")).items[0].output_npy == str(
        proj / "o" / "s3.npy")


def test_legacy_encode_problems(proj: Path) -> None:
    data = legacy_encode(proj)
    data["speakers"] += [
        {"speaker_id": 3, "reference_audio": "voices/nope.wav", "reference_text": " ", "output_npy": "../s.npy"},
        {"reference_audio": "voices/three.wav", "reference_text": "x", "output_npy": "s3.wav"},
    ]
    text = "\n".join(_encode_problems(proj, data))
    for needle in [
        'speakers[2] (speaker "3"): duplicate speaker_id: speakers[0] already defines it',
        'speakers[2] (speaker "3"): reference_audio voices/nope.wav',
        'speakers[2] (speaker "3"): reference_text is empty',
        "speakers[2] (speaker \"3\"): output_npy '../s.npy' is outside",
        'speakers[3]: missing "speaker_id"',
        "speakers[3]: output_npy 's3.wav' must be a file name ending in .npy",
    ]:
        assert needle in text, (needle, text)
    empty = _encode_problems(proj, {"mode": "encode", "speakers": []})
    assert empty == ['config: "speakers" is empty: nothing to encode']


def _encode_problems(proj: Path, data: dict) -> list[str]:
    path = write_job(proj, data, "enc.json")
    with pytest.raises(JobError) as info:
        load_encode_config(str(path))
    return info.value.problems


def test_default_output_dir(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    job_file = str(tmp_path / "a" / "episode.json")
    assert default_output_dir(job_file, {"mode": "generate", "output_dir": "../o"}) == str(tmp_path / "o")
    assert default_output_dir(job_file, {"mode": "encode", "output_dir": "/abs/o"}) == "/abs/o"
    assert default_output_dir(job_file, {"speakers": {}}) == str(tmp_path / "fishmp-out" / "episode")
    assert default_output_dir(job_file, [1, 2]) == str(tmp_path / "fishmp-out" / "episode")
    assert default_output_dir(job_file, {"output_dir": 5}) == str(tmp_path / "fishmp-out" / "episode")


# ------------------------------------------------------------------------------------------------ skipping invalid items


def test_skip_invalid_leaves_out_bad_segments_and_their_speakers_segments(proj: Path) -> None:
    data = new_job()
    data["speakers"]["bob"]["prompt_tokens"] = "refs/missing.npy"  # spoils bob, so segment 0002
    data["segments"][0]["text"] = "\u200b\u200d "  # only zero-width characters: empty text
    data["segments"].append({"id": "0004", "speaker": "alice", "text": "Fourth."})
    path = write_job(proj, data)
    with pytest.raises(JobError):
        load_job(str(path), str(proj / "o"))  # strict by default
    job = load_job(str(path), str(proj / "o"), skip_invalid=True)
    assert [s.id for s in job.segments] == ["0003", "0004"] and list(job.speakers) == ["alice"]
    assert job.items == 4
    text = "\n".join(job.skipped)
    assert 'speaker "bob": prompt_tokens refs/missing.npy' in text
    assert 'segment "0001": text is empty (only whitespace, control or zero-width characters)' in text
    assert 'segment "0002": skipped: speaker "bob" has a problem' in text


def test_skip_invalid_still_rejects_config_level_problems_and_empty_results(proj: Path) -> None:
    data = new_job()
    data["params"]["temperature"] = 5  # the whole job's params: not an item
    with pytest.raises(JobError, match="job params: temperature"):
        load_job(str(write_job(proj, data)), str(proj / "o"), skip_invalid=True)
    data = new_job()
    for seg in data["segments"]:
        seg["text"] = ""
    with pytest.raises(JobError, match="nothing left to synthesize"):
        load_job(str(write_job(proj, data)), str(proj / "o"), skip_invalid=True)


def test_legacy_configs_skip_invalid_items_when_asked_per_format(proj: Path) -> None:
    data = legacy_generate(proj)
    data["tasks"][1]["target_text"] = "  "
    data["tasks"].append({"segment_index": 12, "speaker_id": 7, "target_text": "x", "npy_file": "legacy/none.npy",
                          "reference_text": "r", "output_file": "seg_12.wav"})
    data["tasks"].append({"segment_index": 13, "speaker_id": 7, "target_text": "y", "npy_file": "legacy/none.npy",
                          "reference_text": "r", "output_file": "seg_13.wav"})
    path = write_job(proj, data)
    with pytest.raises(JobError):
        load_job(str(path))
    job = load_job(str(path), skip_invalid=None)  # None: skip for legacy configs only
    assert [s.legacy_index for s in job.segments] == [4, 9] and job.items == 5
    text = "\n".join(job.skipped)
    assert 'segment "0": target_text is empty' in text and 'speaker "7" (segment "12"): npy_file' in text
    assert 'segment "13": skipped: speaker "7" has a problem' in text
    strict_new = write_job(proj, {**new_job(), "segments": [*new_job()["segments"], {"speaker": "x", "text": "t"}]},
                           "new.json")
    with pytest.raises(JobError, match='speaker "x" is not defined'):
        load_job(str(strict_new), str(proj / "o"), skip_invalid=None)


def test_legacy_encode_skips_a_speaker_whose_reference_is_missing(proj: Path) -> None:
    data = legacy_encode(proj)
    data["speakers"][0]["reference_audio"] = "voices/gone.wav"
    path = write_job(proj, data, "enc.json")
    with pytest.raises(JobError):
        load_encode_config(str(path))
    enc = load_encode_config(str(path), skip_invalid=None)
    assert [it.speaker_id for it in enc.items] == ["five"] and enc.listed == 2
    assert len(enc.skipped) == 1 and 'speaker "3": reference_audio voices/gone.wav' in enc.skipped[0]
