"""The request bodies the server parses, as pydantic models.

`TTSRequest` is fish-speech's `fish_speech.utils.schema.ServeTTSRequest` (0.1.0, the PyPI release) field for field:
the same types, defaults, ranges and the rule that a reference's audio given as a string longer than 255 characters
is base64 text (decoded; a string that is not base64 is kept as it is, as upstream does). fishmp does not import
upstream's class because importing it imports torch (4,200 modules, ~16 s on a 2-core machine), and fishmp's main
process never imports torch: tests/test_server_conformance.py parses one corpus of requests with both models and
asserts the same results. Differences, on purpose and tested:
- main's `latency` ("normal" | "balanced") and format `opus` are accepted (0.1.0 ignores latency, refuses opus);
- format `flac` too (fish's own client offers it; 0.1.0's model refuses it);
- `chunk_length` is any integer, as upstream's model really parses it (its declared 100-300 is wrapped so that
  pydantic never applies it); fishmp bounds the chunks it streams instead.
`SpeechRequest` is OpenAI's `POST /v1/audio/speech` body plus the voice-cloning fields of the serving engines
(vllm-omni, sglang-omni): `ref_audio` + `ref_text`, `references`, sampling fields.
"""

from __future__ import annotations

import base64
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field, model_validator

BASE64_MIN_CHARS = 255  # upstream: a longer string is base64


class ReferenceAudio(BaseModel):
    audio: bytes
    text: str

    @model_validator(mode="before")
    @classmethod
    def _base64_audio(cls, values: Any) -> Any:
        audio = values.get("audio") if isinstance(values, dict) else None
        if isinstance(audio, str) and len(audio) > BASE64_MIN_CHARS:
            try:
                values = {**values, "audio": base64.b64decode(audio)}
            except Exception:  # noqa: BLE001 - as upstream: left as it is, judged as audio later
                pass
        return values


UnitFloat = Annotated[float, Field(ge=0.1, le=1.0, strict=True)]


class TTSRequest(BaseModel):
    text: str
    chunk_length: int = 200
    format: Literal["wav", "pcm", "mp3", "opus", "flac"] = "wav"
    latency: Literal["normal", "balanced"] = "normal"
    references: list[ReferenceAudio] = []
    reference_id: str | None = None
    seed: int | None = None
    use_memory_cache: Literal["on", "off"] = "off"
    normalize: bool = True
    streaming: bool = False
    max_new_tokens: int = 1024
    top_p: UnitFloat = 0.8
    repetition_penalty: Annotated[float, Field(ge=0.9, le=2.0, strict=True)] = 1.1
    temperature: UnitFloat = 0.8


class SpeechReference(BaseModel):
    audio: str | None = None  # base64 or a data URL
    audio_path: str | None = None  # a file on the server: only inside --root
    text: str | None = None


class SpeechRequest(BaseModel):
    model: str | None = None  # accepted, not checked: the server has one model
    input: str
    voice: str | dict | None = None  # a stored reference id, or {"id": ...} (vllm-omni)
    response_format: Literal["mp3", "opus", "aac", "flac", "wav", "pcm"] = "mp3"
    speed: float = 1.0
    instructions: str | None = None  # accepted and unused
    stream_format: Literal["audio", "sse"] | None = None
    ref_audio: str | None = None
    ref_text: str | None = None
    references: list[SpeechReference] | None = None
    seed: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    max_new_tokens: int | None = None


def validation_detail(exc: Any) -> list[str]:
    """pydantic's errors as lines naming the field: `top_p: Input should be less than or equal to 1`."""
    out = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err.get("loc", ())) or "body"
        out.append(f"{where}: {err.get('msg')}")
    return out
