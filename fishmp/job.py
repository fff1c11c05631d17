"""The job model: what to synthesize, in whose voice, and where to write it. Pure: no processes, no torch.

Three input formats are read:

* fishmp's own (``{"speakers": {...}, "segments": [...], "params": {...}}``),
* the legacy generate config that dubbing backends write (``{"mode": "generate", "tasks": [...]}``),
* the legacy encode config (``{"mode": "encode", "speakers": [...]}``), which has no segments and loads as an
  `EncodeJob` (`load_encode_config`; `load_config` dispatches on the format).

Parsing collects every problem it finds and raises one `JobError` listing them all, each naming the item it is
about. This module is also where the output guarantee lives: every output path in a loaded job is absolute, ends in
the required suffix and resolves (symlinks included, via ``os.path.realpath``) to a file strictly inside the output
directory, so nothing in a job file can make fishmp write anywhere else. Writers should still replace files
atomically (temp file + ``os.replace``) so a symlink planted after loading is replaced rather than followed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "PARAM_KEYS",
    "EncodeItem",
    "EncodeJob",
    "Job",
    "JobError",
    "Params",
    "Segment",
    "Speaker",
    "default_output_dir",
    "detect_format",
    "encode_job_from_dict",
    "job_from_dict",
    "load_config",
    "load_encode_config",
    "load_job",
    "normalize_text",
    "reference_fingerprint",
    "segment_fingerprint",
]

MAX_NEW_TOKENS_LIMIT = 8192
MAX_SEED = 2**63 - 1
_MAX_NAME_BYTES = 255  # one path component, as most filesystems allow


# --------------------------------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class Params:
    """Sampling parameters; None means the engine's default."""

    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None

    def merged(self, override: Params) -> Params:
        """These params with every non-None value of `override` taking precedence (segment over job)."""
        return Params(**{
            f.name: getattr(override, f.name) if getattr(override, f.name) is not None else getattr(self, f.name)
            for f in dataclasses.fields(self)
        })

    def to_dict(self) -> dict:
        """Only the values that are set."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}

    @classmethod
    def from_dict(cls, data: Any, where: str = "params") -> Params:
        """Validated params from a mapping; raises JobError listing every bad key or value."""
        problems = _Problems()
        params = _parse_params(data, where, problems)
        if problems:
            raise JobError(problems)
        return params


PARAM_KEYS = tuple(f.name for f in dataclasses.fields(Params))


@dataclass(frozen=True)
class Speaker:
    id: str
    reference_text: str
    reference_audio: str | None = None  # absolute path
    prompt_tokens: str | None = None  # absolute path to a pre-encoded .npy (10, T)

    @property
    def reference_path(self) -> str | None:
        return self.prompt_tokens if self.prompt_tokens is not None else self.reference_audio


@dataclass(frozen=True)
class Segment:
    id: str
    speaker: str
    text: str  # normalised (NFC, no control characters, stripped), never empty
    output: str  # absolute path, guaranteed inside Job.output_dir
    params: Params  # already merged with the job's params
    order: int  # position in the job file (0-based)
    legacy_index: int | None = None  # segment_index of the legacy generate config


@dataclass(frozen=True)
class Job:
    speakers: dict[str, Speaker]
    segments: tuple[Segment, ...]
    output_dir: str  # absolute
    checkpoint_dir: str | None = None  # from legacy configs
    legacy: str | None = None  # None (fishmp format) | "generate"
    source: str | None = None  # the job file path


@dataclass(frozen=True)
class EncodeItem:
    speaker_id: int | str
    reference_audio: str  # absolute path
    reference_text: str
    output_npy: str  # absolute path, guaranteed inside EncodeJob.output_dir


@dataclass(frozen=True)
class EncodeJob:
    items: tuple[EncodeItem, ...]
    output_dir: str  # absolute
    checkpoint_dir: str | None = None
    source: str | None = None
    legacy: str = "encode"


class JobError(ValueError):
    """A job cannot be used. `.problems` lists every problem found; str() gives them one per line."""

    def __init__(self, problems: Iterable[str], source: str | None = None) -> None:
        self.problems: list[str] = list(problems)
        self.source = source
        super().__init__("\n".join(self.problems))

    def __str__(self) -> str:
        return "\n".join(self.problems)


# --------------------------------------------------------------------------------------------------- loading


class _Obj(dict):
    """A JSON object that remembers keys given more than once (json keeps the last one silently)."""

    duplicates: tuple[str, ...] = ()


def _object_hook(pairs: list[tuple[str, Any]]) -> _Obj:
    obj = _Obj()
    dups: list[str] = []
    for key, value in pairs:
        if key in obj and key not in dups:
            dups.append(key)
        obj[key] = value
    if dups:
        obj.duplicates = tuple(dups)
    return obj


def _read_json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8-sig") as f:
            text = f.read()
    except FileNotFoundError:
        raise JobError([f"{path}: job file does not exist"], path) from None
    except IsADirectoryError:
        raise JobError([f"{path}: is a directory, not a job file"], path) from None
    except UnicodeDecodeError as e:
        raise JobError([f"{path}: not UTF-8 text (byte {e.start})"], path) from None
    except OSError as e:
        raise JobError([f"{path}: cannot read job file: {e.strerror or e}"], path) from None
    try:
        return json.loads(text, object_pairs_hook=_object_hook)
    except json.JSONDecodeError as e:
        raise JobError([f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"], path) from None
    except RecursionError:
        raise JobError([f"{path}: invalid JSON: nested too deeply"], path) from None


def detect_format(data: Any) -> str | None:
    """"new" (fishmp's format), "generate" or "encode" (legacy configs), or None when it is none of them."""
    if not isinstance(data, dict):
        return None
    mode = data.get("mode")
    if mode in ("generate", "encode"):
        return mode
    if "mode" in data:
        return None
    if "tasks" in data and "segments" not in data:
        return "generate"
    if "segments" in data or "speakers" in data:
        return "new"
    return None


def default_output_dir(path: str, data: Any) -> str:
    """The output directory a job file asks for (its "output_dir", resolved against the job file's directory),
    else ``fishmp-out/<job file stem>`` under the current directory. Always absolute; never raises."""
    if isinstance(data, dict):
        out = data.get("output_dir")
        if isinstance(out, str) and out.strip() and not _bad_path_chars(out):
            base = os.path.dirname(os.path.abspath(path))
            return os.path.abspath(os.path.join(base, out))
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0] or "job"
    return os.path.abspath(os.path.join("fishmp-out", stem))


