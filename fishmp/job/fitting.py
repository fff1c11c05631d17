"""The fit's settings and policy: how a line is fitted into its subtitle slot. Pure: no numpy, no torch, no processes.

A segment's slot is its `max_seconds` when given, else `end - start`. A segment with a slot is fitted by default (the
user who gives the slot expects the line to fit it); `"fit": false` on the job or the segment turns it off, and then
`max_seconds` only judges takes (`over_slot`), as before fitting existed. Legacy configs are never fitted.

The settings are read from the job's `"fit"` object, overridden key by key by the segment's. The worker's DSP
(fishmp/worker/fit.py) applies them, in order: trim the ends (keeping `pad_s`), shorten pauses longer than
`max_pause_s` (only when still over the slot), time-stretch by at most `max_speed` (or slow down to `min_speed` when
`slow_down`), then normalise to `loudness_lufs` with a `true_peak_db` ceiling. `choose_take` and `retries` drive the
fit-aware take choice (fishmp/worker/lanes.py): the take that needs the least stretch is kept.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from .checks import MAX_SECONDS_LIMIT, Problems, check_duplicate_keys, is_int, is_number, typename


@dataclass(frozen=True)
class FitSettings:
    enabled: bool = True  # a segment with a slot is fitted
    max_speed: float = 1.25  # the largest speed-up (dubbing apps cap at 1.2-1.4x; artifacts grow beyond)
    slow_down: bool = False  # a line shorter than its slot may be slowed down...
    min_speed: float = 0.85  # ...to at most this speed
    max_pause_s: float = 0.3  # a pause inside the line longer than this is shortened to it (only when over the slot)
    pad_s: float = 0.05  # silence kept before the first and after the last word when the ends are trimmed
    borrow_gap: bool = False  # the slot extends into the silence before the next line's start
    loudness_lufs: float | None = -23.0  # EBU R128 integrated loudness target; null: no loudness normalisation
    true_peak_db: float = -1.0  # the true-peak ceiling (dBTP) the gain never exceeds
    choose_take: bool = True  # keep the take (of those that pass the take check) that needs the least stretch
    retries: int = 2  # more seeds to try when even the best take needs more than max_speed
    cut: bool = False  # cut a line still over its slot at max_speed (with a fade) instead of letting it overrun

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# key: (check, allowed)
_RULES: dict[str, tuple[Any, str]] = {
    "enabled": (lambda v: isinstance(v, bool), "true or false"),
    "max_speed": (lambda v: is_number(v) and 1.0 <= v <= 4.0, "a number from 1.0 to 4.0"),
    "slow_down": (lambda v: isinstance(v, bool), "true or false"),
    "min_speed": (lambda v: is_number(v) and 0.25 <= v <= 1.0, "a number from 0.25 to 1.0"),
    "max_pause_s": (lambda v: is_number(v) and 0.05 <= v <= 10.0, "a number of seconds from 0.05 to 10"),
    "pad_s": (lambda v: is_number(v) and 0.0 <= v <= 1.0, "a number of seconds from 0 to 1"),
    "borrow_gap": (lambda v: isinstance(v, bool), "true or false"),
    "loudness_lufs": (lambda v: v is None or (is_number(v) and -70.0 <= v <= -5.0),
                      "a number of LUFS from -70 to -5, or null (no normalisation)"),
    "true_peak_db": (lambda v: is_number(v) and -20.0 <= v <= 0.0, "a number of dBTP from -20 to 0"),
    "choose_take": (lambda v: isinstance(v, bool), "true or false"),
    "retries": (lambda v: is_int(v) and 0 <= v <= 8, "an integer from 0 to 8"),
    "cut": (lambda v: isinstance(v, bool), "true or false"),
}
FIT_KEYS = tuple(f.name for f in dataclasses.fields(FitSettings))
assert set(FIT_KEYS) == set(_RULES)


def settings_from(fit: dict[str, Any]) -> FitSettings:
    """The FitSettings in a task's fit dict (which also carries the slot and the raw take's path)."""
    return FitSettings(**{k: v for k, v in fit.items() if k in FIT_KEYS})


def parse_fit(raw: Any, where: str, p: Problems, base: FitSettings | None = None) -> FitSettings:
    """`base` (the job's settings, or the defaults) with the keys `raw` gives. `false` turns fitting off, `true` on,
    absent keeps `base`; every bad key or value is recorded in `p`."""
    base = base if base is not None else FitSettings()
    if raw is None:
        return base
    if isinstance(raw, bool):
        return dataclasses.replace(base, enabled=raw)
    if not isinstance(raw, dict):
        p.add(f"{where}: fit must be an object of fit settings, true or false, not {typename(raw)}")
        return base
    check_duplicate_keys(raw, f"{where} fit", p)
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if isinstance(key, str) and key.startswith("_"):
            continue
        if key not in _RULES:
            p.add(f"{where}: unknown fit setting {key!r} (known: {', '.join(FIT_KEYS)})")
            continue
        check, allowed = _RULES[key]
        if value is None and key != "loudness_lufs" or not check(value):
            p.add(f"{where}: fit {key} must be {allowed}, not {value!r}")
            continue
        values[key] = float(value) if is_number(value) and key != "retries" else value
    return dataclasses.replace(base, **values)


def slot_of(max_seconds: float | None, start: float | None, end: float | None) -> float | None:
    """A segment's slot: max_seconds when given, else end - start, else None (no slot)."""
    if max_seconds is not None:
        return max_seconds
    if start is not None and end is not None:
        return end - start
    return None


def fit_slots(segments: list[tuple[float | None, float | None, float | None, FitSettings]]) -> list[float | None]:
    """The slot each segment is fitted to (None: not fitted), given (max_seconds, start, end, settings) in job order.
    With `borrow_gap`, a segment with a start and an end also gets the silence up to the next line's start (the
    nearest start after its end, any speaker's), never past it. No slot is longer than MAX_SECONDS_LIMIT."""
    starts = sorted(s for _, s, _, _ in segments if s is not None)
    out: list[float | None] = []
    for max_s, start, end, fit in segments:
        slot = slot_of(max_s, start, end)
        if slot is None or not fit.enabled:
            out.append(None)
            continue
        if fit.borrow_gap and max_s is None and start is not None and end is not None:
            later = [s for s in starts if s >= end]
            if later:
                slot = later[0] - start
        out.append(min(slot, MAX_SECONDS_LIMIT))  # a slot never exceeds what max_seconds may say (an hour)
    return out


def wanted_speed(seconds: float, slot: float, fit: FitSettings) -> float:
    """The speed that makes `seconds` of audio last `slot` seconds (> 1: faster). 1.0 for a short line unless it may
    be slowed down."""
    need = seconds / slot if slot > 0 else math.inf
    if need < 1.0 and not fit.slow_down:
        return 1.0
    return need


def applied_speed(need: float, fit: FitSettings) -> float:
    """The speed the fit applies for a wanted speed: within [min_speed if slow_down else 1, max_speed]."""
    low = fit.min_speed if fit.slow_down else 1.0
    return min(fit.max_speed, max(low, need))


def stretch_cost(need: float, fit: FitSettings) -> float:
    """How much a take would be stretched (0: not at all), the take choice's key: the log of the applied speed,
    plus the overrun beyond the cap (a take that fits within the cap always beats one that does not)."""
    applied = applied_speed(need, fit)
    cost = abs(math.log(applied))
    if need > fit.max_speed:
        cost += 10.0 + math.log(need / fit.max_speed)
    return cost


MAX_VIDEO_SECONDS = 86400.0  # a start or end beyond a day is a mistake (milliseconds, not seconds?)


def time_fields(obj: dict, where: str, p: Problems) -> tuple[float | None, float | None]:
    """Optional per-segment `start` and `end` (seconds in the video): numbers >= 0, end > start, end only with a
    start. (None, None) after reporting what is wrong."""
    values: list[float | None] = []
    for key in ("start", "end"):
        value = obj.get(key)
        if value is not None and (not is_number(value) or not 0 <= value <= MAX_VIDEO_SECONDS):
            p.add(f"{where}: {key} must be a number of seconds from 0 to {MAX_VIDEO_SECONDS:g}, not {value!r}")
            return None, None
        values.append(None if value is None else float(value))
    start, end = values
    if end is not None and start is None:
        p.add(f'{where}: end {end:g} needs a "start" too (the slot is end - start)')
        return None, None
    if start is not None and end is not None and not end > start:
        p.add(f"{where}: end ({end:g}) must be later than start ({start:g})")
        return None, None
    return start, end


def video_seconds_field(data: dict, p: Problems) -> float | None:
    """The job's optional `video_seconds`: the film's length, the least length of its track."""
    value = data.get("video_seconds")
    if value is None:
        return None
    if not is_number(value) or not 0 < value <= MAX_VIDEO_SECONDS:
        p.add(f"job: video_seconds must be a number of seconds > 0 and <= {MAX_VIDEO_SECONDS:g}, not {value!r}")
        return None
    return float(value)
