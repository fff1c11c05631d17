"""fishmp.job: the three input formats, validation (every problem, named), the output-directory guarantee,
text normalisation and fingerprints. Pure and fast: real files in tmp_path, no engine."""

from __future__ import annotations

import copy
import json
import os
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fishmp.job import (
    EncodeItem,
    EncodeJob,
    Job,
    JobError,
    Params,
    Segment,
    Speaker,
    default_output_dir,
    detect_format,
    encode_job_from_dict,
    job_from_dict,
    load_config,
    load_encode_config,
    load_job,
    normalize_text,
    reference_fingerprint,
    segment_fingerprint,
)

# ------------------------------------------------------------------------------------------------ fixtures


def write_wav(path: Path, seconds: float = 0.1, freq: float = 220.0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(16000 * seconds)) / 16000
    sf.write(str(path), (0.1 * np.sin(2 * np.pi * freq * t)).astype("float32"), 16000)
    return path


def write_npy(path: Path, frames: int = 20, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.save(path, np.random.default_rng(seed).integers(0, 1024, size=(10, frames), dtype=np.int64))
    return path


@pytest.fixture
def proj(tmp_path: Path) -> Path:
    """A project directory with refs/alice.wav and refs/bob.npy next to where job files are written."""
    write_wav(tmp_path / "refs" / "alice.wav")
    write_npy(tmp_path / "refs" / "bob.npy")
    return tmp_path


def new_job() -> dict:
    return {
        "speakers": {
            "alice": {"reference_audio": "refs/alice.wav", "reference_text": "Hello, I am Alice."},
            "bob": {"prompt_tokens": "refs/bob.npy", "reference_text": "Bob here."},
        },
        "segments": [
            {"id": "0001", "speaker": "alice", "text": "First line.", "output": "0001.wav"},
            {"id": "0002", "speaker": "bob", "text": "Second line.", "params": {"temperature": 0.5, "seed": 7}},
            {"speaker": "alice", "text": "Third line.", "output": "alice/third.wav"},
        ],
        "params": {"temperature": 0.7, "top_p": 0.8},
    }


def write_job(directory: Path, data: object, name: str = "job.json") -> Path:
    path = directory / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def problems_of(directory: Path, data: object, output_dir: Path | None = None) -> list[str]:
    path = write_job(directory, data)
    with pytest.raises(JobError) as info:
        load_job(str(path), str(output_dir or directory / "out"))
    assert info.value.problems, "JobError without problems"
    assert str(info.value) == "\n".join(info.value.problems)
    return info.value.problems


def one_problem(directory: Path, data: object, *needles: str, output_dir: Path | None = None) -> str:
    """Exactly one problem, containing every needle."""
    problems = problems_of(directory, data, output_dir)
    assert len(problems) == 1, problems
    for needle in needles:
        assert needle in problems[0], (needle, problems[0])
    return problems[0]


def legacy_generate(proj: Path) -> dict:
    write_npy(proj / "legacy" / "speaker_3.npy", seed=3)
    write_npy(proj / "legacy" / "speaker_5.npy", seed=5)
    return {
        "mode": "generate",
        "checkpoint_dir": "checkpoints/openaudio-s1-mini",
        "output_dir": "legacy",
        "temperature": 0.6,
        "tasks": [
            {"segment_index": 4, "speaker_id": 3, "target_text": "Hola.", "npy_file": "legacy/speaker_3.npy",
             "reference_text": "Ref three.", "output_file": "seg_4.wav"},
            {"segment_index": 0, "speaker_id": 5, "target_text": "Adios.", "npy_file": "legacy/speaker_5.npy",
             "reference_text": "Ref five.", "output_file": "seg_0.wav", "top_p": 0.9, "seed": 11},
            {"segment_index": 9, "speaker_id": 3, "target_text": "Otra vez.", "npy_file": "legacy/speaker_3.npy",
             "reference_text": "Ref three.", "output_file": str(proj / "legacy" / "wavs" / "seg_9.wav"),
             "extra_backend_field": {"ignored": True}},
        ],
    }


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
        'segment "1": duplicate segment_index (tasks[0] and tasks[1])',
        'segment "1": target_text is empty',
        'speaker "5" (segment "1"): reference_text is empty',
        'segment "1": temperature must be',
        'segment "1": output_file \'a.wav\' is also the output of segment "1"',
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


def legacy_encode(proj: Path) -> dict:
    write_wav(proj / "voices" / "three.wav")
    write_wav(proj / "voices" / "five.wav", freq=330)
    return {
        "mode": "encode",
        "checkpoint_dir": "/models/s1-mini",
        "output_dir": "npys",
        "speakers": [
            {"speaker_id": 3, "reference_audio": "voices/three.wav", "reference_text": "Three.",
             "output_npy": "s3.npy"},
            {"speaker_id": "five", "reference_audio": "voices/five.wav", "reference_text": "Five.\n"},
        ],
    }


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
        'speaker "3": defined more than once (speakers[0] and speakers[2])',
        'speaker "3": reference_audio voices/nope.wav',
        'speaker "3": reference_text is empty',
        "speaker \"3\": output_npy '../s.npy' is outside",
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


# ------------------------------------------------------------------------------------------------ validation


def test_invalid_json_reports_line_and_column(tmp_path: Path) -> None:
    one_problem(tmp_path, '{\n  "speakers": {},\n  "segments": [,]\n}', "invalid JSON at line 3, column 16")


def test_unreadable_job_files(tmp_path: Path) -> None:
    with pytest.raises(JobError, match="does not exist"):
        load_job(str(tmp_path / "nope.json"))
    (tmp_path / "latin1.json").write_bytes(b'{"a": "\xe9"}')
    with pytest.raises(JobError, match="not UTF-8"):
        load_job(str(tmp_path / "latin1.json"))
    with pytest.raises(JobError, match="is a directory"):
        load_job(str(tmp_path))


def test_utf8_bom_is_accepted(proj: Path) -> None:
    path = proj / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(new_job()).encode())
    assert len(load_job(str(path), str(proj / "o")).segments) == 3


