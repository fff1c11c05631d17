"""Layer 1, settings: every knob of fishmp, from the environment (and `.env`) or from keyword arguments.
Imports nothing else of fishmp: every layer above reads it.

The CLI loads `./.env` (the real environment wins) and calls `Settings.from_env()`; a library caller passes the
same settings as keyword arguments (`Settings(model_memory_gb=6.0)`). Importing fishmp never reads `.env`.
A bad value raises `ConfigError` naming the variable, the value and what is allowed; the CLI turns it into one
line on stderr and exit code 2. An unknown FISH_* variable (a typo) is ignored with a warning naming the closest
setting.
"""

from __future__ import annotations

import dataclasses
import difflib
import io
import logging
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

PRECISIONS = ("bfloat16", "float16", "float32")
MODES = ("auto", "true", "false")
ENGINES = ("fish", "synthetic")
# FISH_* variables that are not settings but are read on purpose: the synthetic test engine's knobs and a benchmark's.
EXTRA_VARIABLES = frozenset({"FISH_BATCH_REFILL", "FISH_BATCH_MIXED"})
EXTRA_PREFIXES = ("FISH_SYNTHETIC_",)
MODEL_MEMORY_GB_RANGE = (0.5, 1024.0)  # below: no real model fits; above: no GPU has it (and the plan's arithmetic)

log = logging.getLogger("fishmp")


class ConfigError(ValueError):
    """A setting has a value fishmp cannot use."""

    def __init__(self, variable: str, value: object, allowed: str, message: str | None = None) -> None:
        self.variable, self.value, self.allowed = variable, value, allowed
        super().__init__(message or f"{variable}={value!r} is not valid: {allowed}")


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError


def _mode(text: str) -> str:
    low = text.strip().lower()
    if low in ("1", "yes", "on"):
        return "true"
    if low in ("0", "no", "off"):
        return "false"
    return low


def _opt_int(text: str) -> int | None:
    """Empty (or none) = no value. 0 is not a synonym: it is rejected by the check, with the allowed range."""
    return None if text.strip().lower() in ("", "none") else int(text)


def _opt_str(text: str) -> str | None:
    return text.strip() or None


def _positive(x: float) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def _gib(x: float) -> bool:
    lo, hi = MODEL_MEMORY_GB_RANGE
    return _positive(x) and lo <= x <= hi


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass(frozen=True)
class _Spec:
    env: str
    parse: Callable[[str], Any]
    check: Callable[[Any], bool]
    allowed: str


def _setting(default: Any, env: str, parse: Callable[[str], Any], check: Callable[[Any], bool], allowed: str) -> Any:
    return field(default=default, metadata={"spec": _Spec(env, parse, check, allowed)})


