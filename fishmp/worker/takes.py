"""The take check: is this synthesized audio a usable take of its text? Pure numpy (no torch, no processes).

A dubbing job has thousands of lines; nobody listens to them all. The failure modes of autoregressive TTS are few and
cheap to detect from the samples alone:
- a runaway take: the model missed its end token and decoded until max_new_tokens (`max_tokens`), often far longer
  than the text needs (`too_long`);
- a take much shorter than its text (`too_short`), near-silent (`silent`: RMS; `low_activity`: too few 20 ms frames
  above the activity level), clipped (`clipped`), or with NaN/inf samples (`nonfinite`), or empty (`empty`);
- longer than the subtitle slot the job gave it (`over_slot`, optional per-segment `max_seconds`).

Expected duration: characters per second per script (Han, kana, Hangul, Latin, Cyrillic, ...; letters and digits are
counted, spaces are not, punctuation adds a short pause) plus a fixed onset/offset, times a per-speaker speed factor
learned from the takes that passed (median of duration / prior estimate, once 3 of its takes passed:
TakeLimits.learn_after).
"""

from __future__ import annotations

import math
import re
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

# Prior speaking rates, counted units per second (conversational TTS speed). Han: one syllable per character
# (Mandarin ~4-5 syllables/s); kana: one mora per character (Japanese ~7-8 morae/s); Hangul: one syllable per block.
SCRIPT_RATES: dict[str, float] = {
    "han": 4.5, "kana": 7.5, "hangul": 6.0, "latin": 13.0, "cyrillic": 12.0, "greek": 12.0, "arabic": 10.0,
    "hebrew": 10.0, "devanagari": 11.0, "thai": 12.0, "digit": 4.0, "other": 10.0,
}
ONSET_S = 0.3  # silence fish-speech leaves around speech, and the shortest word
PAUSE_S = 0.1  # per punctuation mark that makes a speaker pause
PAUSES = set(".,;:!?…。，、；：！？")
_RANGES: tuple[tuple[int, int, str], ...] = (
    (0x0030, 0x0039, "digit"), (0xFF10, 0xFF19, "digit"),
    (0x0041, 0x005A, "latin"), (0x0061, 0x007A, "latin"), (0x00C0, 0x024F, "latin"), (0x1E00, 0x1EFF, "latin"),
    (0x0370, 0x03FF, "greek"), (0x0400, 0x052F, "cyrillic"), (0x0590, 0x05FF, "hebrew"), (0x0600, 0x06FF, "arabic"),
    (0x0750, 0x077F, "arabic"), (0x0900, 0x097F, "devanagari"), (0x0E00, 0x0E7F, "thai"),
    (0x1100, 0x11FF, "hangul"), (0x3130, 0x318F, "hangul"), (0xAC00, 0xD7AF, "hangul"),
    (0x3040, 0x30FF, "kana"), (0x31F0, 0x31FF, "kana"), (0xFF66, 0xFF9D, "kana"),
    (0x3400, 0x4DBF, "han"), (0x4E00, 0x9FFF, "han"), (0xF900, 0xFAFF, "han"), (0x20000, 0x2FFFF, "han"),
)
CLIP_LEVEL = 0.999  # |x| at or above: a clipped sample (float output is clipped to [-1, 1] when written)
FRAME_S = 0.02  # activity frames
# The synthetic test engine's fault markers (@@silent:2@@) are not spoken: they do not count towards the duration.
_MARKUP = re.compile(r"@@[^@\s]{1,40}@@")
REASONS = ("nonfinite", "empty", "max_tokens", "too_long", "too_short", "over_slot", "silent", "low_activity",
           "clipped")


def script_of(ch: str) -> str | None:
    """The script a character counts in, or None for spaces, punctuation and symbols (not spoken)."""
    cp = ord(ch)
    for lo, hi, name in _RANGES:
        if lo <= cp <= hi:
            return name
    return "other" if ch.isalpha() else None