@pytest.mark.parametrize("data, needle", [
    ([1, 2], "must be a JSON object, not a list"),
    ("\"text\"", "must be a JSON object, not a string"),
    ({}, 'needs "speakers" and "segments"'),
    ({"mode": "train"}, "unknown \"mode\" 'train'"),
])
def test_wrong_top_level_shape(tmp_path: Path, data: object, needle: str) -> None:
    one_problem(tmp_path, data if isinstance(data, str) else json.dumps(data), needle)


def mutate(path: str, value: object):
    """A change to new_job(): set (or with value DELETE, remove) the item at a dotted path."""
    def apply(data: dict) -> dict:
        keys = path.split(".")
        obj = data
        for k in keys[:-1]:
            obj = obj[int(k)] if isinstance(obj, list) else obj[k]
        last = int(keys[-1]) if isinstance(obj, list) else keys[-1]
        if value is DELETE:
            del obj[last]
        else:
            obj[last] = value
        return data
    return apply


DELETE = object()

VALIDATION_CASES = [
    # (id, change, needles in the single problem reported)
    ("missing-speakers", mutate("speakers", DELETE), ['missing "speakers"']),
    ("speakers-list", mutate("speakers", [{"id": "alice"}]), ['"speakers" must be an object']),
    ("missing-segments", mutate("segments", DELETE), ['missing "segments"']),
    ("segments-object", mutate("segments", {"a": 1}), ['"segments" must be a list']),
    ("no-segments", mutate("segments", []), ["no segments"]),
    ("segment-not-object", mutate("segments.1", "text"), ["segments[1]: must be an object"]),
    ("unknown-top-key", mutate("segmnets", []), ["job: unknown key 'segmnets'"]),
    ("unknown-segment-key", mutate("segments.0.outptu", "x.wav"), ['segment "0001": unknown key \'outptu\'']),
    ("unknown-speaker-key", mutate("speakers.alice.voice", "x"), ['speaker "alice": unknown key \'voice\'']),
    ("speaker-not-object", mutate("speakers.alice", "refs/alice.wav"), ['speaker "alice": must be an object']),
    ("speaker-no-reference", mutate("speakers.alice.reference_audio", DELETE),
     ['speaker "alice": needs reference_audio', "prompt_tokens"]),
    ("speaker-both-references", mutate("speakers.alice.prompt_tokens", "refs/bob.npy"),
     ['speaker "alice": give either reference_audio or prompt_tokens, not both']),
    ("reference-audio-missing", mutate("speakers.alice.reference_audio", "refs/nope.wav"),
     ['speaker "alice": reference_audio refs/nope.wav', "does not exist"]),
    ("reference-audio-dir", mutate("speakers.alice.reference_audio", "refs"),
     ['speaker "alice": reference_audio refs', "is not a file"]),
    ("reference-audio-type", mutate("speakers.alice.reference_audio", 5),
     ['speaker "alice": reference_audio must be a non-empty path']),
    ("prompt-tokens-missing", mutate("speakers.bob.prompt_tokens", "refs/nope.npy"),
     ['speaker "bob": prompt_tokens refs/nope.npy', "does not exist"]),
    ("prompt-tokens-not-npy", mutate("speakers.bob.prompt_tokens", "refs/alice.wav"),
     ['speaker "bob": prompt_tokens refs/alice.wav', "not a readable .npy"]),
    ("reference-text-missing", mutate("speakers.alice.reference_text", DELETE),
     ['speaker "alice": missing "reference_text"']),
    ("reference-text-empty", mutate("speakers.bob.reference_text", " \t\n"),
     ['speaker "bob": reference_text is empty']),
    ("reference-text-type", mutate("speakers.bob.reference_text", ["a"]),
     ['speaker "bob": reference_text must be a string, not a list']),
    ("speaker-id-blank", mutate("speakers. ", {"reference_audio": "refs/alice.wav", "reference_text": "x"}),
     ["invalid speaker id ' '"]),
    ("unknown-speaker", mutate("segments.1.speaker", "carol"),
     ['segment "0002": speaker "carol" is not defined (speakers: alice, bob)']),
    ("missing-speaker", mutate("segments.1.speaker", DELETE), ['segment "0002": missing "speaker"']),
    ("speaker-type", mutate("segments.1.speaker", 1), ['segment "0002": speaker must be a speaker id string']),
    ("missing-text", mutate("segments.0.text", DELETE), ['segment "0001": missing "text"']),
    ("empty-text", mutate("segments.0.text", ""), ['segment "0001": text is empty']),
    ("whitespace-text", mutate("segments.0.text", " \n\t\u3000 "), ['segment "0001": text is empty']),
    ("control-only-text", mutate("segments.0.text", "\x00\x07\x1b"), ['segment "0001": text is empty']),
    ("text-type", mutate("segments.0.text", 42), ['segment "0001": text must be a string, not a number']),
    ("duplicate-id", mutate("segments.1.id", "0001"),
     ['segment "0001": duplicate segment id (segments[0] and segments[1])']),
    ("duplicate-default-id", mutate("segments.0.id", "0003"), ['segment "0003": duplicate segment id']),
    ("id-type", mutate("segments.0.id", 1), ["segments[0]: id must be a non-empty string"]),
    ("id-blank", mutate("segments.0.id", "  "), ["segments[0]: id must be a non-empty string"]),
    ("id-control", mutate("segments.0.id", "a\nb"), ["segments[0]: id must be"]),
    ("duplicate-output", mutate("segments.1.output", "0001.wav"),
     ['segment "0002": output \'0001.wav\' is also the output of segment "0001"']),
    ("duplicate-output-after-resolving", mutate("segments.1.output", "alice/../0001.wav"),
     ['segment "0002": output \'alice/../0001.wav\' is also the output of segment "0001"']),
    ("duplicate-output-default", mutate("segments.0.output", "0002.wav"),
     ['segment "0002": output \'0002.wav\' is also the output of segment "0001"']),
    ("output-type", mutate("segments.0.output", 7), ['segment "0001": output must be a path string, not a number']),
    ("output-as-directory-of-another", mutate("segments.2.output", "0001.wav/x.wav"),
     ['segment "0003": output', "needs", "0001.wav as a directory"]),
    ("output-overwrites-reference", mutate("segments.0.output", "../refs/alice.wav"), ["outside"]),
    ("params-not-object", mutate("params", [0.7]), ["job params: params must be an object, not a list"]),
    ("unknown-param", mutate("params.top_k", 50), ["job params: unknown parameter 'top_k'"]),
    ("unknown-segment-param", mutate("segments.1.params.temp", 0.5), ['segment "0002" params: unknown parameter']),
    ("temperature-zero", mutate("params.temperature", 0), ["job params: temperature must be a number > 0 and < 2"]),
    ("temperature-two", mutate("params.temperature", 2.0), ["temperature must be a number > 0 and < 2"]),  # fish-speech
    ("repetition-penalty-two", mutate("params.repetition_penalty", 2), ["repetition_penalty must be a number > 0 and < 2"]),
    ("temperature-high", mutate("segments.1.params.temperature", 2.5), ['segment "0002" params: temperature']),
    ("temperature-string", mutate("params.temperature", "0.7"), ["temperature must be"]),
    ("temperature-bool", mutate("params.temperature", True), ["temperature must be"]),
    ("top-p-zero", mutate("params.top_p", 0.0), ["top_p must be a number > 0 and <= 1"]),
    ("top-p-high", mutate("params.top_p", 1.01), ["top_p must be"]),
    ("repetition-penalty-zero", mutate("params.repetition_penalty", 0), ["repetition_penalty must be a number > 0"]),
    ("repetition-penalty-negative", mutate("params.repetition_penalty", -1.2), ["repetition_penalty must be"]),
    ("max-new-tokens-zero", mutate("params.max_new_tokens", 0), ["max_new_tokens must be an integer from 1 to 8192"]),
    ("max-new-tokens-high", mutate("params.max_new_tokens", 8193), ["max_new_tokens must be"]),
    ("max-new-tokens-float", mutate("params.max_new_tokens", 100.0), ["max_new_tokens must be"]),
    ("seed-negative", mutate("segments.0.params", {"seed": -1}),
     ['segment "0001" params: seed must be an integer >= 0']),
    ("seed-float", mutate("params.seed", 1.5), ["seed must be"]),
]


