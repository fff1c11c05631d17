"""Sampling parameters: the `Params` of a job, a speaker or a segment, their allowed ranges and their parsing.

The ranges are fish-speech's own asserts in generate_long, so a job that validates never fails inside the engine.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .checks import JobError, Problems, check_duplicate_keys, is_int, is_number, typename

# The sampling the dubbing backends' own scripts used; legacy configs keep it so switching does not change voices.
LEGACY_PARAMS = {"temperature": 0.7, "top_p": 0.7, "repetition_penalty": 1.2}


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
        problems = Problems()
        params = parse_params(data, where, problems)
        if problems:
            raise JobError(problems)
        return params


PARAM_KEYS = tuple(f.name for f in dataclasses.fields(Params))


MAX_NEW_TOKENS_LIMIT = 8192


MAX_SEED = 2**63 - 1


def _check_float(lo_open: float, hi: float, hi_open: bool) -> Callable[[Any], bool]:
    return lambda v: is_number(v) and math.isfinite(v) and lo_open < v and (v < hi if hi_open else v <= hi)


PARAM_RULES: dict[str, tuple[Callable[[Any], bool], str, bool]] = {
    # key: (check, allowed, is_integer). Ranges are fish-speech's own asserts in generate_long, so a job that
    # validates never fails inside the engine.
    "temperature": (_check_float(0.0, 2.0, True), "a number > 0 and < 2", False),
    "top_p": (_check_float(0.0, 1.0, False), "a number > 0 and <= 1", False),
    "repetition_penalty": (_check_float(0.0, 2.0, True), "a number > 0 and < 2 (typically 1.0 to 1.5)", False),
    # 2, not 1: fish-speech's decode loop fails at 1 (UnboundLocalError), so refuse it before anything loads.
    "max_new_tokens": (lambda v: is_int(v) and 2 <= v <= MAX_NEW_TOKENS_LIMIT,
                       f"an integer from 2 to {MAX_NEW_TOKENS_LIMIT}", True),
    "seed": (lambda v: is_int(v) and 0 <= v <= MAX_SEED, "an integer >= 0", True),
}


def parse_params(raw: Any, where: str, p: Problems, *, keys: Iterable[str] | None = None) -> Params:
    """Params from a mapping. With `keys`, only those keys are read and others ignored (legacy tasks, whose
    objects carry other fields); without, every key must be a parameter."""
    if raw is None:
        return Params()
    if not isinstance(raw, dict):
        p.add(f"{where}: params must be an object, not {typename(raw)}")
        return Params()
    if keys is None:
        check_duplicate_keys(raw, where, p)
        for k in raw:
            if k not in PARAM_RULES:
                p.add(f"{where}: unknown parameter {k!r} (known: {', '.join(PARAM_KEYS)})")
    values: dict[str, Any] = {}
    for key in PARAM_KEYS:
        if (keys is not None and key not in keys) or raw.get(key) is None:
            continue
        value = raw[key]
        check, allowed, is_integer = PARAM_RULES[key]
        if not check(value):
            p.add(f"{where}: {key} must be {allowed}, not {value!r}")
            continue
        values[key] = int(value) if is_integer else float(value)
    return Params(**values)


def params_in(obj: dict, where: str, p: Problems) -> Params:
    """Legacy objects: parameter keys given directly on the object, overridden by a nested "params" object."""
    flat = parse_params(obj, where, p, keys=PARAM_KEYS)
    return flat.merged(parse_params(obj.get("params"), f"{where} params", p))