def script_counts(text: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for ch in text:
        if (name := script_of(ch)) is not None:
            counts[name] = counts.get(name, 0) + 1
    return counts


def prior_seconds(text: str) -> float:
    """Expected duration of `text` at the prior rates: onset + units / rate per script + pauses."""
    text = _MARKUP.sub("", text)
    spoken = sum(n / SCRIPT_RATES[name] for name, n in script_counts(text).items())
    return ONSET_S + spoken + PAUSE_S * sum(1 for ch in text if ch in PAUSES)


@dataclass(frozen=True)
class TakeLimits:
    """Thresholds of the take check (settings FISH_TAKE_*; see fishmp/config.py for the defaults' documentation)."""

    retries: int = 2
    min_ratio: float = 0.35  # duration below this x (expected - slack_s): too_short
    max_ratio: float = 2.5  # above this (plus slack_s): too_long
    slack_s: float = 1.0  # seconds allowed over max_ratio x expected (short lines vary most)
    silence_rms: float = 0.003  # RMS below (about -50 dBFS): silent
    active_level: float = 0.01  # a 20 ms frame with RMS at or above this (about -40 dBFS) is active
    min_active_ratio: float = 0.2  # fewer active frames than this: low_activity
    max_clipped_ratio: float = 0.005  # more samples at |x| >= 0.999 than this fraction: clipped
    learn_after: int = 3  # passed takes of a speaker before its own rate replaces the prior

    @classmethod
    def from_settings(cls, settings: Any) -> TakeLimits:
        """From a Settings (fields take_*), defaults for what it lacks (an engine built without settings)."""
        names = {"retries": "take_retries", "min_ratio": "take_min_ratio", "max_ratio": "take_max_ratio",
                 "slack_s": "take_slack_s", "silence_rms": "take_silence_rms",
                 "min_active_ratio": "take_min_active_ratio", "max_clipped_ratio": "take_max_clipped_ratio"}
        return cls(**{k: getattr(settings, v) for k, v in names.items() if hasattr(settings, v)})


class RateModel:
    """One speaker's speed relative to the prior, learned from the takes that passed (median of the last 50)."""

    def __init__(self, learn_after: int = 3) -> None:
        self.learn_after = learn_after
        self.ratios: deque[float] = deque(maxlen=50)

    def factor(self) -> float:
        if len(self.ratios) < self.learn_after:
            return 1.0
        return min(3.0, max(1 / 3, float(np.median(np.asarray(self.ratios)))))

    def expected_seconds(self, text: str) -> float:
        return prior_seconds(text) * self.factor()

    def accept(self, text: str, seconds: float) -> None:
        if seconds > 0:
            self.ratios.append(seconds / prior_seconds(text))


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reasons: tuple[str, ...]
    numbers: dict[str, Any] = field(default_factory=dict)
    score: tuple[float, ...] = ()  # lower is better: (non-finite, reasons, distance to the target duration)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "reasons": list(self.reasons), **self.numbers}


def _signal_numbers(samples: np.ndarray, sample_rate: int, limits: TakeLimits) -> dict[str, Any]:
    x = np.asarray(samples, dtype=np.float64).reshape(-1)
    finite = np.isfinite(x)
    nonfinite = int(x.size - np.count_nonzero(finite))
    x = np.where(finite, x, 0.0)
    rms = float(np.sqrt(np.mean(x * x))) if x.size else 0.0
    frame = max(1, round(FRAME_S * sample_rate))
    n = x.size // frame
    if n:
        frames = np.sqrt(np.mean(x[: n * frame].reshape(n, frame) ** 2, axis=1))
        active = float(np.count_nonzero(frames >= limits.active_level) / n)
    else:
        active = 1.0 if rms >= limits.active_level else 0.0
    clipped = float(np.count_nonzero(np.abs(x) >= CLIP_LEVEL) / x.size) if x.size else 0.0
    return {"rms": round(rms, 5), "active_ratio": round(active, 4), "clipped_ratio": round(clipped, 5),
            "nonfinite": nonfinite}


def check_take(samples: np.ndarray, sample_rate: int, tokens: int, max_new_tokens: int | None, text: str,
               expected_s: float, limits: TakeLimits, max_seconds: float | None = None,
               seed: int | None = None) -> Verdict:
    """Judge one take. `expected_s` comes from the speaker's RateModel; `max_new_tokens` None: not checked.

    fish-speech drops the last frame of a take (its end token, or the frame it stopped at when tokens ran out), so a
    take that ran out reports max_new_tokens - 1 frames: that counts as hitting the limit. A text too long for the
    model is decoded in chunks, each with its own max_new_tokens, so a take of more frames than the limit is not
    judged by it (a runaway chunk still makes the take too long)."""
    duration = len(samples) / sample_rate if sample_rate > 0 else 0.0
    nums = _signal_numbers(samples, sample_rate, limits)
    reasons: list[str] = []
    if nums["nonfinite"]:
        reasons.append("nonfinite")
    if len(samples) == 0:
        reasons.append("empty")
    if max_new_tokens is not None and max_new_tokens > 1 and max_new_tokens - 1 <= tokens <= max_new_tokens:
        reasons.append("max_tokens")
    if duration > expected_s * limits.max_ratio + limits.slack_s:
        reasons.append("too_long")
    elif len(samples) and duration < (expected_s - limits.slack_s) * limits.min_ratio:  # short lines vary most
        reasons.append("too_short")
    over = duration - max_seconds if max_seconds is not None else 0.0
    if over > 0:
        reasons.append("over_slot")
    if len(samples) and nums["rms"] < limits.silence_rms:
        reasons.append("silent")
    elif len(samples) and nums["active_ratio"] < limits.min_active_ratio:
        reasons.append("low_activity")
    if nums["clipped_ratio"] > limits.max_clipped_ratio:
        reasons.append("clipped")
    numbers: dict[str, Any] = {"seed": seed, "duration_s": round(duration, 3), "expected_s": round(expected_s, 3),
                               **nums, "tokens": int(tokens), "max_new_tokens": max_new_tokens}
    if max_seconds is not None:
        numbers["max_seconds"] = max_seconds
        numbers["over_slot_s"] = round(max(0.0, over), 3)
    # The best of failed takes: never a NaN take if another exists, then fewest problems, then the duration closest
    # to the target (the slot when the take overruns it, else the expected duration), on a log scale.
    target = max_seconds if max_seconds is not None and duration > max_seconds else expected_s
    distance = abs(math.log(max(duration, 1e-3) / max(target, 1e-3)))
    score = (1.0 if nums["nonfinite"] or not len(samples) else 0.0, float(len(reasons)), round(distance, 6))
    return Verdict(not reasons, tuple(reasons), numbers, score)


def best_index(verdicts: list[Verdict]) -> int:
    """Index of the take to keep: the first that passed, else the lowest score (ties: the earlier take)."""
    for i, v in enumerate(verdicts):
        if v.passed:
            return i
    return min(range(len(verdicts)), key=lambda i: (verdicts[i].score, i))


def retry_seed(base: int | None, attempt: int) -> int | None:
    """The seed of take `attempt` (0 = the first). Deterministic: base + attempt; with no base seed the first take
    stays unseeded (as before takes were checked) and retries use seeds 1, 2, ..."""
    if attempt == 0:
        return base
    return (base or 0) + attempt


def retry_max_new_tokens(verdict: Verdict, limits: TakeLimits) -> int | None:
    """A cheaper limit for the retry of a take that ran away (max_tokens / too_long): frames beyond the too_long bound
    can only make a take that fails anyway, so the retry stops there (frame rate measured on this take). None: keep
    the segment's own. This bounds a retry's time by the text, not by max_new_tokens (a missed end token at 1024
    frames costs as much as a 47 s take)."""
    n = verdict.numbers
    if not ({"max_tokens", "too_long"} & set(verdict.reasons)) or n["tokens"] <= 0 or n["duration_s"] <= 0:
        return None
    frames_per_s = n["tokens"] / n["duration_s"]
    return math.ceil((n["expected_s"] * limits.max_ratio + limits.slack_s) * frames_per_s) + 2


def take_record(verdicts: list[Verdict], kept: int, seeds: list[int | None]) -> dict[str, Any]:
    """What Done, the manifest and the events carry about a segment's takes."""
    rec: dict[str, Any] = {"tried": len(verdicts), "kept": kept, "seed": seeds[kept],
                           "suspect": not verdicts[kept].passed, "takes": [v.to_dict() for v in verdicts]}
    over = verdicts[kept].numbers.get("over_slot_s")
    if over:
        rec["over_slot_s"] = over
    return rec


# ---- the fit-aware take choice (a fitted segment, SegmentTask.fit) -------------------------------------------------
def speed_needed(samples: np.ndarray, sample_rate: int, fit: dict[str, Any]) -> float:
    """The speed a take needs to fit its slot once its ends are trimmed and its long pauses shortened (what the writer's
    fit does before stretching, fishmp/worker/fit.py): how much stretch this take would cost."""
    from .silence import shape

    if not len(samples) or sample_rate <= 0:
        return 0.0
    x = np.nan_to_num(np.asarray(samples, dtype=np.float32))
    shaped = shape(x, sample_rate, float(fit["slot"]), float(fit["pad_s"]), float(fit["max_pause_s"]))
    return shaped.seconds / float(fit["slot"])


def fitted_index(verdicts: list[Verdict], fit: dict[str, Any]) -> int:
    """The take to keep for a fitted segment: of the takes that passed, the one needing the least stretch (ties: the
    earlier); when none passed, the take check's own choice (best_index)."""
    from ..job.fitting import settings_from, stretch_cost

    settings = settings_from(fit)
    passed = [i for i, v in enumerate(verdicts) if v.passed]
    if not passed or not settings.choose_take:
        return best_index(verdicts)
    return min(passed, key=lambda i: (stretch_cost(verdicts[i].numbers["speed_needed"], settings), i))


def wants_another_take(verdicts: list[Verdict], fit: dict[str, Any], fit_tries: int) -> bool:
    """A fitted segment's take passed the check but even its best take needs more than max_speed: try another seed
    (up to the fit's `retries`) before stretching beyond the cap."""
    if not fit.get("choose_take", True) or fit_tries >= int(fit.get("retries", 0)):
        return False
    best = fitted_index(verdicts, fit)
    return verdicts[best].passed and verdicts[best].numbers["speed_needed"] > float(fit["max_speed"])