@pytest.mark.parametrize("change, needles", [c[1:] for c in VALIDATION_CASES], ids=[c[0] for c in VALIDATION_CASES])
def test_each_problem_is_reported_and_named(proj: Path, change, needles: list[str]) -> None:
    one_problem(proj, change(new_job()), *needles)


def test_non_finite_params_rejected(proj: Path) -> None:
    path = proj / "nan.json"
    path.write_text(json.dumps(new_job()).replace('"temperature": 0.7', '"temperature": NaN')
                    .replace('"top_p": 0.8', '"top_p": Infinity'))
    problems = problems_of(proj, path.read_text())
    assert len(problems) == 2 and "temperature" in problems[0] and "top_p" in problems[1]


def test_null_params_mean_engine_default(proj: Path) -> None:
    data = new_job()
    data["params"] = {"temperature": None, "seed": 3}
    data["segments"][0]["params"] = {"seed": None}
    job = load_job(str(write_job(proj, data)), str(proj / "o"))
    assert job.segments[0].params == Params(seed=3)  # a null does not clear the job's value


def test_duplicate_json_keys_are_reported(proj: Path) -> None:
    text = json.dumps(new_job())
    alice = '"alice": {"reference_audio": "refs/alice.wav", "reference_text": "Hello, I am Alice."}'
    assert alice in text
    dup_speaker = text.replace(alice, alice + ", " + alice.replace("Hello", "Hi"))
    one_problem(proj, dup_speaker, 'speaker "alice": defined more than once')
    dup_key = text.replace('"text": "First line."', '"text": "First line.", "text": "Other."')
    one_problem(proj, dup_key, 'segment "0001": key \'text\' is given more than once')


