"""Reading job files: JSON (duplicate keys remembered), format detection, where outputs go, and the entry points
`load_job`, `load_encode_config`, `load_config`, `job_from_dict` and `encode_job_from_dict`."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

from .checks import JobError, Problems, bad_name_chars, check_output_dir, typename
from .formats import parse_encode, parse_generate, parse_new
from .model import EncodeJob, Job


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


def read_json(path: str) -> Any:
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
        if isinstance(out, str) and out.strip() and not bad_name_chars(out):
            base = os.path.dirname(os.path.abspath(path))
            return os.path.abspath(os.path.join(base, out))
    stem = os.path.splitext(os.path.basename(os.path.normpath(path)))[0] or "job"
    return os.path.abspath(os.path.join("fishmp-out", stem))


def _within(path: str, root: str) -> bool:
    path, root = os.path.realpath(path), os.path.realpath(root)
    return path == root or os.path.commonpath([path, root]) == root


def output_dir_escape(path: str, data: Any, output_root: str | None) -> str | None:
    """Why the output_dir a job file asks for is not allowed, or None. A job file is data (possibly from a dubbing
    app's users): it may write below the operator's FISH_OUTPUT_ROOT when one is set, and then only there (a job
    file sitting in the tree it writes to, or a temp config under /tmp, does not widen it); without a root, below
    its own directory. A relative root is resolved against the current directory."""
    if not isinstance(data, dict) or not isinstance(data.get("output_dir"), str) or not data["output_dir"].strip():
        return None
    out = default_output_dir(path, data)
    asked = f'"output_dir" {data["output_dir"]!r} ({out})'
    if output_root:
        root = os.path.abspath(output_root)
        if _within(out, root):
            return None
        shown = root if root == output_root else f"{output_root!r} (resolved against the current directory: {root})"
        return (f"{asked} is outside FISH_OUTPUT_ROOT {shown}: with a root set, a job file may only write below it; "
                "choose an output_dir there, or pass -o on the command line")
    base = os.path.dirname(os.path.abspath(path))
    if _within(out, base):
        return None
    return (f"{asked} is outside the job file's directory {base}: a job file may only write there; set "
            "FISH_OUTPUT_ROOT to a directory that contains it, or pass -o on the command line")


def load_job(path: str, output_dir: str | None = None, *, skip_invalid: bool | None = False,
             output_root: str | None = None, voices: Any = None) -> Job:
    """Read a job file (fishmp format or legacy generate config), parse and validate it.

    `output_dir` (the operator's choice) overrides the directory the file asks for (see `default_output_dir`), which
    must lie below the job file's directory or `output_root`. `skip_invalid`: False raises JobError with every
    problem; True leaves out the segments (and speakers) that have one, keeping their problems in `Job.skipped`;
    None does that for legacy configs only. A legacy encode config is an error here (see `load_encode_config`).
    """
    data = read_json(path)
    if detect_format(data) == "encode":
        raise JobError([f'{path}: is a legacy encode config ("mode": "encode") with no segments to synthesize; '
                        "load it with load_encode_config()"], path)
    escape = None if output_dir is not None else output_dir_escape(path, data, output_root)
    out = output_dir if output_dir is not None else default_output_dir(path, data)
    try:
        return job_from_dict(data, os.path.dirname(os.path.abspath(path)), out, source=os.path.abspath(path),
                             skip_invalid=skip_invalid, _problems=[escape] if escape else (), voices=voices)
    except JobError as e:
        e.source = path
        raise


def load_encode_config(path: str, output_dir: str | None = None, *, skip_invalid: bool | None = False,
                       output_root: str | None = None) -> EncodeJob:
    """Read and validate a legacy encode config (`skip_invalid` as for `load_job`: None skips, it is legacy)."""
    data = read_json(path)
    fmt = detect_format(data)
    if fmt is not None and fmt != "encode":
        raise JobError([f'{path}: is not a legacy encode config (expected "mode": "encode")'], path)
    escape = None if output_dir is not None else output_dir_escape(path, data, output_root)
    out = output_dir if output_dir is not None else default_output_dir(path, data)
    try:
        return encode_job_from_dict(data, os.path.dirname(os.path.abspath(path)), out, source=os.path.abspath(path),
                                    skip_invalid=skip_invalid is not False, _problems=[escape] if escape else ())
    except JobError as e:
        e.source = path
        raise


def load_config(path: str, output_dir: str | None = None, **kwargs: Any) -> Job | EncodeJob:
    """Any of the three formats: an EncodeJob for a legacy encode config, else a Job."""
    if detect_format(read_json(path)) == "encode":
        return load_encode_config(path, output_dir, **kwargs)
    return load_job(path, output_dir, **kwargs)


def _start(output_dir: Any, problems: Iterable[str]) -> tuple[Problems, str]:
    p = Problems()
    for problem in problems:
        p.add(problem)
    return p, check_output_dir(output_dir, p)


def job_from_dict(data: Any, base_dir: str, output_dir: str, *, source: str | None = None,
                  skip_invalid: bool | None = False, _problems: Iterable[str] = (), voices: Any = None) -> Job:
    """A validated Job from Python objects (fishmp format or legacy generate config).

    Relative reference paths resolve against `base_dir`, relative outputs against `output_dir`; `skip_invalid` as
    for `load_job`. `voices` (a model.VoiceSource) resolves speakers' reference_id and data-URL reference_audio.
    """
    p, out = _start(output_dir, _problems)
    base = os.path.abspath(base_dir)
    fmt = detect_format(data)
    if fmt is None:
        if not isinstance(data, dict):
            p.add(f"a job must be a JSON object, not {typename(data)}")
        elif "mode" in data:
            p.add(f'unknown "mode" {data["mode"]!r}: expected "generate" or "encode" (legacy configs), '
                  "or no mode (fishmp format)")
        else:
            p.add('a job needs "speakers" and "segments" (fishmp format) or "tasks" (legacy generate config)')
        raise JobError(p, source)
    if fmt == "encode":
        p.add('a legacy encode config ("mode": "encode") has no segments to synthesize; use encode_job_from_dict()')
        raise JobError(p, source)
    skip = skip_invalid if skip_invalid is not None else fmt == "generate"
    if fmt == "new":
        return parse_new(data, base, out, p, source, skip, voices)
    return parse_generate(data, base, out, p, source, skip)


def encode_job_from_dict(data: Any, base_dir: str, output_dir: str, *, source: str | None = None,
                         skip_invalid: bool = False, _problems: Iterable[str] = ()) -> EncodeJob:
    """A validated EncodeJob from a legacy encode config given as Python objects."""
    p, out = _start(output_dir, _problems)
    return parse_encode(data, os.path.abspath(base_dir), out, p, source, skip_invalid)