def load_job(path: str, output_dir: str | None = None) -> Job:
    """Read a job file (fishmp format or legacy generate config), parse and validate it.

    `output_dir` overrides the directory the file asks for (see `default_output_dir`). Raises JobError with every
    problem found, including for a legacy encode config (load that with `load_encode_config` or `load_config`).
    """
    data = _read_json(path)
    fmt = detect_format(data)
    if fmt == "encode":
        raise JobError([f'{path}: is a legacy encode config ("mode": "encode") with no segments to synthesize; '
                        "load it with load_encode_config()"], path)
    out = output_dir if output_dir is not None else default_output_dir(path, data)
    try:
        return job_from_dict(data, os.path.dirname(os.path.abspath(path)), out, source=os.path.abspath(path))
    except JobError as e:
        e.source = path
        raise


def load_encode_config(path: str, output_dir: str | None = None) -> EncodeJob:
    """Read and validate a legacy encode config. Raises JobError with every problem found."""
    data = _read_json(path)
    fmt = detect_format(data)
    if fmt is not None and fmt != "encode":
        raise JobError([f'{path}: is not a legacy encode config (expected "mode": "encode")'], path)
    out = output_dir if output_dir is not None else default_output_dir(path, data)
    try:
        return encode_job_from_dict(data, os.path.dirname(os.path.abspath(path)), out,
                                    source=os.path.abspath(path))
    except JobError as e:
        e.source = path
        raise


def load_config(path: str, output_dir: str | None = None) -> Job | EncodeJob:
    """Any of the three formats: an EncodeJob for a legacy encode config, else a Job."""
    data = _read_json(path)
    if detect_format(data) == "encode":
        return load_encode_config(path, output_dir)
    return load_job(path, output_dir)