def test_output_directory_is_a_file(proj: Path) -> None:
    (proj / "file").write_text("x")
    one_problem(proj, new_job(), "output directory", "is not a directory", output_dir=proj / "file")


def test_multiple_problems_reported_together(proj: Path) -> None:
    data = new_job()
    data["speakers"]["alice"]["reference_audio"] = "refs/alice_missing.wav"
    data["speakers"]["bob"]["reference_text"] = ""
    data["params"]["temperature"] = 9
    data["segments"][0]["speaker"] = "carol"
    data["segments"][1]["text"] = "   "
    data["segments"][2]["output"] = "../../etc/passwd.wav"
    data["segments"].append({"id": "0001", "speaker": "bob", "text": "dup", "output": "x.mp3"})
    problems = problems_of(proj, data)
    expected = [
        'speaker "alice": reference_audio refs/alice_missing.wav',
        'speaker "bob": reference_text is empty',
        "job params: temperature must be",
        'segment "0001": speaker "carol" is not defined (speakers: alice, bob)',
        'segment "0002": text is empty',
        "segment \"0003\": output '../../etc/passwd.wav'",
        'segment "0001": duplicate segment id (segments[0] and segments[3])',
        "segment \"0001\": output 'x.mp3' must be a file name ending in .wav",
    ]
    assert len(problems) == len(expected), problems
    for needle in expected:
        assert sum(needle in p for p in problems) == 1, (needle, problems)
    # JobError's text lists them one per line, in the order found
    with pytest.raises(JobError) as info:
        load_job(str(write_job(proj, data)), str(proj / "out"))
    assert str(info.value).splitlines() == problems


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