@dataclass(frozen=True)
class Settings:
    """All settings, with their defaults. Field `x` is read from the variable in its metadata (see `.env.example`)."""

    multiprocess_mode: str = _setting(
        "auto", "FISH_MULTIPROCESS_MODE", _mode, lambda v: v in MODES, "one of true, false, auto")
    model_memory_gb: float | str = _setting(  # "auto": measure one worker per GPU, then fill (fishmp/running/autofill.py)
        8.0, "FISH_MODEL_MEMORY_GB", lambda s: "auto" if s.strip().lower() == "auto" else float(s),
        lambda v: v == "auto" or _gib(v),
        f"a number of GiB from {MODEL_MEMORY_GB_RANGE[0]:g} to {MODEL_MEMORY_GB_RANGE[1]:g} per worker, e.g. 8.0, "
        "or auto (measure one worker per GPU after a warm-up, then fill each GPU)")
    checkpoint_dir: str = _setting(
        "checkpoints/openaudio-s1-mini", "FISH_CHECKPOINT_DIR", str, lambda v: bool(v), "a checkpoint directory")
    precision: str = _setting(
        "bfloat16", "FISH_PRECISION", lambda s: s.strip().lower(), lambda v: v in PRECISIONS,
        "one of bfloat16, float16, float32")
    compile: bool = _setting(False, "FISH_COMPILE", _bool, lambda v: isinstance(v, bool), "true or false")
    devices: str | None = _setting(
        None, "FISH_DEVICES", _opt_str, lambda v: v is None or isinstance(v, str),
        "comma-separated GPU indices or UUIDs, or 'cpu'")
    max_workers: int | None = _setting(
        None, "FISH_MAX_WORKERS", _opt_int, lambda v: v is None or (_is_int(v) and v > 0),
        "a whole number of workers >= 1 (empty: no cap)")
    memory_reserve: float = _setting(
        0.10, "FISH_MEMORY_RESERVE", float, lambda v: _positive(v + 1) and 0 <= v < 1,
        "a fraction of GPU memory kept free, >= 0 and < 1")
    cpu_workers: int = _setting(
        1, "FISH_CPU_WORKERS", int, lambda v: _is_int(v) and v > 0, "a whole number of CPU workers >= 1")
    engine: str = _setting(
        "fish", "FISH_ENGINE", lambda s: s.strip().lower(), lambda v: v in ENGINES,
        "fish (Fish Speech) or synthetic (test engine, no model)")
    max_seq_len: int | str | None = _setting(
        "auto", "FISH_MAX_SEQ_LEN", lambda s: "auto" if s.strip().lower() == "auto" else _opt_int(s),
        lambda v: v is None or v == "auto" or (_is_int(v) and v > 2112),
        "'auto' (sized to the job), or a KV-cache length in tokens > 2112 since fish-speech reserves 2048 for "
        "generation (empty: the checkpoint's, 8192 for S1-mini)")
    cache_dir: str = _setting(
        os.path.join(os.path.expanduser("~"), ".cache", "fishmp"), "FISH_CACHE_DIR", os.path.expanduser, lambda v: bool(v),
        "a directory for cached reference tokens")
    load_timeout_s: float = _setting(
        900.0, "FISH_LOAD_TIMEOUT_S", float, _positive, "seconds a worker may take to load the model, > 0")
    segment_timeout_s: float = _setting(
        120.0, "FISH_SEGMENT_TIMEOUT_S", float, _positive, "base seconds a segment may take before its worker is killed")
    segment_timeout_per_char_s: float = _setting(
        1.0, "FISH_SEGMENT_TIMEOUT_PER_CHAR_S", float, lambda v: _positive(v + 1) and v >= 0,
        "extra seconds allowed per character of text, >= 0")
    segment_timeout_per_frame_s: float = _setting(  # 0.2 s = 5 frames/s: a conservative rate for a row under load
        0.2, "FISH_SEGMENT_TIMEOUT_PER_FRAME_S", float, lambda v: _positive(v + 1) and v >= 0,
        "extra seconds allowed per frame a segment may decode (its max_new_tokens), >= 0")
    start_timeout_s: float = _setting(
        60.0, "FISH_START_TIMEOUT_S", float, _positive,
        "seconds a segment sent to a worker with nothing running may wait for it to start before the worker is "
        "taken for frozen and replaced, > 0")
    max_attempts: int = _setting(
        3, "FISH_MAX_ATTEMPTS", int, lambda v: _is_int(v) and v > 0,
        "how many times a segment may kill its worker before it is failed as poison, >= 1")
    max_restarts: int = _setting(
        3, "FISH_MAX_RESTARTS", int, lambda v: _is_int(v) and v >= 0,
        "replacement workers per slot before the slot is dropped, >= 0")
    shutdown_grace_s: float = _setting(
        10.0, "FISH_SHUTDOWN_GRACE_S", float, lambda v: _positive(v + 1) and v >= 0,
        "seconds running segments may finish after Ctrl-C / SIGTERM, >= 0")

    batch_size: int = _setting(
        1, "FISH_BATCH_SIZE", int, lambda v: _is_int(v) and 1 <= v <= 256,
        "a whole number of segments one worker decodes together, 1 to 256")
    # Streaming rows (fishmp serve's streamed lines, docs/server.md#streaming): a row marked for streaming hands its
    # codes to the codec every few frames (a small first chunk, larger ones after), each decoded with left context.
    stream_first_frames: int = _setting(
        8, "FISH_STREAM_FIRST_FRAMES", int, lambda v: _is_int(v) and 1 <= v <= 1024,
        "frames (about 46 ms each) of a streamed line's first audio chunk, 1 to 1024")
    stream_frames: int = _setting(
        32, "FISH_STREAM_FRAMES", int, lambda v: _is_int(v) and 1 <= v <= 1024,
        "frames of each later audio chunk of a streamed line, 1 to 1024")
    stream_context_frames: int = _setting(
        16, "FISH_STREAM_CONTEXT_FRAMES", int, lambda v: _is_int(v) and 0 <= v <= 1024,
        "frames before a streamed chunk decoded with it as left context (the codec is causal), 0 to 1024")
    output_root: str | None = _setting(
        None, "FISH_OUTPUT_ROOT", lambda s: os.path.expanduser(s.strip()) or None,
        lambda v: v is None or (isinstance(v, str) and bool(v)),
        "a directory that job files' output_dir must lie inside (empty: the job file's own directory)")
    backend: str = _setting(
        "local", "FISH_BACKEND", lambda s: s.strip().lower(), lambda v: v in ("local", "ray"),
        "local (worker processes on this machine) or ray (Ray actors on a cluster; pip install 'fishmp[ray]')")
    ray_address: str | None = _setting(
        None, "FISH_RAY_ADDRESS", _opt_str, lambda v: v is None or (isinstance(v, str) and bool(v.strip())),
        "a running Ray cluster: auto, the head's HOST:6379 or ray://HOST:10001 (empty: start a local Ray instance)")
    ray_placement_timeout_s: float = _setting(
        120.0, "FISH_RAY_PLACEMENT_TIMEOUT_S", float, _positive,
        "seconds Ray may take to place a worker's actor before its slot is dropped, > 0 (capped by "
        "FISH_LOAD_TIMEOUT_S)")
    # Telemetry and worker recycling (issue 15): see fishmp/running/telemetry.py and fishmp/worker/lanes.py.
    telemetry_interval_s: float = _setting(
        5.0, "FISH_TELEMETRY_INTERVAL_S", float, lambda v: _positive(v + 1) and v >= 0,
        "seconds between GPU samples while a job runs, >= 0 (0: no sampling)")
    worker_max_segments: int | None = _setting(
        None, "FISH_WORKER_MAX_SEGMENTS", _opt_int, lambda v: v is None or (_is_int(v) and v > 0),
        "segments a worker finishes before it is replaced by a fresh one, >= 1 (empty: never)")
    worker_max_growth_gb: float | None = _setting(
        None, "FISH_WORKER_MAX_GROWTH_GB", lambda s: None if s.strip().lower() in ("", "none") else float(s),
        lambda v: v is None or _positive(v),
        "GiB a worker's memory (GPU reserved, or RSS on the CPU) may grow after its first segment before it is "
        "replaced, > 0 (empty: no bound)")

    # The take check (issue 15): see fishmp/worker/takes.py. A take failing a check is redone with seed + attempt.
    take_check: bool = _setting(
        True, "FISH_TAKE_CHECK", _bool, lambda v: isinstance(v, bool),
        "true or false (false: takes are written unjudged, as before the check existed)")
    take_retries: int = _setting(
        2, "FISH_TAKE_RETRIES", int, lambda v: _is_int(v) and 0 <= v <= 20,
        "extra takes (new seeds) of a segment whose take failed the check, 0 to 20")
    take_min_ratio: float = _setting(
        0.35, "FISH_TAKE_MIN_RATIO", float, lambda v: _positive(v) and v < 1,
        "a take shorter than this fraction of (its expected duration - FISH_TAKE_SLACK_S) is too short, > 0 and < 1")
    take_max_ratio: float = _setting(
        2.5, "FISH_TAKE_MAX_RATIO", float, lambda v: _positive(v) and v > 1,
        "a take longer than this many times its expected duration (plus FISH_TAKE_SLACK_S) is too long, > 1")
    take_slack_s: float = _setting(
        1.0, "FISH_TAKE_SLACK_S", float, lambda v: _positive(v + 1) and v >= 0,
        "seconds of tolerance: a take may exceed FISH_TAKE_MAX_RATIO x its expected duration by this much, and "
        "falls short only below FISH_TAKE_MIN_RATIO x (expected - this), >= 0")
    take_silence_rms: float = _setting(
        0.003, "FISH_TAKE_SILENCE_RMS", float, lambda v: _positive(v + 1) and 0 <= v < 1,
        "a take whose RMS (full scale 1.0) is below this is silent, >= 0 and < 1 (0.003 is about -50 dBFS)")
    take_min_active_ratio: float = _setting(
        0.2, "FISH_TAKE_MIN_ACTIVE_RATIO", float, lambda v: _positive(v + 1) and 0 <= v <= 1,
        "a take with fewer 20 ms frames above -40 dBFS than this fraction is near-silent, 0 to 1")
    take_max_clipped_ratio: float = _setting(
        0.005, "FISH_TAKE_MAX_CLIPPED_RATIO", float, lambda v: _positive(v + 1) and 0 <= v <= 1,
        "a take with more samples at full scale (|x| >= 0.999) than this fraction is clipped, 0 to 1")

    def __post_init__(self) -> None:
        _check_fields(self)
        if self.model_memory_gb == "auto" and self.backend != "local":  # autofill grows local worker pools only
            raise ConfigError("FISH_MODEL_MEMORY_GB", "auto", "", "FISH_MODEL_MEMORY_GB=auto measures and fills local "
                              f"GPUs only; with FISH_BACKEND={self.backend} set a number of GiB per worker, e.g. 8.0 "
                              "(`plan --explain` estimates it)")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Settings from `environ` (default `os.environ`); keyword overrides win over the environment."""
        env = os.environ if environ is None else environ
        warn_unknown_variables(env)
        return _from_env(cls, env, overrides)

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    @staticmethod
    def variables() -> dict[str, str]:
        """Field name -> environment variable, for documentation and error messages."""
        return {f.name: f.metadata["spec"].env for f in dataclasses.fields(Settings)}


def _check_fields(obj: Any) -> None:
    for f in dataclasses.fields(obj):
        spec: _Spec = f.metadata["spec"]
        value = getattr(obj, f.name)
        try:
            ok = spec.check(value)
        except TypeError:
            ok = False
        if not ok:
            raise ConfigError(f.name, value, spec.allowed)


def _from_env(cls: Any, env: Mapping[str, str], overrides: dict[str, Any]) -> Any:
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        spec: _Spec = f.metadata["spec"]
        raw = env.get(spec.env)
        if f.name in overrides or raw is None:
            continue
        try:
            value = spec.parse(raw)
            ok = spec.check(value)
        except (ValueError, TypeError):
            ok = False
        if not ok:
            raise ConfigError(spec.env, raw, spec.allowed)
        values[f.name] = value
    values.update(overrides)
    unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
        raise ConfigError(sorted(unknown)[0], values[sorted(unknown)[0]], "not a fishmp setting")
    return cls(**values)


def _names(text: str) -> tuple[str, ...]:
    return tuple(n.strip().lower().rstrip("/") for n in text.split(",") if n.strip())


def _names_ok(v: object) -> bool:
    return isinstance(v, tuple) and all(isinstance(n, str) and n and " " not in n for n in v)


def _port(x: object) -> bool:
    return _is_int(x) and 1 <= x <= 65535  # type: ignore[operator]


@dataclass(frozen=True)
class ServeSettings:
    """`python -m fishmp serve`'s own settings (fishmp/server/); the pool behind it reads `Settings` as usual.
    Command-line options override them (keyword overrides, as for Settings)."""

    host: str = _setting("127.0.0.1", "FISH_SERVE_HOST", lambda s: s.strip(), lambda v: isinstance(v, str) and bool(v),
                         "an address to listen on, e.g. 127.0.0.1 (loopback) or 0.0.0.0 (every interface: needs "
                         "FISH_API_KEY)")
    port: int = _setting(8080, "FISH_SERVE_PORT", int, _port, "a TCP port from 1 to 65535")
    # repr=False below: the key must never reach a log line
    api_key: str | None = dataclasses.field(default=None, repr=False, metadata={"spec": _Spec(
        "FISH_API_KEY", _opt_str, lambda v: v is None or (isinstance(v, str) and bool(v) and v.isprintable()
                                                          and " " not in v),
        "a key without spaces that clients send as `Authorization: Bearer KEY` (empty: no key)")})
    data_dir: str = _setting("fishmp-serve", "FISH_SERVE_DATA_DIR", lambda s: os.path.expanduser(s.strip()),
                             lambda v: isinstance(v, str) and bool(v),
                             "a directory for stored references and jobs (created if missing)")
    max_queued: int = _setting(10000, "FISH_SERVE_MAX_QUEUED", int, lambda v: _is_int(v) and v >= 1,
                               "segments queued or running at once before requests get 429, >= 1")
    max_text_chars: int = _setting(4000, "FISH_SERVE_MAX_TEXT_CHARS", int, lambda v: _is_int(v) and v >= 1,
                                   "characters of text one request (one segment of a job) may have, >= 1")
    max_body_mb: float = _setting(50.0, "FISH_SERVE_MAX_BODY_MB", float, _positive,
                                  "MiB a request body may have, > 0 (bigger: 413)")
    # -- hardening (docs/security.md): who may call, how long a request may take, what a reference may be ----------
    allowed_origins: tuple[str, ...] = _setting((), "FISH_SERVE_ALLOWED_ORIGINS", _names, _names_ok,
                                                "comma-separated browser origins (scheme://host[:port]) whose pages "
                                                "may send state-changing requests, or empty (this server's own only)")
    allowed_hosts: tuple[str, ...] = _setting((), "FISH_SERVE_ALLOWED_HOSTS", _names, _names_ok,
                                              "comma-separated Host names clients may address this server by, besides "
                                              "the loopback names and --host ('*': any), or empty")
    header_timeout_s: float = _setting(10.0, "FISH_SERVE_HEADER_TIMEOUT_S", float, _positive,
                                       "seconds a connection may take to send a request's headers, > 0")
    body_timeout_s: float = _setting(120.0, "FISH_SERVE_BODY_TIMEOUT_S", float, _positive,
                                     "seconds a request's body may take to arrive after its headers, > 0")
    max_connections: int = _setting(500, "FISH_SERVE_MAX_CONNECTIONS", int, lambda v: _is_int(v) and v >= 1,
                                    "open connections at once (event streams included); more are closed, >= 1")
    max_reference_s: float = _setting(60.0, "FISH_SERVE_MAX_REFERENCE_S", float, _positive,
                                      "seconds a reference audio may last (its header is read first), > 0")
    ws_idle_s: float = _setting(60.0, "FISH_SERVE_WS_IDLE_S", float, _positive,
                                "seconds a WebSocket (/v1/tts/live) may stay silent while nothing is being spoken "
                                "before it is closed, > 0")

    def __post_init__(self) -> None:
        _check_fields(self)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ServeSettings:
        return _from_env(cls, os.environ if environ is None else environ, overrides)


_warned: set[str] = set()  # once per process: a backend building many Pools should not repeat it


def warn_unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """Warn (logger "fishmp", one line each) about FISH_* variables that are no setting, naming the closest one.
    Returns the unknown names."""
    known = sorted([*Settings.variables().values(), *(f.metadata["spec"].env for f in dataclasses.fields(ServeSettings))])
    unknown = [name for name in sorted(environ) if name.startswith("FISH_") and name not in known
               and name not in EXTRA_VARIABLES and not name.startswith(EXTRA_PREFIXES)]
    for name in unknown:
        if name in _warned:
            continue
        _warned.add(name)
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "see .env.example for the settings"
        log.warning("[Main] %s is not a fishmp setting and is ignored; %s", name, hint)
    return unknown


def read_dotenv(path: str) -> dict[str, str | None]:
    """The variables in a .env file. A line that sets a FISH_* variable and cannot be parsed, or a file that is not
    UTF-8 text, is a ConfigError naming it (python-dotenv would only warn and fall back to the default)."""
    from dotenv import dotenv_values
    from dotenv.parser import parse_stream

    try:
        with open(path, "rb") as f:
            raw = f.read()
        text = raw.decode("utf-8-sig")
        if "\x00" in text:
            raise UnicodeError
    except OSError as exc:
        raise ConfigError(".env", path, "", f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeError:
        raise ConfigError(".env", path, "", f"{path} is not UTF-8 text (saved as UTF-16, or a binary file?): save it "
                          "as UTF-8 with one NAME=value per line") from None
    for binding in parse_stream(io.StringIO(text)):
        statement = binding.original.string.strip()
        if binding.error and re.match(r"(export\s+)?FISH_", statement):
            shown = statement if len(statement) <= 80 else statement[:77] + "..."
            raise ConfigError(".env", statement, "", f"{path} line {binding.original.line} cannot be parsed: {shown} "
                              "(an unterminated quote?); write it as NAME=value")
    return dict(dotenv_values(stream=io.StringIO(text), interpolate=True))


def load_dotenv_file(path: str | None = None) -> str | None:
    """Load `.env` from the current directory (only there, not its parents: the directory you run from), or `path`,
    into os.environ without overriding what is already set. CLI only. Returns the file loaded, or None."""
    found = path or os.path.join(os.getcwd(), ".env")
    if not os.path.isfile(found):
        return None
    for key, value in read_dotenv(found).items():
        if value is not None and key not in os.environ:
            os.environ[key] = value
    return found
