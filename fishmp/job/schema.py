"""JSON Schema (draft 2020-12) of fishmp's job format, for dubbing apps that build job files (`python -m fishmp
schema`). Its keys and ranges are the parser's (tests/test_job.py compares them). What a schema
cannot say is still checked when the job loads: that files exist, ids are unique, outputs stay inside the output
directory, texts are not empty once normalised."""

from __future__ import annotations

from typing import Any

from .checks import MAX_SECONDS_LIMIT
from .fitting import MAX_VIDEO_SECONDS
from .model import REFERENCE_ID
from .params import MAX_NEW_TOKENS_LIMIT, MAX_SEED

# no control, bidi, zero-width or other invisible characters (the common ones; the loader checks every Cc/Cf)
_VISIBLE = r"[^\u0000-\u001f\u007f-\u009f\u00ad\u200b-\u200f\u202a-\u202e\u2028\u2029\u2060-\u2064\u2066-\u206f\ufeff]"
_NAME = f"^{_VISIBLE}+$"


def _obj(properties: dict[str, Any], required: list[str], description: str) -> dict[str, Any]:
    # keys starting with "_" are the job file's own notes: allowed and ignored
    return {"type": "object", "description": description, "properties": properties, "required": required,
            "patternProperties": {"^_": {}}, "additionalProperties": False}


def _path(description: str, suffix: str | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "string", "minLength": 1, "description": description}
    if suffix:
        out["pattern"] = "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else "\\" + c for c in suffix) + "$"
    return out


def params_schema() -> dict[str, Any]:
    num = {"type": ["number", "null"], "exclusiveMinimum": 0}
    return _obj({
        "temperature": {**num, "exclusiveMaximum": 2, "description": "sampling temperature"},
        "top_p": {**num, "maximum": 1, "description": "nucleus sampling"},
        "repetition_penalty": {**num, "exclusiveMaximum": 2, "description": "typically 1.0 to 1.5"},
        "max_new_tokens": {"type": ["integer", "null"], "minimum": 2, "maximum": MAX_NEW_TOKENS_LIMIT},
        "seed": {"type": ["integer", "null"], "minimum": 0, "maximum": MAX_SEED},
    }, [], "sampling parameters; null or absent: the engine's default (segment params override the job's)")


def fit_schema() -> dict[str, Any]:
    def num(lo: float, hi: float, what: str) -> dict[str, Any]:
        return {"type": "number", "minimum": lo, "maximum": hi, "description": what}

    obj = _obj({
        "enabled": {"type": "boolean", "description": "fit lines that have a slot (default true)"},
        "max_speed": num(1.0, 4.0, "the largest speed-up (default 1.25)"),
        "slow_down": {"type": "boolean", "description": "slow a line shorter than its slot (default false)"},
        "min_speed": num(0.25, 1.0, "the slowest speed when slow_down (default 0.85)"),
        "max_pause_s": num(0.05, 10.0, "longer pauses inside a line are shortened to this when it is over its slot "
                           "(default 0.3)"),
        "pad_s": num(0.0, 1.0, "silence kept at each end when trimming (default 0.05)"),
        "borrow_gap": {"type": "boolean", "description": "the slot extends to the next line's start (default false)"},
        "loudness_lufs": {"type": ["number", "null"], "minimum": -70, "maximum": -5,
                          "description": "integrated loudness target, EBU R128 (default -23); null: none"},
        "true_peak_db": num(-20.0, 0.0, "true-peak ceiling in dBTP (default -1)"),
        "choose_take": {"type": "boolean", "description": "keep the take needing the least stretch (default true)"},
        "retries": {"type": "integer", "minimum": 0, "maximum": 8,
                    "description": "more seeds when even the best take needs more than max_speed (default 2)"},
        "cut": {"type": "boolean", "description": "cut an overrunning line at its slot with a fade (default false)"},
    }, [], "how lines are fitted into their slots; the segment's keys override the job's")
    return {"oneOf": [{"type": "boolean"}, obj], "description": "fit settings, or false to turn fitting off"}


def job_schema() -> dict[str, Any]:
    speaker = _obj({
        "reference_audio": _path("a recording of the voice (any common audio format), relative to the job file; or "
                                 "the recording itself as a data: URL (data:audio/wav;base64,...)"),
        "prompt_tokens": _path("pre-encoded prompt tokens, a (10, T) integer array, relative to the job file", ".npy"),
        "reference_id": {"type": "string", "pattern": REFERENCE_ID.pattern,
                         "description": "a stored voice (fishmp serve's /v1/references/add; the CLI reads the store "
                                        "in FISH_SERVE_DATA_DIR); reference_text defaults to its stored transcript"},
        "reference_text": {"type": "string", "minLength": 1, "description": "the transcript of the reference"},
    }, [], "a voice: reference_audio or prompt_tokens and its transcript, or a stored voice's reference_id")
    speaker["oneOf"] = [{"required": ["reference_audio", "reference_text"]},
                        {"required": ["prompt_tokens", "reference_text"]}, {"required": ["reference_id"]}]
    segment = _obj({
        "id": {"type": "string", "pattern": _NAME, "description": "unique; default: the position, 0001, 0002..."},
        "speaker": {"type": "string", "description": "a key of speakers"},
        "text": {"type": "string", "minLength": 1, "description": "what to say"},
        "output": _path("wav path inside the output directory; default <id>.wav") | {
            "pattern": f"^{_VISIBLE}*\\.[wW][aA][vV]$"},
        "params": params_schema(),
        "max_seconds": {"type": ["number", "null"], "exclusiveMinimum": 0, "maximum": MAX_SECONDS_LIMIT,
                        "description": "the subtitle slot: a longer take fails the take check (retried, then kept "
                                       "as the closest, with over_slot_s in the manifest); a fitted line "
                                       "is fitted to it"},
        "start": {"type": "number", "minimum": 0, "maximum": MAX_VIDEO_SECONDS,
                  "description": "where the line starts in the video, seconds; the track places it there"},
        "end": {"type": "number", "minimum": 0, "maximum": MAX_VIDEO_SECONDS,
                "description": "where the original line ends (> start, needs start): end - start is the slot"},
        "fit": fit_schema(),
    }, ["speaker", "text"], "one line to synthesize")
    segment["dependentRequired"] = {"end": ["start"]}
    schema = _obj({
        "speakers": {"type": "object", "description": "speaker id -> voice", "additionalProperties": speaker,
                     "propertyNames": {"pattern": _NAME}},
        "segments": {"type": "array", "minItems": 1, "items": segment},
        "params": params_schema(),
        "output_dir": _path("relative to the job file, and inside its directory (or FISH_OUTPUT_ROOT)"),
        "fit": fit_schema(),
        "video_seconds": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_VIDEO_SECONDS,
                          "description": "the film's length: track.wav is at least this long"},
    }, ["speakers", "segments"], "a fishmp job: speakers with reference audio, and the segments to say in their voices")
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": "https://fishmp/job.schema.json",
            "title": "fishmp job", **schema}
