"""Audio out of the server: the formats clients ask for, their content types, and the streaming WAV header.

fishmp writes every segment as a 44.1 kHz mono 16-bit wav; a request's format is made from those samples with
soundfile (libsndfile: wav, flac, mp3, ogg/opus), so what a client can get is what soundfile can write here. Opus
takes 48 kHz only: its samples are resampled with soxr first. `pcm` is the raw 16-bit little-endian samples.
Content types are upstream fish-speech's (audio/wav, audio/mpeg, audio/ogg for opus, application/octet-stream for
pcm) plus audio/flac.
"""

from __future__ import annotations

import io
import wave
from functools import cache

import numpy as np
import soundfile as sf

SAMPLE_RATE = 44100
OPUS_RATE = 48000

CONTENT_TYPES = {"wav": "audio/wav", "pcm": "application/octet-stream", "mp3": "audio/mpeg", "flac": "audio/flac",
                 "opus": "audio/ogg"}
_SOUNDFILE = {"wav": ("WAV", "PCM_16"), "flac": ("FLAC", "PCM_16"), "mp3": ("MP3", None), "opus": ("OGG", "OPUS")}


@cache
def available() -> tuple[str, ...]:
    """The formats this machine's libsndfile can write (mp3 needs libsndfile >= 1.1, opus a build with it)."""
    formats = sf.available_formats()
    out = ["wav", "pcm", "flac"]
    if "MP3" in formats:
        out.append("mp3")
    if "OGG" in formats and "OPUS" in sf.available_subtypes("OGG"):
        out.append("opus")
    return tuple(out)


def unavailable(fmt: str) -> str | None:
    """Why `fmt` cannot be served here, or None."""
    if fmt in available():
        return None
    return f"format {fmt!r} is not available on this server (soundfile can write: {', '.join(available())})"


def read_wav(path: str) -> np.ndarray:
    """A segment's samples as int16 (fishmp's wavs are 16-bit mono)."""
    data, _ = sf.read(path, dtype="int16", always_2d=False)
    return np.asarray(data, dtype=np.int16).reshape(-1)


def encode(samples: np.ndarray, fmt: str, sample_rate: int = SAMPLE_RATE) -> bytes:
    """int16 mono samples -> the bytes of a file in `fmt` (see `available`)."""
    samples = np.asarray(samples, dtype=np.int16)
    if fmt == "pcm":
        return samples.astype("<i2").tobytes()
    container, subtype = _SOUNDFILE[fmt]
    if fmt == "opus":
        import soxr

        audio = soxr.resample(samples.astype(np.float32) / 32768.0, sample_rate, OPUS_RATE)
        sample_rate = OPUS_RATE
    else:
        audio = samples
    buf = io.BytesIO()
    sf.write(buf, audio, sample_rate, format=container, subtype=subtype)
    return buf.getvalue()


def wav_stream_header(sample_rate: int = SAMPLE_RATE) -> bytes:
    """The 44-byte header upstream streams first: 16-bit mono at `sample_rate`, data length 0 (not known yet)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
    return buf.getvalue()


def disposition(fmt: str) -> str:
    return f"attachment; filename=audio.{fmt}"
