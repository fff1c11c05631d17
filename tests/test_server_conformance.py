"""fishmp serve's /v1/tts request model against fish-speech's own (issue 23). fishmp's main process never imports
torch, and `fish_speech.utils.schema` does (~16 s, 4,200 modules), so the server has its own pydantic model with
upstream's fields; this test parses one corpus of requests with both, as JSON (references as base64 text) and as
msgpack (references as bytes), and asserts the same values or the same errors (type and field) for every one.
The differences fishmp makes on purpose are asserted one by one at the end."""

from __future__ import annotations

import base64
import copy
import json
from typing import Any

import ormsgpack
import pytest
from pydantic import ValidationError
from serve_helpers import wav_bytes

from fishmp.server.schema import TTSRequest

upstream = pytest.importorskip("fish_speech.utils.schema")
pytestmark = pytest.mark.timeout(300)

AUDIO = wav_bytes(0.6, seed=4)
B64 = base64.b64encode(AUDIO).decode()  # far longer than 255 characters
REF = {"audio": AUDIO, "text": "the reference"}

CORPUS: list[dict[str, Any]] = [
    {"text": "defaults only"},
    {"text": ""},
    {},
    {"text": 5},
    {"text": "x", "unknown_field": 1},
    {"text": "every field", "chunk_length": 250, "format": "mp3", "references": [REF], "reference_id": "v1",
     "seed": 7, "use_memory_cache": "on", "normalize": False, "streaming": True, "max_new_tokens": 300,
     "top_p": 0.5, "repetition_penalty": 1.3, "temperature": 0.6},
    *({"text": "x", "chunk_length": v} for v in (50, 5000, "150", 150.0, 150.5, None)),
    *({"text": "x", "format": v} for v in ("wav", "pcm", "mp3", "ogg", "WAV", None)),
    *({"text": "x", "references": v} for v in (
        [], [REF, {"audio": AUDIO, "text": "second"}], [{"audio": b"abc", "text": "short bytes"}],
        [{"text": "no audio"}], [{"audio": AUDIO}], [{"audio": 5, "text": "t"}], None)),
    *({"text": "x", "reference_id": v} for v in (None, "abc", 5, "")),
    *({"text": "x", "seed": v} for v in (None, 0, 5, "5", -1, 1.5, 2.0, True)),
    *({"text": "x", "use_memory_cache": v} for v in ("on", "off", "yes", True)),
    *({"text": "x", "normalize": v} for v in (True, "false", 0, "maybe", None)),
    *({"text": "x", "streaming": v} for v in (True, "1", 2)),
    *({"text": "x", "max_new_tokens": v} for v in (0, 2048, "12", -5, 1e3, None)),
    *({"text": "x", "top_p": v} for v in (0.1, 1.0, 1, 0.05, 1.01, "0.5", True, None)),
    *({"text": "x", "repetition_penalty": v} for v in (0.9, 2.0, 2, 0.89, 2.01, "1.1")),
    *({"text": "x", "temperature": v} for v in (0.1, 1.0, 0.0, 1.5, False)),
    {"text": "x", "top_p": 2, "temperature": 0, "repetition_penalty": 5, "format": "aac"},  # several errors at once
]
# Strings as a JSON client sends them: pyvideotrans's base64 reference (> 255 chars, decoded), short strings (kept as
# their UTF-8 bytes), and text that is not base64 (b64decode drops the bad characters, as upstream does).
JSON_ONLY = [
    {"text": "x", "references": [{"audio": B64, "text": "base64"}]},
    {"text": "x", "references": [{"audio": "abc", "text": "short string"}]},
    {"text": "x", "references": [{"audio": "!!" * 200, "text": "not base64"}]},
    {"text": "x", "references": [{"audio": "é" * 300, "text": "not ascii"}]},
]


def outcome(model: Any, data: Any) -> tuple[str, Any]:
    try:
        return "ok", model.model_validate(data).model_dump()
    except ValidationError as exc:
        return "error", sorted((e["type"], tuple(e["loc"])) for e in exc.errors())


def as_json(data: dict) -> dict:
    """The request as a JSON client sends it: bytes become base64 text."""
    def enc(v: Any) -> Any:
        if isinstance(v, bytes):
            return base64.b64encode(v).decode()
        if isinstance(v, dict):
            return {k: enc(x) for k, x in v.items()}
        if isinstance(v, list):
            return [enc(x) for x in v]
        return v

    return json.loads(json.dumps(enc(data)))


def compare(data: Any) -> None:
    theirs, ours = outcome(upstream.ServeTTSRequest, copy.deepcopy(data)), outcome(TTSRequest, copy.deepcopy(data))
    if ours[0] == "ok" and theirs[0] == "ok":
        ours = ("ok", {k: v for k, v in ours[1].items() if k != "latency"})  # main's field; 0.1.0 has none
    assert ours == theirs, data


@pytest.mark.parametrize("data", CORPUS, ids=lambda d: json.dumps(as_json(d))[:60])
def test_msgpack_bodies_parse_as_upstream(data) -> None:
    compare(ormsgpack.unpackb(ormsgpack.packb(data)))  # bytes stay bytes, as fish's own client sends them


@pytest.mark.parametrize("data", CORPUS + JSON_ONLY, ids=lambda d: json.dumps(as_json(d))[:60])
def test_json_bodies_parse_as_upstream(data) -> None:
    compare(as_json(data))


def test_the_defaults_are_upstreams() -> None:
    ours, theirs = TTSRequest(text="x").model_dump(), upstream.ServeTTSRequest(text="x").model_dump()
    assert ours.pop("latency") == "normal" and ours == theirs


def test_what_fishmp_accepts_beyond_0_1_0() -> None:
    for fmt in ("opus", "flac"):  # main's opus; flac, which fish's own client offers
        assert outcome(upstream.ServeTTSRequest, {"text": "x", "format": fmt})[0] == "error"
        assert TTSRequest.model_validate({"text": "x", "format": fmt}).format == fmt
    assert TTSRequest.model_validate({"text": "x", "latency": "balanced"}).latency == "balanced"  # main's field
    assert outcome(TTSRequest, {"text": "x", "latency": "fast"})[0] == "error"  # main's values only
    assert outcome(upstream.ServeTTSRequest, {"text": "x", "latency": "fast"})[0] == "ok"  # 0.1.0 ignores it
    with pytest.raises(AttributeError):  # upstream crashes on a reference that is not an object (a 500 there)
        upstream.ServeTTSRequest.model_validate({"text": "x", "references": ["abc"]})
    assert outcome(TTSRequest, {"text": "x", "references": ["abc"]})[0] == "error"  # a 400 here