# ------------------------------------------------------------------------------------------------ normalisation


@pytest.mark.parametrize("raw, expected", [
    ("Cafe\u0301", "Caf\u00e9"),  # NFD -> NFC
    ("  padded  ", "padded"),
    ("line one\nline two", "line one line two"),
    ("tab\tseparated", "tab separated"),
    ("crlf\r\nend", "crlf  end"),
    ("bell\x07 and\x00 nul\x1b", "bell and nul"),
    ("\ufeffbom", "bom"),
    ("c1\x85next\x9b", "c1 next"),
    ("mixed: Hello, 世界, Привет, مرحبا", "mixed: Hello, 世界, Привет, مرحبا"),
    ("emoji 👩\u200d💻 zwj kept", "emoji 👩\u200d💻 zwj kept"),
    ("\n\t \x0b", ""),
])
def test_normalize_text(raw: str, expected: str) -> None:
    assert normalize_text(raw) == expected
    assert unicodedata.is_normalized("NFC", normalize_text(raw))


def test_texts_are_normalised_in_jobs(proj: Path) -> None:
    data = new_job()
    data["segments"][0]["text"] = "  Cafe\u0301\tau lait\n\x07 "
    data["speakers"]["alice"]["reference_text"] = "\nRe\u0301fe\u0301rence\x00 "
    job = load_job(str(write_job(proj, data)), str(proj / "o"))
    assert job.segments[0].text == "Caf\u00e9 au lait"
    assert job.speakers["alice"].reference_text == "R\u00e9f\u00e9rence"