def job_from_dict(data: Any, base_dir: str, output_dir: str, *, source: str | None = None) -> Job:
    """A validated Job from Python objects (fishmp format or legacy generate config).

    Relative reference paths resolve against `base_dir`, relative outputs against `output_dir`.
    """
    p = _Problems()
    base = os.path.abspath(base_dir)
    out = _check_output_dir(output_dir, p)
    fmt = detect_format(data)
    if fmt is None:
        if not isinstance(data, dict):
            p.add(f"a job must be a JSON object, not {_typename(data)}")
        elif "mode" in data:
            p.add(f'unknown "mode" {data["mode"]!r}: expected "generate" or "encode" (legacy configs), '
                  "or no mode (fishmp format)")
        else:
            p.add('a job needs "speakers" and "segments" (fishmp format) or "tasks" (legacy generate config)')
        raise JobError(p, source)
    if fmt == "encode":
        p.add('a legacy encode config ("mode": "encode") has no segments to synthesize; use encode_job_from_dict()')
        raise JobError(p, source)
    if fmt == "new":
        job = _parse_new(data, base, out, p, source)
    else:
        job = _parse_generate(data, base, out, p, source)
    if p:
        raise JobError(p, source)
    assert job is not None
    return job


def encode_job_from_dict(data: Any, base_dir: str, output_dir: str, *, source: str | None = None) -> EncodeJob:
    """A validated EncodeJob from a legacy encode config given as Python objects."""
    p = _Problems()
    base = os.path.abspath(base_dir)
    out = _check_output_dir(output_dir, p)
    if not isinstance(data, dict):
        p.add(f"an encode config must be a JSON object, not {_typename(data)}")
        raise JobError(p, source)
    _check_duplicate_keys(data, "config", p)
    if data.get("mode", "encode") != "encode":
        p.add(f'"mode" must be "encode", not {data.get("mode")!r}')
    checkpoint_dir = _opt_dir(data, "checkpoint_dir", base, p)
    _check_opt_path(data, "output_dir", "config", p)
    speakers = data.get("speakers")
    items: list[EncodeItem] = []
    if speakers is None:
        p.add('config: missing "speakers" (a list of speakers to encode)')
    elif not isinstance(speakers, list):
        p.add(f'config: "speakers" must be a list, not {_typename(speakers)}')
    elif not speakers:
        p.add('config: "speakers" is empty: nothing to encode')
    else:
        seen: dict[str, int] = {}
        outputs = _Outputs(out, p)
        for i, where, raw in _objects(speakers, "speakers", p):
            sid = raw.get("speaker_id")
            if not _is_id(sid):
                p.add(f'{where}: "speaker_id" must be an integer or a non-empty string, not {sid!r}'
                      if "speaker_id" in raw else f'{where}: missing "speaker_id"')
                sid = None
            else:
                where = f'speaker "{sid}"'
                if str(sid) in seen:
                    p.add(f"{where}: defined more than once (speakers[{seen[str(sid)]}] and speakers[{i}])")
                else:
                    seen[str(sid)] = i
            audio = _reference_file(raw, "reference_audio", base, where, p, required=True)
            text = _reference_text(raw, where, p)
            default = f"speaker_{sid}.npy" if sid is not None else None
            output = outputs.resolve(raw.get("output_npy", default), where, "output_npy", ".npy",
                                     given="output_npy" in raw and raw["output_npy"] is not None)
            if sid is not None and audio and text and output:
                items.append(EncodeItem(sid, audio, text, output))
        outputs.check_collisions([(f'speaker "{it.speaker_id}"', "reference_audio", it.reference_audio)
                                  for it in items])
    if p:
        raise JobError(p, source)
    return EncodeJob(tuple(items), out, checkpoint_dir, source)


# --------------------------------------------------------------------------------------------------- fingerprints


def reference_fingerprint(speaker: Speaker) -> str:
    """sha256 of the speaker's reference file bytes (prompt tokens or audio) and reference text.

    Reads the file (references are small); raises OSError when it cannot be read.
    """
    h = hashlib.sha256(b"fishmp-reference-v1\0")
    kind, path = ("prompt_tokens", speaker.prompt_tokens) if speaker.prompt_tokens else \
        ("reference_audio", speaker.reference_audio)
    h.update(kind.encode() + b"\0")
    if path:
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    h.update(b"\0" + speaker.reference_text.encode("utf-8"))
    return h.hexdigest()


def segment_fingerprint(segment: Segment, speaker_fingerprint: str, engine_fingerprint: str) -> str:
    """sha256 over what determines a segment's audio: text, params, the speaker's reference and the engine.

    Not the segment id, order or output path: moving or renumbering a segment does not change its audio.
    """
    payload = {
        "v": 1,
        "text": segment.text,
        "params": segment.params.to_dict(),
        "speaker": speaker_fingerprint,
        "engine": engine_fingerprint,
    }
    blob = json.dumps(payload, sort_keys=True, ensure_ascii=False, separators=(",", ":"), allow_nan=True)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------------------------------- text


