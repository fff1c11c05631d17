"""A TEST engine with no model: it sleeps like a model would and returns sine tones. It does no voice cloning and
must never be presented as such; it exists to exercise the orchestrator (scheduling, timeouts, crashes, retries).

Timing (read from the environment when the engine is constructed; spawned workers inherit it):
  FISH_SYNTHETIC_LOAD_S            seconds load() sleeps (default 0.5)
  FISH_SYNTHETIC_SECONDS_PER_CHAR  seconds synthesize() sleeps per character of text (default 0.002)
Batched decoding (open_batch; the worker uses it at every FISH_BATCH_SIZE): a session holds rows of any speakers
(mixed voices, each row's audio in its own speaker's tone); a row of a text of L characters needs L decode steps,
and one step of R rows costs STEP_S + STEP_ROW_S x R seconds:
  FISH_SYNTHETIC_STEP_S            fixed cost of one step (default 0.85 x SECONDS_PER_CHAR)
  FISH_SYNTHETIC_STEP_ROW_S        cost of each row in a step (default 0.15 x SECONDS_PER_CHAR)
  FISH_SYNTHETIC_MAX_ROWS          a step with more rows raises EngineOutOfMemoryError (default: no limit)
  FISH_SYNTHETIC_MAX_CAPACITY      open_batch with a larger capacity raises EngineOutOfMemoryError, as a real engine
                                   preallocating its KV rows would (default: no limit)
So one row alone costs what synthesize() costs, and 8 rows together take 2.05/8 of the time of 8 alone (3.9x).
`step()` advances every row by up to 8 steps at once (sleeping for all of them), so refill happens at that grain.
A row's fault markers fire at its first step in a session (a kill in one row kills the whole process, as a real
batch would); its audio is exactly synthesize()'s, whatever its batchmates.

Output: a 44.1 kHz float32 sine, 0.06 s per character (markers removed), its frequency derived from the speaker key
so voices differ; tokens = round(seconds * 21.53) (the real codec's frame rate). Sampling params are ignored.
encode_reference validates like the fish engine (fishmp.engines.audio) and returns a deterministic (10, T) int64
array derived from a hash of the decoded audio, T = round(seconds * 21.53).

Fault markers in the segment text (any number, acted on in order):
  @@kill@@   SIGKILL to itself           @@segv@@   SIGSEGV to itself        @@exit@@  os._exit(3)
  @@hang@@   sleeps forever              @@oom@@    raises EngineOutOfMemoryError
  @@error@@  raises EngineError          @@slow=<seconds>@@  sleeps that many extra seconds
  @@toolong@@  raises TextTooLongError (an input error: from add() in a batch session)
  @@cuda@@   raises RuntimeError("CUDA error: an illegal memory access ...") as torch does for a sticky device error
Any marker may carry `-once` (`@@kill-once@@`, `@@oom-once@@`, `@@slow=2-once@@`): it fires only the first time across
ALL processes, claimed by creating (O_EXCL) a file named by a hash of the marker and the whole text inside
FISH_SYNTHETIC_STATE_DIR, which is then required (EngineError naming it when unset).
Bad takes (for the take check, fishmp/worker/takes.py): `@@<kind>@@` makes every take of the text bad; `@@<kind>:K@@` only
takes with no seed or a seed below K, so with the job's seed unset or 0 (retries use seeds base + attempt) attempts
0..K-1 are bad and attempt K recovers (`@@silent:2@@`: bad for attempts 0 and 1). Kinds:
  runaway   the take runs to max_new_tokens (like a missed end token): max_new_tokens - 1 frames of tone
  silent    all-zero samples            clipped   a full-scale square wave      nan   the tone with NaN samples
  short     a fifth of the normal length (at least one sample)
Take lengths (the fit-aware take choice, fishmp/worker/lanes.py): `@@pace:F0/F1/...@@` makes the take with seed s (none:
0) F[s] times its normal length (the last factor for later seeds), e.g. `@@pace:1.5/1.1@@`.
Load faults: FISH_SYNTHETIC_LOAD_FAULT = die (SIGKILL) | raise (EngineError) | oom (EngineOutOfMemoryError) | hang.
FISH_SYNTHETIC_FOOTPRINT_GB: the GiB a worker reports as its measured footprint under FISH_MODEL_MEMORY_GB=auto (a
simulated GPU has no NVML; fishmp/measure.py FootprintProbe uses this figure instead). Default: none.
Memory growth (worker recycling, FISH_WORKER_MAX_GROWTH_GB): FISH_SYNTHETIC_GROW_MB keeps that many MiB of written
(resident) memory per finished segment, for good, like a leaking long-lived worker (default 0).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import time

import numpy as np

from ..config import Settings
from .audio import read_reference
from .base import Audio, EngineError, EngineOutOfMemoryError, SpeakerPrompt, SynthesisParams, TextTooLongError

SAMPLE_RATE = 44100
FRAME_RATE = 21.53  # codec frames per second (44100 / 2048)
SECONDS_PER_CHAR = 0.06
MARKER = re.compile(r"@@(kill|segv|exit|hang|oom|error|toolong|cuda|slow)(?:=([0-9]*\.?[0-9]+))?(-once)?@@")
STEPS_PER_CALL = 8  # decode steps one BatchSession.step() advances
LOAD_FAULTS = ("die", "raise", "oom", "hang")
TAKE = re.compile(r"@@(runaway|silent|clipped|nan|short)(?::([0-9]+))?@@")
PACE = re.compile(r"@@pace:([0-9]*\.?[0-9]+(?:/[0-9]*\.?[0-9]+)*)@@")


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "")
    try:
        value = float(raw) if raw.strip() else default
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise EngineError(f"{name}={raw!r} is not valid: a number of seconds >= 0")
    return value


def _env_rows(name: str) -> int | None:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1:
        raise EngineError(f"{name}={raw!r} is not valid: a whole number of rows >= 1")
    return int(raw)


def _hang() -> None:
    while True:
        time.sleep(3600)


class SyntheticEngine:
    """Test engine (see the module docstring): sine tones, configurable delays and faults."""

    name = "synthetic"
    sample_rate = SAMPLE_RATE

    def __init__(self, settings: Settings, device: str) -> None:
        self.settings, self.device = settings, device
        self.load_s = _env_float("FISH_SYNTHETIC_LOAD_S", 0.5)
        self.seconds_per_char = _env_float("FISH_SYNTHETIC_SECONDS_PER_CHAR", 0.002)
        self.step_s = _env_float("FISH_SYNTHETIC_STEP_S", 0.85 * self.seconds_per_char)
        self.step_row_s = _env_float("FISH_SYNTHETIC_STEP_ROW_S", 0.15 * self.seconds_per_char)
        self.max_rows = _env_rows("FISH_SYNTHETIC_MAX_ROWS")
        self.max_capacity = _env_rows("FISH_SYNTHETIC_MAX_CAPACITY")
        self.state_dir = os.environ.get("FISH_SYNTHETIC_STATE_DIR") or None
        self.load_fault = os.environ.get("FISH_SYNTHETIC_LOAD_FAULT", "").strip().lower() or None
        self.synthetic_footprint_bytes = int(_env_float("FISH_SYNTHETIC_FOOTPRINT_GB", 0.0) * 1024**3) or None
        self.grow_bytes = int(_env_float("FISH_SYNTHETIC_GROW_MB", 0.0) * 2**20)
        self._grown: list[bytes] = []  # the leak: never freed
        if self.load_fault not in (None, *LOAD_FAULTS):
            raise EngineError(f"FISH_SYNTHETIC_LOAD_FAULT={self.load_fault!r} is not valid: one of {LOAD_FAULTS}")

    def load(self) -> None:
        time.sleep(self.load_s)
        if self.load_fault == "die":
            os.kill(os.getpid(), signal.SIGKILL)
        elif self.load_fault == "raise":
            raise EngineError("synthetic load fault (FISH_SYNTHETIC_LOAD_FAULT=raise)")
        elif self.load_fault == "oom":
            raise EngineOutOfMemoryError("synthetic load fault (FISH_SYNTHETIC_LOAD_FAULT=oom)")
        elif self.load_fault == "hang":
            _hang()

    def encode_reference(self, audio_path: str) -> np.ndarray:
        mono, rate = read_reference(audio_path)
        digest = hashlib.sha256(str(rate).encode() + mono.tobytes()).digest()
        rng = np.random.default_rng(int.from_bytes(digest[:8], "big"))
        frames = max(1, round(len(mono) / rate * FRAME_RATE))
        semantic = rng.integers(0, 4096, size=(1, frames))
        residual = rng.integers(0, 1024, size=(9, frames))
        return np.concatenate([semantic, residual]).astype(np.int64)

    def _claim_once(self, marker: str, text: str) -> bool:
        """True for the first claimant of this marker in this text across all processes."""
        if not self.state_dir:
            raise EngineError(f"marker {marker} needs FISH_SYNTHETIC_STATE_DIR (a shared directory) to be set")
        os.makedirs(self.state_dir, exist_ok=True)
        name = hashlib.sha256(f"{marker}\0{text}".encode()).hexdigest()[:32]
        try:
            os.close(os.open(os.path.join(self.state_dir, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
        except FileExistsError:
            return False
        return True

    def _faults(self, text: str, only: tuple[str, ...] | None = None) -> None:
        for m in MARKER.finditer(text):
            kind, value, once = m.groups()
            if only is not None and kind not in only:
                continue
            if once and not self._claim_once(m.group(0), text):
                continue
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            elif kind == "segv":
                os.kill(os.getpid(), signal.SIGSEGV)
            elif kind == "exit":
                os._exit(3)
            elif kind == "hang":
                _hang()
            elif kind == "oom":
                raise EngineOutOfMemoryError(f"synthetic out of memory ({m.group(0)})")
            elif kind == "error":
                raise EngineError(f"synthetic engine error ({m.group(0)})")
            elif kind == "cuda":
                raise RuntimeError(f"CUDA error: an illegal memory access was encountered (synthetic, {m.group(0)})")
            elif kind == "toolong":
                raise TextTooLongError(f"synthetic text too long ({m.group(0)})")
            elif kind == "slow":
                time.sleep(float(value or 0))

    def synthesize(self, text: str, speaker: SpeakerPrompt | None, params: SynthesisParams) -> Audio:
        self._faults(text)
        time.sleep(self.seconds_per_char * len(text))
        self._grow()
        return self._audio(text, speaker, params)

    def _grow(self) -> None:
        if self.grow_bytes:
            self._grown.append(b"\x01" * self.grow_bytes)  # written, so resident (bytes(n) might not be)

    def open_batch(self, capacity: int) -> SyntheticBatch:
        if self.max_capacity is not None and capacity > self.max_capacity:
            raise EngineOutOfMemoryError(f"synthetic out of memory: a session of {capacity} rows "
                                         f"(FISH_SYNTHETIC_MAX_CAPACITY={self.max_capacity})")
        return SyntheticBatch(self, capacity)

    @staticmethod
    def _audio(text: str, speaker: SpeakerPrompt | None, params: SynthesisParams | None = None) -> Audio:
        spoken = PACE.sub("", TAKE.sub("", MARKER.sub("", text))).strip()
        key = speaker.key if speaker is not None else ""
        freq = 110.0 + int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 330
        params = params or SynthesisParams()
        bad = _bad_take(text, params.seed)
        n = round(len(spoken) * SECONDS_PER_CHAR * SAMPLE_RATE * _pace(text, params.seed))
        if bad == "runaway":
            n = round((params.max_new_tokens - 1) / FRAME_RATE * SAMPLE_RATE)
        elif bad == "short":
            n = max(1, n // 5)
        t = np.arange(n, dtype=np.float64) / SAMPLE_RATE
        samples = (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)
        if bad == "silent":
            samples[:] = 0.0
        elif bad == "clipped":
            samples = np.where(samples >= 0, 1.0, -1.0).astype(np.float32)
        elif bad == "nan":
            samples[::100] = np.nan
        tokens = params.max_new_tokens - 1 if bad == "runaway" else round(n / SAMPLE_RATE * FRAME_RATE)
        return Audio(samples=samples, sample_rate=SAMPLE_RATE, tokens=tokens)

    def release_memory(self) -> None:
        pass

    def fingerprint(self) -> str:
        return "synthetic"


def _pace(text: str, seed: int | None) -> float:
    """The length factor of a take of `text` with `seed` (`@@pace:F0/F1/...@@`; 1.0 without the marker)."""
    m = PACE.search(text)
    if m is None:
        return 1.0
    factors = [float(f) for f in m.group(1).split("/")]
    return factors[min(seed or 0, len(factors) - 1)]


def _bad_take(text: str, seed: int | None) -> str | None:
    """The first bad-take marker that applies to a take of `text` with `seed` (see the module docstring)."""
    for m in TAKE.finditer(text):
        kind, until = m.groups()
        if until is None or seed is None or seed < int(until):
            return kind
    return None


class SyntheticBatch:
    """A BatchSession of the synthetic engine (see the module docstring for its cost model and faults)."""

    def __init__(self, engine: SyntheticEngine, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, not {capacity}")
        self.engine, self.capacity = engine, capacity
        self._rows: dict[str, list] = {}  # key -> [text, steps left, stepped yet, params, speaker]
        self._broken = False

    def free_rows(self) -> int:
        return self.capacity - len(self._rows)

    def active(self) -> int:
        return len(self._rows)

    def add(self, key: str, text: str, params: SynthesisParams, speaker: SpeakerPrompt | None = None) -> None:
        if self.free_rows() < 1 or key in self._rows:
            raise RuntimeError(f"cannot add row {key!r}: {len(self._rows)}/{self.capacity} rows, keys must be unique")
        self.engine._faults(text, only=("toolong",))  # an input error: this row alone, the others go on
        self._rows[key] = [text, len(text), False, params, speaker]

    def step(self) -> list[tuple[str, Audio]]:
        if self._broken:
            raise EngineError("synthetic batch session used after an error")
        if not self._rows:
            return []
        try:
            for row in self._rows.values():
                if not row[2]:
                    row[2] = True
                    self.engine._faults(row[0], only=("kill", "segv", "exit", "hang", "oom", "error", "cuda", "slow"))
            if self.engine.max_rows is not None and len(self._rows) > self.engine.max_rows:
                raise EngineOutOfMemoryError(f"synthetic out of memory: {len(self._rows)} rows in a step "
                                             f"(FISH_SYNTHETIC_MAX_ROWS={self.engine.max_rows})")
        except Exception:
            self._broken = True
            raise
        n = min(STEPS_PER_CALL, min(row[1] for row in self._rows.values()))
        time.sleep(n * (self.engine.step_s + self.engine.step_row_s * len(self._rows)))
        done = []
        for key, row in list(self._rows.items()):
            row[1] -= n
            if row[1] <= 0:
                del self._rows[key]
                self.engine._grow()
                done.append((key, self.engine._audio(row[0], row[4], row[3])))
        return done

    def close(self) -> None:
        self._rows.clear()