# ------------------------------------------------------------------------------------------------ fingerprints


def _segment(text: str = "Hello.", params: Params | None = None, **kw) -> Segment:
    params = Params(temperature=0.7) if params is None else params
    fields = {"id": "0001", "speaker": "alice", "text": text, "output": "/o/0001.wav", "params": params, "order": 0}
    fields.update(kw)
    return Segment(**fields)


def test_segment_fingerprint_changes_only_with_what_shapes_the_audio() -> None:
    base = segment_fingerprint(_segment(), "spk", "eng")
    assert len(base) == 64 and int(base, 16) >= 0
    assert segment_fingerprint(_segment(), "spk", "eng") == base
    # unchanged: id, order, output path, speaker id (the voice is the speaker fingerprint), legacy index
    assert segment_fingerprint(_segment(id="x", order=5, output="/p/q.wav", speaker="bob", legacy_index=3),
                               "spk", "eng") == base
    changed = [
        segment_fingerprint(_segment(text="Hello!"), "spk", "eng"),
        segment_fingerprint(_segment(params=Params(temperature=0.8)), "spk", "eng"),
        segment_fingerprint(_segment(params=Params(temperature=0.7, seed=1)), "spk", "eng"),
        segment_fingerprint(_segment(params=Params()), "spk", "eng"),
        segment_fingerprint(_segment(), "spk2", "eng"),
        segment_fingerprint(_segment(), "spk", "eng2"),
    ]
    assert base not in changed and len(set(changed)) == len(changed)


def test_segment_fingerprint_stable_across_equivalent_job_files(proj: Path) -> None:
    a = new_job()
    b = copy.deepcopy(a)
    b["params"] = {"top_p": 0.8, "temperature": 0.7}  # same values, other key order
    b["segments"][0]["text"] = " First line.\n"  # normalises to the same text
    b["segments"][0]["output"] = "renamed.wav"
    ja = load_job(str(write_job(proj, a, "a.json")), str(proj / "o"))
    jb = load_job(str(write_job(proj, b, "b.json")), str(proj / "o"))
    fa = [segment_fingerprint(s, reference_fingerprint(ja.speakers[s.speaker]), "e") for s in ja.segments]
    fb = [segment_fingerprint(s, reference_fingerprint(jb.speakers[s.speaker]), "e") for s in jb.segments]
    assert fa == fb


def test_integer_and_float_params_fingerprint_the_same(proj: Path) -> None:
    a, b = new_job(), new_job()
    a["params"]["temperature"], b["params"]["temperature"] = 1, 1.0
    ja = job_from_dict(a, str(proj), str(proj / "o"))
    jb = job_from_dict(b, str(proj), str(proj / "o"))
    assert segment_fingerprint(ja.segments[0], "s", "e") == segment_fingerprint(jb.segments[0], "s", "e")


def test_reference_fingerprint(proj: Path) -> None:
    audio = str(proj / "refs" / "alice.wav")
    tokens = str(proj / "refs" / "bob.npy")
    base = reference_fingerprint(Speaker("alice", "Hello.", reference_audio=audio))
    assert len(base) == 64
    # the id does not matter, only the reference itself
    assert reference_fingerprint(Speaker("someone", "Hello.", reference_audio=audio)) == base
    # an identical copy of the file elsewhere is the same voice
    copy_path = proj / "copy.wav"
    copy_path.write_bytes(Path(audio).read_bytes())
    assert reference_fingerprint(Speaker("alice", "Hello.", reference_audio=str(copy_path))) == base
    assert reference_fingerprint(Speaker("alice", "Hello!", reference_audio=audio)) != base
    tok = reference_fingerprint(Speaker("alice", "Hello.", prompt_tokens=tokens))
    assert tok != base
    write_wav(Path(audio), freq=440.0)  # the file's content changed
    assert reference_fingerprint(Speaker("alice", "Hello.", reference_audio=audio)) != base
    write_npy(Path(tokens), seed=99)
    assert reference_fingerprint(Speaker("alice", "Hello.", prompt_tokens=tokens)) != tok
    with pytest.raises(OSError):
        reference_fingerprint(Speaker("alice", "Hello.", reference_audio=str(proj / "gone.wav")))