_SPACE_CONTROLS = {"\t", "\n", "\r", "\v", "\f", "\x1c", "\x1d", "\x1e", "\x1f", "\x85", "\u2028", "\u2029"}


def normalize_text(text: str) -> str:
    """NFC; tabs and line breaks become spaces; other control characters (and lone surrogates) are removed;
    surrounding whitespace is stripped. Mixed scripts are left alone."""
    text = unicodedata.normalize("NFC", text)
    out = []
    for ch in text:
        if ch in _SPACE_CONTROLS:
            out.append(" ")
        elif unicodedata.category(ch) in ("Cc", "Cs") or ch == "\ufeff":
            continue
        else:
            out.append(ch)
    return "".join(out).strip()


def _bad_path_chars(path: str) -> list[str]:
    return [ch for ch in dict.fromkeys(path) if unicodedata.category(ch) in ("Cc", "Cs")]


# --------------------------------------------------------------------------------------------------- internals


class _Problems(list):
    def add(self, message: str) -> None:
        self.append(message)


def _typename(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _is_id(x: Any) -> bool:
    return _is_int(x) or (isinstance(x, str) and bool(x.strip()) and not _bad_path_chars(x))


def _check_duplicate_keys(obj: Any, where: str, p: _Problems) -> None:
    for key in getattr(obj, "duplicates", ()):
        p.add(f"{where}: key {key!r} is given more than once")


def _check_opt_path(obj: dict, key: str, where: str, p: _Problems) -> None:
    value = obj.get(key)
    if value is not None and (not isinstance(value, str) or not value.strip()):
        p.add(f'{where}: "{key}" must be a non-empty path, not {value!r}')
    elif isinstance(value, str) and _bad_path_chars(value):
        p.add(f'{where}: "{key}" {value!r} contains control characters')


def _check_output_dir(output_dir: Any, p: _Problems) -> str:
    if not isinstance(output_dir, str) or not output_dir.strip():
        p.add(f"output directory must be a non-empty path, not {output_dir!r}")
        return os.path.abspath("fishmp-out")
    if _bad_path_chars(output_dir):
        p.add(f"output directory {output_dir!r} contains control characters")
    out = os.path.abspath(output_dir)
    if os.path.exists(out) and not os.path.isdir(out):
        p.add(f"output directory {out} exists and is not a directory")
    return out


def _opt_dir(data: dict, key: str, base: str, p: _Problems) -> str | None:
    value = data.get(key)
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        p.add(f'config: "{key}" must be a non-empty path, not {value!r}')
        return None
    if _bad_path_chars(value):
        p.add(f'config: "{key}" {value!r} contains control characters')
        return None
    return os.path.abspath(os.path.join(base, value))


def _check_float(lo_open: float, hi: float, hi_open: bool) -> Callable[[Any], bool]:
    return lambda v: _is_number(v) and math.isfinite(v) and lo_open < v and (v < hi if hi_open else v <= hi)


_PARAM_RULES: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    # key: (check, allowed, is_integer). Ranges are fish-speech's own asserts in generate_long, so a job that
    # validates never fails inside the engine.
    "temperature": (_check_float(0.0, 2.0, True), "a number > 0 and < 2", False),
    "top_p": (_check_float(0.0, 1.0, False), "a number > 0 and <= 1", False),
    "repetition_penalty": (_check_float(0.0, 2.0, True), "a number > 0 and < 2 (typically 1.0 to 1.5)", False),
    "max_new_tokens": (lambda v: _is_int(v) and 1 <= v <= MAX_NEW_TOKENS_LIMIT,
                       f"an integer from 1 to {MAX_NEW_TOKENS_LIMIT}", True),
    "seed": (lambda v: _is_int(v) and 0 <= v <= MAX_SEED, "an integer >= 0", True),
}


