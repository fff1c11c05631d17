"""The fit in the job format: start/end, slots, fit settings (job and segment), what is fitted and what never is, the
raw take's file, the schema. Pure and fast: real files in tmp_path, no engine."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from job_files import new_job, one_problem, write_job

from fishmp.job import load_job
from fishmp.job.fitting import FIT_KEYS, FitSettings, applied_speed, fit_slots, stretch_cost, wanted_speed


def _job(**segment: object) -> dict:
    data = new_job()
    data["segments"] = [{"id": "a", "speaker": "alice", "text": "Hello there.", **segment}]
    return data


def _seg(proj: Path, data: dict):
    return load_job(str(write_job(proj, data)), str(proj / "out")).segments[0]


def test_a_segment_with_a_slot_is_fitted_by_default(proj: Path) -> None:
    seg = _seg(proj, _job(start=1.5, end=3.0))
    assert (seg.start, seg.end, seg.slot, seg.fit) == (1.5, 3.0, 1.5, FitSettings())
    assert seg.raw_output == str(proj / "out" / "a.raw.wav")
    seg = _seg(proj, _job(start=1.5, end=3.0, max_seconds=2.0))  # max_seconds wins over end - start
    assert seg.slot == 2.0
    seg = _seg(proj, _job(max_seconds=2.0))  # a max_seconds alone is a slot too: fitted (documented change)
    assert seg.slot == 2.0 and seg.fit is not None


def test_no_slot_or_fitting_off_is_not_fitted(proj: Path) -> None:
    assert _seg(proj, _job()).fit is None
    assert _seg(proj, _job(start=4.0)).fit is None  # a start alone places the line, gives no slot
    off = _seg(proj, _job(start=1.0, end=2.0, fit=False))
    assert off.fit is None and off.slot is None and off.raw_output is None
    data = {**_job(start=1.0, end=2.0), "fit": False}
    assert _seg(proj, data).fit is None
    data = {**_job(start=1.0, end=2.0, fit=True), "fit": False}  # the segment's true wins over the job's false
    assert _seg(proj, data).fit is not None


def test_segment_settings_override_the_jobs_key_by_key(proj: Path) -> None:
    data = {**_job(max_seconds=2.0, fit={"max_speed": 1.4, "loudness_lufs": None}),
            "fit": {"max_speed": 1.1, "slow_down": True, "retries": 0}}
    fit = _seg(proj, data).fit
    assert (fit.max_speed, fit.slow_down, fit.retries, fit.loudness_lufs, fit.pad_s) == (1.4, True, 0, None, 0.05)


def test_legacy_configs_are_never_fitted(proj: Path) -> None:
    cfg = {"mode": "generate", "tasks": [{"segment_index": 0, "speaker_id": 1, "npy_file": "refs/bob.npy",
                                          "reference_text": "Bob.", "target_text": "Hi.", "output_file": "o.wav"}]}
    seg = load_job(str(write_job(proj, cfg)), str(proj / "out")).segments[0]
    assert seg.fit is None and seg.slot is None


@pytest.mark.parametrize("segment, needle", [
    ({"start": -1}, "start must be a number of seconds from 0"),
    ({"start": 2, "end": 2}, "end (2) must be later than start (2)"),
    ({"end": 3}, 'end 3 needs a "start" too'),
    ({"start": "0:01"}, "start must be a number"),
    ({"max_seconds": 2, "fit": {"max_speed": 0.5}}, "fit max_speed must be a number from 1.0 to 4.0, not 0.5"),
    ({"max_seconds": 2, "fit": {"speed": 2}}, "unknown fit setting 'speed'"),
    ({"max_seconds": 2, "fit": "yes"}, "fit must be an object of fit settings, true or false, not a string"),
    ({"max_seconds": 2, "fit": {"retries": 1.5}}, "fit retries must be an integer from 0 to 8"),
    ({"max_seconds": 2, "fit": '{"cut": true, "cut": false}'}, "fit: key 'cut' is given more than once"),
])
def test_bad_timing_and_settings_are_named(proj: Path, segment: dict, needle: str) -> None:
    text = json.dumps(_job(**segment))
    if isinstance(segment.get("fit"), str) and segment["fit"].startswith("{"):  # a duplicate key: only JSON text has it
        text = text.replace(json.dumps(segment["fit"]), segment["fit"])
    one_problem(proj, text, 'segment "a"', needle)


def test_the_raw_take_may_not_be_another_segments_output(proj: Path) -> None:
    data = new_job()
    data["segments"] = [{"id": "a", "speaker": "alice", "text": "One.", "max_seconds": 1.0},
                        {"id": "b", "speaker": "alice", "text": "Two.", "output": "a.raw.wav"}]
    one_problem(proj, data, "raw take", "also the output of")


def test_borrow_gap_extends_the_slot_to_the_next_lines_start() -> None:
    fit = FitSettings(borrow_gap=True)
    slots = fit_slots([(None, 0.0, 1.0, fit), (None, 1.6, 2.0, fit), (None, 5.0, 6.0, FitSettings()),
                       (None, 9.0, 10.0, fit)])
    assert slots == [1.6, 3.4, 1.0, 1.0]  # the last line has no next line: its own slot


def test_speed_policy() -> None:
    fit = FitSettings()
    assert wanted_speed(2.0, 1.0, fit) == 2.0 and applied_speed(2.0, fit) == 1.25
    assert wanted_speed(0.5, 1.0, fit) == 1.0  # short lines stay as they are...
    slow = FitSettings(slow_down=True)
    assert wanted_speed(0.5, 1.0, slow) == 0.5 and applied_speed(0.5, slow) == 0.85  # ...unless they may slow down
    assert stretch_cost(1.0, fit) < stretch_cost(1.1, fit) < stretch_cost(1.25, fit) < stretch_cost(1.26, fit)


def test_schema_knows_the_fit(proj: Path) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from fishmp.job.schema import job_schema

    schema = json.loads(json.dumps(job_schema()))
    assert set(schema["properties"]["fit"]["oneOf"][1]["properties"]) == set(FIT_KEYS)
    validator = jsonschema.Draft202012Validator(schema)
    good = {**_job(start=1.0, end=2.5, fit={"max_speed": 1.3}), "fit": False, "video_seconds": 60}
    assert not list(validator.iter_errors(good))
    assert list(validator.iter_errors(_job(end=2.0)))  # end needs start
    assert list(validator.iter_errors(_job(fit={"max_speed": 9})))
