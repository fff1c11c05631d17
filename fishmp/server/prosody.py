"""Speed, volume, sample rate and a slot for one line, on both line APIs (fish `/v1/tts`, OpenAI
`/v1/audio/speech`). Parsed from the raw body beside the request models (fish's model stays upstream's, field for
field: tests/test_server_conformance.py), applied to the finished wav in the server's process (no torch).

- fish: `prosody: {"speed": 0.5-2.0, "volume": dB -20..20}` (the Fish Audio SDK's), `sample_rate` (8000-48000 Hz);
- OpenAI: `speed` 0.25-4.0;
- both: fishmp's `max_seconds` (> 0, <= 3600): fit the line to that many seconds in the worker (trim, shorten pauses,
  stretch up to 1.25x, fishmp/worker/fit.py; no loudness change). Speed applies after it.
Speed is a pitch-preserving time-stretch (Signalsmith Stretch, as the fit's). A field fishmp cannot honour (the SDK's
`mp3_bitrate`, `opus_bitrate`, `min_chunk_length`, `condition_on_previous_chunks`, `early_stop_threshold`, or any
unknown key) is named in the answer's `X-Fishmp-Ignored` header, never dropped silently.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..job.checks import MAX_SECONDS_LIMIT, is_number
from .errors import ApiError

IGNORED_HEADER = "X-Fishmp-Ignored"
FISH_SPEED, OPENAI_SPEED, VOLUME_DB = (0.5, 2.0), (0.25, 4.0), (-20.0, 20.0)
RATES = (8000, 48000)
HONOURED = {"prosody", "sample_rate", "max_seconds"}


@dataclass(frozen=True)
class Prosody:
    speed: float = 1.0
    volume_db: float = 0.0
    sample_rate: int | None = None
    max_seconds: float | None = None
    ignored: tuple[str, ...] = ()

    @property
    def changes_audio(self) -> bool:
        return self.speed != 1.0 or self.volume_db != 0.0 or self.sample_rate is not None

    def segment_fields(self) -> dict[str, Any]:
        """What the line's segment carries: a slot to fit (duration only: loudness is the client's `volume`)."""
        if self.max_seconds is None:
            return {}
        return {"max_seconds": self.max_seconds, "fit": {"loudness_lufs": None}}

    def headers(self) -> dict[str, str]:
        return {IGNORED_HEADER: ", ".join(self.ignored)} if self.ignored else {}


def _number(body: dict, key: str, lo: float, hi: float, what: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if not is_number(value) or not math.isfinite(value) or not lo <= value <= hi:
        raise ApiError(400, f"invalid {what}", f"{what} must be a number from {lo:g} to {hi:g}, not {value!r}")
    return float(value)


def _max_seconds(body: dict) -> float | None:
    value = body.get("max_seconds")
    if value is not None and (not is_number(value) or not 0 < value <= MAX_SECONDS_LIMIT):
        raise ApiError(400, "invalid max_seconds", f"max_seconds must be a number of seconds > 0 and <= "
                       f"{MAX_SECONDS_LIMIT:g}, not {value!r}")
    return None if value is None else float(value)


def fish(body: dict, known: set[str]) -> Prosody:
    """The fish body's prosody, sample_rate and max_seconds; `known`: the request model's fields (used or ignored
    there as upstream does); any other key is named as ignored."""
    raw = body.get("prosody")
    speed, volume = 1.0, 0.0
    if raw is not None:
        if not isinstance(raw, dict):
            raise ApiError(400, "invalid prosody", f"prosody must be an object {{speed, volume}}, not {raw!r}")
        speed = _number(raw, "speed", *FISH_SPEED, "prosody.speed") or 1.0
        volume = _number(raw, "volume", *VOLUME_DB, "prosody.volume") or 0.0
    rate = body.get("sample_rate")
    if rate is not None and (not isinstance(rate, int) or isinstance(rate, bool) or not RATES[0] <= rate <= RATES[1]):
        raise ApiError(400, "invalid sample_rate", f"sample_rate must be a whole number of Hz from {RATES[0]} to "
                       f"{RATES[1]}, not {rate!r}")
    ignored = [k for k in body if k not in known and k not in HONOURED]
    if isinstance(raw, dict):
        ignored += [f"prosody.{k}" for k in raw if k not in ("speed", "volume")]
    return Prosody(speed, volume, rate, _max_seconds(body), tuple(ignored))


def openai(body: dict, speed: float, known: set[str]) -> Prosody:
    """OpenAI's `speed` (0.25-4.0) and fishmp's `max_seconds`; `known`: the request model's fields. Unknown keys and
    `instructions` (accepted, unused: the model takes no style prompt) are named as ignored."""
    _number({"speed": speed}, "speed", *OPENAI_SPEED, "speed")
    ignored = [k for k in body if (k not in known and k not in HONOURED) or (k == "instructions" and body[k])]
    return Prosody(float(speed), 0.0, None, _max_seconds(body), tuple(ignored))


def apply(samples: np.ndarray, rate: int, p: Prosody) -> tuple[np.ndarray, int]:
    """int16 mono samples at `rate` -> (int16 samples, rate) at the prosody's speed, volume and sample rate."""
    if not p.changes_audio:
        return samples, rate
    from ..worker.fit import stretch, to_length

    x = np.asarray(samples, dtype=np.float32) / 32768.0
    if p.speed != 1.0 and len(x):
        x = to_length(stretch(x, rate, p.speed), round(len(x) / p.speed))
    if p.volume_db:
        x = x * np.float32(10 ** (p.volume_db / 20))
    if p.sample_rate is not None and p.sample_rate != rate:
        import soxr

        x, rate = soxr.resample(x, rate, p.sample_rate).astype(np.float32), p.sample_rate
    return (np.clip(x, -1.0, 32767 / 32768) * 32768).astype(np.int16), rate