def _parse_params(raw: Any, where: str, p: _Problems, *, keys: Iterable[str] | None = None) -> Params:
    """Params from a mapping. With `keys`, only those keys are read and others ignored (legacy tasks, whose
    objects carry other fields); without, every key must be a parameter."""
    if raw is None:
        return Params()
    if not isinstance(raw, dict):
        p.add(f"{where}: params must be an object, not {_typename(raw)}")
        return Params()
    if keys is None:
        _check_duplicate_keys(raw, where, p)
        unknown = [k for k in raw if k not in _PARAM_RULES]
        for k in unknown:
            p.add(f"{where}: unknown parameter {k!r} (known: {', '.join(PARAM_KEYS)})")
    values: dict[str, Any] = {}
    for key in PARAM_KEYS:
        if keys is not None and key not in keys:
            continue
        if key not in raw or raw[key] is None:
            continue
        value = raw[key]
        check, allowed, is_integer = _PARAM_RULES[key]
        if not check(value):
            p.add(f"{where}: {key} must be {allowed}, not {value!r}")
            continue
        values[key] = int(value) if is_integer else float(value)
    return Params(**values)


def _params_in(obj: dict, where: str, p: _Problems) -> Params:
    """Legacy objects: parameter keys given directly on the object, overridden by a nested "params" object."""
    flat = _parse_params(obj, where, p, keys=PARAM_KEYS)
    nested = _parse_params(obj.get("params"), f"{where} params", p)
    return flat.merged(nested)


def _reference_file(obj: dict, key: str, base: str, where: str, p: _Problems, *, required: bool,
                    npy: bool = False) -> str | None:
    """The absolute path of a reference file named by obj[key], checked to exist (and, for .npy, to hold a 2-D
    integer array); None (after reporting) when unusable."""
    if key not in obj or obj[key] is None:
        if required:
            p.add(f'{where}: missing "{key}"')
        return None
    raw = obj[key]
    if not isinstance(raw, str) or not raw.strip():
        p.add(f"{where}: {key} must be a non-empty path, not {raw!r}")
        return None
    if _bad_path_chars(raw):
        p.add(f"{where}: {key} {raw!r} contains control characters")
        return None
    path = os.path.abspath(os.path.join(base, raw))
    shown = raw if raw == path else f"{raw} ({path})"
    if not os.path.exists(path):
        p.add(f"{where}: {key} {shown} does not exist")
        return None
    if not os.path.isfile(path):
        p.add(f"{where}: {key} {shown} is not a file")
        return None
    if npy:
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
            ok = isinstance(arr, np.ndarray) and arr.ndim == 2 and np.issubdtype(arr.dtype, np.integer) \
                and arr.shape[1] > 0
            desc = f"shape {arr.shape}, dtype {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
        except Exception as e:  # noqa: BLE001 - any unreadable file is a problem to report, not a crash
            p.add(f"{where}: {key} {shown} is not a readable .npy array ({type(e).__name__}: {e})")
            return None
        if not ok:
            p.add(f"{where}: {key} {shown} must hold prompt tokens, a 2-D integer array (codebooks, T); "
                  f"found {desc}")
            return None
    return path


def _reference_text(obj: dict, where: str, p: _Problems) -> str | None:
    raw = obj.get("reference_text")
    if raw is None:
        p.add(f'{where}: missing "reference_text" (the transcript of the reference audio)')
        return None
    if not isinstance(raw, str):
        p.add(f"{where}: reference_text must be a string, not {_typename(raw)}")
        return None
    text = normalize_text(raw)
    if not text:
        p.add(f"{where}: reference_text is empty")
        return None
    return text


def _segment_text(obj: dict, key: str, where: str, p: _Problems) -> str | None:
    if key not in obj or obj[key] is None:
        p.add(f'{where}: missing "{key}"')
        return None
    raw = obj[key]
    if not isinstance(raw, str):
        p.add(f"{where}: {key} must be a string, not {_typename(raw)}")
        return None
    text = normalize_text(raw)
    if not text:
        p.add(f"{where}: {key} is empty" + (" (only whitespace or control characters)" if raw else ""))
        return None
    return text


def _inside(path: str, directory: str) -> bool:
    try:
        return path != directory and os.path.commonpath([path, directory]) == directory
    except ValueError:
        return False