def test_npy_prompt_tokens_shape_checked(proj: Path) -> None:
    np.save(proj / "refs" / "flat.npy", np.zeros(10, dtype=np.int64))
    np.save(proj / "refs" / "floats.npy", np.zeros((10, 5), dtype=np.float32))
    for name in ("flat.npy", "floats.npy"):
        data = new_job()
        data["speakers"]["bob"]["prompt_tokens"] = f"refs/{name}"
        one_problem(proj, data, 'speaker "bob": prompt_tokens', "2-D integer array")


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


# ------------------------------------------------------------------------------------------------ invisible characters


@pytest.mark.parametrize("bad", ["\u202e", "\u200b", "\u2066", "\ufeff", "\u00ad", "\u2028"])
def test_invisible_and_bidi_characters_rejected_in_names(proj: Path, bad: str) -> None:
    data = new_job()
    data["segments"][0]["output"] = f"evil{bad}vaw.wav"
    one_problem(proj, data, 'segment "0001": output', "invisible or control characters", repr(bad))
    data = new_job()
    data["segments"][0]["id"] = f"id{bad}x"
    del data["segments"][0]["output"]
    one_problem(proj, data, "segments[0]: id must be", "invisible")


def test_zero_width_only_texts_are_empty_but_joiners_inside_text_are_kept(proj: Path) -> None:
    data = new_job()
    data["speakers"]["bob"]["reference_text"] = "\u200b\u2060"
    one_problem(proj, data, 'speaker "bob": reference_text is empty')
    data = new_job()
    data["segments"][0]["text"] = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645"  # Persian: ZWNJ shapes the word
    assert "\u200c" in load_job(str(write_job(proj, data)), str(proj / "o")).segments[0].text


# ------------------------------------------------------------------------------------------------ JSON Schema


def test_schema_has_the_parsers_keys_and_ranges() -> None:
    from fishmp.job.checks import PARAM_RULES
    from fishmp.job.formats import NEW_SEGMENT_KEYS, NEW_SPEAKER_KEYS, NEW_TOP_KEYS
    from fishmp.job.schema import job_schema

    schema = json.loads(json.dumps(job_schema()))  # plain JSON
    assert set(schema["properties"]) == NEW_TOP_KEYS and set(schema["required"]) == {"speakers", "segments"}
    assert set(schema["properties"]["speakers"]["additionalProperties"]["properties"]) == NEW_SPEAKER_KEYS
    assert set(schema["properties"]["segments"]["items"]["properties"]) == NEW_SEGMENT_KEYS
    assert set(schema["properties"]["params"]["properties"]) == set(PARAM_RULES)


def test_schema_accepts_valid_jobs_and_rejects_what_the_loader_rejects(proj: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from fishmp.job.schema import job_schema

    validator = jsonschema.Draft202012Validator(job_schema())
    assert not list(validator.iter_errors(new_job()))
    for change in [mutate("params.temperature", 2), mutate("params.top_p", 0), mutate("segments.0.outptu", "x"),
                   mutate("segments.0.output", "a\u202eva.wav"), mutate("segments.0.output", "x.mp3"),
                   mutate("speakers.alice.prompt_tokens", "refs/bob.npy"), mutate("segments", []),
                   mutate("segments.1.params.max_new_tokens", 0), mutate("segments.0.id", "a\u200bb")]:
        data = change(new_job())
        assert list(validator.iter_errors(data)), data
        with pytest.raises(JobError):
            job_from_dict(data, str(proj), str(proj / "out"))
