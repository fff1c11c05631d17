"""fishmp.job validation: every problem reported and named, text normalisation, invisible characters
in names, and the JSON Schema. Pure and fast: real files in tmp_path, no engine."""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path

import pytest
from job_files import (
    new_job,
    one_problem,
    problems_of,
    write_job,
)

from fishmp.job import (
    JobError,
    Params,
    job_from_dict,
    load_job,
    normalize_text,
)

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
     ['segments[1] (segment "0001"): duplicate segment id: segments[0] already has it']),
    ("duplicate-default-id", mutate("segments.0.id", "0003"),
     ['segments[2] (segment "0003"): duplicate segment id: segments[0] already has it']),
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
    ("max-new-tokens-zero", mutate("params.max_new_tokens", 0), ["max_new_tokens must be an integer from 2 to 8192"]),
    ("max-new-tokens-one", mutate("params.max_new_tokens", 1), ["max_new_tokens must be an integer from 2 to 8192"]),
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
        'segments[3] (segment "0001"): duplicate segment id: segments[0] already has it',
        "segments[3] (segment \"0001\"): output 'x.mp3' must be a file name ending in .wav",
    ]
    assert len(problems) == len(expected), problems
    for needle in expected:
        assert sum(needle in p for p in problems) == 1, (needle, problems)
    # JobError's text lists them one per line, in the order found
    with pytest.raises(JobError) as info:
        load_job(str(write_job(proj, data)), str(proj / "out"))
    assert str(info.value).splitlines() == problems


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
    from fishmp.job.formats import NEW_SEGMENT_KEYS, NEW_SPEAKER_KEYS, NEW_TOP_KEYS
    from fishmp.job.params import PARAM_RULES
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