class _Outputs:
    """Resolves output paths into the output directory and remembers them to find duplicates and collisions."""

    def __init__(self, out_dir: str, p: _Problems) -> None:
        self.out = out_dir
        self.real = os.path.realpath(out_dir)
        self.p = p
        self.owner: dict[str, str] = {}  # resolved output -> item that writes it

    def resolve(self, raw: Any, where: str, key: str, suffix: str, *, given: bool = True) -> str | None:
        p = self.p
        if raw is None:
            if given:
                p.add(f'{where}: missing "{key}"')
            return None
        if not isinstance(raw, str):
            p.add(f"{where}: {key} must be a path string, not {_typename(raw)}")
            return None
        if not raw.strip():
            p.add(f"{where}: {key} is empty")
            return None
        bad = _bad_path_chars(raw)
        if bad:
            p.add(f"{where}: {key} {raw!r} contains control characters ({', '.join(repr(c) for c in bad)})")
            return None
        if "\\" in raw:
            p.add(f"{where}: {key} {raw!r} contains a backslash; use / to separate directories")
            return None
        stem, ext = os.path.splitext(os.path.basename(raw))
        if ext.lower() != suffix or not stem:
            p.add(f"{where}: {key} {raw!r} must be a file name ending in {suffix}")
            return None
        candidate = raw if os.path.isabs(raw) else os.path.join(self.out, raw)
        real = os.path.realpath(candidate)
        if not _inside(real, self.real):
            how = "resolves" if os.path.normpath(candidate) != real else "is"
            p.add(f"{where}: {key} {raw!r} {how} outside the output directory {self.out}"
                  + (f" (to {real})" if how == "resolves" else ""))
            return None
        rel = os.path.relpath(real, self.real)
        too_long = [c for c in rel.split(os.sep) if len(c.encode("utf-8", "surrogateescape")) > _MAX_NAME_BYTES]
        if too_long:
            p.add(f"{where}: {key} {raw!r} has a file or directory name longer than {_MAX_NAME_BYTES} bytes")
            return None
        if os.path.isdir(real):
            p.add(f"{where}: {key} {raw!r} is an existing directory")
            return None
        output = os.path.join(self.out, rel)
        if output in self.owner:
            p.add(f"{where}: {key} {raw!r} is also the output of {self.owner[output]} ({output})")
            return None
        self.owner[output] = where
        return output

    def check_collisions(self, references: list[tuple[str, str, str | None]]) -> None:
        """Outputs that would overwrite a reference file, or that another output needs as a directory."""
        by_real = {os.path.realpath(o): o for o in self.owner}
        for who, key, path in references:
            if path and os.path.realpath(path) in by_real:
                out = by_real[os.path.realpath(path)]
                self.p.add(f"{self.owner[out]}: output {out} would overwrite {who}'s {key}")
        for out, where in self.owner.items():
            parent = os.path.dirname(out)
            while _inside(parent, self.out):
                if parent in self.owner:
                    self.p.add(f"{where}: output {out} needs {parent} as a directory, but it is the output of "
                               f"{self.owner[parent]}")
                    break
                parent = os.path.dirname(parent)


_NEW_TOP_KEYS = {"speakers", "segments", "params", "output_dir"}
_NEW_SPEAKER_KEYS = {"reference_audio", "prompt_tokens", "reference_text"}
_NEW_SEGMENT_KEYS = {"id", "speaker", "text", "output", "params"}


def _objects(items: list, name: str, p: _Problems) -> Iterator[tuple[int, str, dict]]:
    """(index, "name[i]", item) for the items that are JSON objects; the others are recorded as problems."""
    for i, raw in enumerate(items):
        where = f"{name}[{i}]"
        if not isinstance(raw, dict):
            p.add(f"{where}: must be an object, not {_typename(raw)}")
            continue
        _check_duplicate_keys(raw, where, p)
        yield i, where, raw


def _required_list(data: dict, key: str, where: str, what: str, p: _Problems) -> list:
    """data[key] as a non-empty list, or [] with the problem recorded."""
    value = data.get(key)
    if value is None:
        p.add(f'{where}: missing "{key}" ({what})')
        return []
    if not isinstance(value, list):
        p.add(f'{where}: "{key}" must be a list, not {_typename(value)}')
        return []
    if not value:
        p.add(f"{where}: no {key}: nothing to do")
    return value


def _unknown_keys(obj: dict, allowed: set[str], where: str, p: _Problems) -> None:
    for key in obj:
        if key not in allowed and not (isinstance(key, str) and key.startswith("_")):
            p.add(f"{where}: unknown key {key!r} (expected: {', '.join(sorted(allowed))})")


def _parse_new(data: dict, base: str, out: str, p: _Problems, source: str | None) -> Job | None:
    _check_duplicate_keys(data, "job", p)
    _unknown_keys(data, _NEW_TOP_KEYS, "job", p)
    _check_opt_path(data, "output_dir", "job", p)
    job_params = _parse_params(data.get("params"), "job params", p)

    speakers: dict[str, Speaker] = {}
    raw_speakers = data.get("speakers")
    speakers_usable = isinstance(raw_speakers, dict)  # else "speaker is not defined" would only repeat the problem
    if raw_speakers is None:
        p.add('job: missing "speakers" (an object mapping speaker ids to their reference)')
        raw_speakers = {}
    elif not isinstance(raw_speakers, dict):
        p.add(f'job: "speakers" must be an object mapping speaker ids to references, not {_typename(raw_speakers)}')
        raw_speakers = {}
    for sid in getattr(raw_speakers, "duplicates", ()):
        p.add(f'speaker "{sid}": defined more than once')
    for sid, raw in raw_speakers.items():
        where = f'speaker "{sid}"'
        if not isinstance(sid, str) or not _is_id(sid) or sid != sid.strip():
            p.add(f"speakers: invalid speaker id {sid!r} (must be non-empty, without surrounding whitespace or "
                  "control characters)")
            continue
        if not isinstance(raw, dict):
            p.add(f"{where}: must be an object with reference_text and reference_audio or prompt_tokens, "
                  f"not {_typename(raw)}")
            continue
        _check_duplicate_keys(raw, where, p)
        _unknown_keys(raw, _NEW_SPEAKER_KEYS, where, p)
        has_audio = raw.get("reference_audio") is not None
        has_tokens = raw.get("prompt_tokens") is not None
        if has_audio and has_tokens:
            p.add(f"{where}: give either reference_audio or prompt_tokens, not both")
        elif not has_audio and not has_tokens:
            p.add(f"{where}: needs reference_audio (a recording of the voice) or prompt_tokens (a pre-encoded .npy)")
        audio = _reference_file(raw, "reference_audio", base, where, p, required=False)
        tokens = _reference_file(raw, "prompt_tokens", base, where, p, required=False, npy=True)
        text = _reference_text(raw, where, p)
        if text is not None and (audio is not None) != (tokens is not None):
            speakers[sid] = Speaker(sid, text, audio, tokens)
    defined = ", ".join(str(k) for k in raw_speakers) if raw_speakers else "none"

    segments: list[Segment] = []
    raw_segments = _required_list(data, "segments", "job", "a list of texts to synthesize", p)
    outputs = _Outputs(out, p)
    ids: dict[str, int] = {}
    for i, raw in enumerate(raw_segments):
        where = f"segments[{i}]"
        if not isinstance(raw, dict):
            p.add(f"{where}: must be an object with speaker and text, not {_typename(raw)}")
            continue
        seg_id: str | None = f"{i + 1:04d}"
        duplicate_id = False
        if "id" in raw and raw["id"] is not None:
            if not isinstance(raw["id"], str) or not _is_id(raw["id"]) or raw["id"] != raw["id"].strip():
                p.add(f"{where}: id must be a non-empty string without surrounding whitespace or control "
                      f"characters, not {raw['id']!r}")
                seg_id = None
            else:
                seg_id = raw["id"]
        if seg_id is not None:
            where = f'segment "{seg_id}"'
            if seg_id in ids:
                p.add(f"{where}: duplicate segment id (segments[{ids[seg_id]}] and segments[{i}])")
                duplicate_id = True
            else:
                ids[seg_id] = i
        _check_duplicate_keys(raw, where, p)
        _unknown_keys(raw, _NEW_SEGMENT_KEYS, where, p)
        speaker = raw.get("speaker")
        if speaker is None:
            p.add(f'{where}: missing "speaker" (speakers: {defined})')
        elif not isinstance(speaker, str):
            p.add(f"{where}: speaker must be a speaker id string, not {_typename(speaker)}")
            speaker = None
        elif speaker not in raw_speakers:
            if speakers_usable:
                p.add(f'{where}: speaker "{speaker}" is not defined (speakers: {defined})')
            speaker = None
        text = _segment_text(raw, "text", where, p)
        params = job_params.merged(_parse_params(raw.get("params"), f"{where} params", p))
        raw_out = raw.get("output")
        given = raw_out is not None
        if not given:
            # a duplicate id's default output would only repeat the duplicate-id problem
            raw_out = f"{seg_id}.wav" if seg_id is not None and not duplicate_id else None
        output = outputs.resolve(raw_out, where, "output", ".wav", given=given)
        if seg_id is not None and speaker is not None and text is not None and output is not None:
            segments.append(Segment(seg_id, speaker, text, output, params, i))
    outputs.check_collisions([(f'speaker "{s.id}"', "prompt_tokens" if s.prompt_tokens else "reference_audio",
                               s.reference_path) for s in speakers.values()])
    if p:
        return None
    return Job(speakers, tuple(segments), out, None, None, source)


def _parse_generate(data: dict, base: str, out: str, p: _Problems, source: str | None) -> Job | None:
    _check_duplicate_keys(data, "config", p)
    if data.get("mode", "generate") != "generate":
        p.add(f'config: "mode" must be "generate", not {data.get("mode")!r}')
    checkpoint_dir = _opt_dir(data, "checkpoint_dir", base, p)
    _check_opt_path(data, "output_dir", "config", p)
    job_params = _params_in(data, "config", p)

    tasks = _required_list(data, "tasks", "config", "a list of segments to generate", p)

    speakers: dict[str, Speaker] = {}
    first_task: dict[str, tuple[str, str | None, str | None]] = {}  # speaker id -> (task name, npy, text)
    failed_speakers: set[str] = set()
    segments: list[Segment] = []
    outputs = _Outputs(out, p)
    ids: dict[str, int] = {}
    for i, where, raw in _objects(tasks, "tasks", p):
        index = raw.get("segment_index")
        seg_id: str | None = None
        if not (_is_int(index) and index >= 0):
            p.add(f'{where}: "segment_index" must be an integer >= 0, not {index!r}' if "segment_index" in raw
                  else f'{where}: missing "segment_index"')
            index = None
        else:
            seg_id = str(index)
            where = f'segment "{seg_id}"'
            if seg_id in ids:
                p.add(f"{where}: duplicate segment_index (tasks[{ids[seg_id]}] and tasks[{i}])")
            else:
                ids[seg_id] = i

        sid_raw = raw.get("speaker_id")
        sid: str | None = None
        if not _is_id(sid_raw):
            p.add(f'{where}: "speaker_id" must be an integer or a non-empty string, not {sid_raw!r}'
                  if "speaker_id" in raw else f'{where}: missing "speaker_id"')
        else:
            sid = str(sid_raw)
            swhere = f'speaker "{sid}"'
            if sid not in first_task:
                npy = _reference_file(raw, "npy_file", base, f"{swhere} ({where})", p, required=True, npy=True)
                rtext = _reference_text(raw, f"{swhere} ({where})", p)
                first_task[sid] = (where, npy, rtext)
                if npy is not None and rtext is not None:
                    speakers[sid] = Speaker(sid, rtext, None, npy)
                else:
                    failed_speakers.add(sid)
            else:
                first_where, npy0, text0 = first_task[sid]
                npy_raw, text_raw = raw.get("npy_file"), raw.get("reference_text")
                npy = os.path.abspath(os.path.join(base, npy_raw)) if isinstance(npy_raw, str) else npy_raw
                rtext = normalize_text(text_raw) if isinstance(text_raw, str) else text_raw
                if sid not in failed_speakers and npy != npy0:
                    p.add(f"{swhere}: {where} uses npy_file {npy_raw!r} but {first_where} uses {npy0} "
                          "for the same speaker_id")
                if sid not in failed_speakers and rtext != text0:
                    p.add(f"{swhere}: {where} has a different reference_text than {first_where} "
                          f"for the same speaker_id ({rtext!r} vs {text0!r})")

        text = _segment_text(raw, "target_text", where, p)
        params = job_params.merged(_params_in(raw, where, p))
        output = outputs.resolve(raw.get("output_file"), where, "output_file", ".wav")
        if seg_id is not None and sid is not None and text is not None and output is not None:
            assert index is not None
            segments.append(Segment(seg_id, sid, text, output, params, i, index))
    outputs.check_collisions([(f'speaker "{s.id}"', "npy_file", s.prompt_tokens) for s in speakers.values()])
    if p:
        return None
    return Job(speakers, tuple(segments), out, checkpoint_dir, "generate", source)
