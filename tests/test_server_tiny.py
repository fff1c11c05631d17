"""`fishmp serve` on the real Fish Speech path (issue 23): the tiny random checkpoint (fish-speech's own classes)
behind /v1/tts, in JSON as pyvideotrans sends it and in msgpack as fish's client does, two lines of one voice at
once (rows of one batch), and streaming. Random weights: the audio is noise of the right shape."""

from __future__ import annotations

import concurrent.futures
import io

import ormsgpack
import pytest
import soundfile as sf
from serve_helpers import Server, b64, data_url, wav_bytes

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
VOICE = wav_bytes(2.0, 140.0, seed=5, rate=44100)
FRAMES = 8  # max_new_tokens: fish-speech keeps max_new_tokens - 1 frames of a take that never stops (random weights)


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    tmp = tmp_path_factory.mktemp("serve-tiny")
    env = {"FISH_ENGINE": "fish", "FISH_CHECKPOINT_DIR": tiny_checkpoint, "FISH_CPU_WORKERS": "1",
           "FISH_MULTIPROCESS_MODE": "true", "FISH_BATCH_SIZE": "2", "FISH_TAKE_CHECK": "false",
           "FISH_PRECISION": "float32", "FISH_CACHE_DIR": str(tmp / "cache"), "FISH_SHUTDOWN_GRACE_S": "5",
           "FISH_SERVE_MAX_REFERENCE_S": "500"}  # above the tiny codec's limit: the codec's is the cap
    srv = Server(tmp, env).wait_ready(timeout=300)
    yield srv
    assert srv.stop() == 0, srv.log()


def frames_of(wav: bytes) -> float:
    data, rate = sf.read(io.BytesIO(wav))
    assert rate == 44100 and len(data) % 2048 == 0
    return len(data) / 2048


def test_json_and_msgpack_on_the_tiny_checkpoint(server) -> None:
    json_r = server.post("/v1/tts", json={"text": "Hello from the tiny model.", "max_new_tokens": FRAMES, "seed": 1,
                                          "references": [{"audio": b64(VOICE), "text": "A reference."}]})
    assert json_r.status_code == 200, json_r.text
    assert json_r.headers["content-type"] == "audio/wav" and frames_of(json_r.content) == FRAMES - 1
    body = {"text": "Hello from the tiny model.", "max_new_tokens": FRAMES, "seed": 1,
            "references": [{"audio": VOICE, "text": "A reference."}]}
    packed = server.post("/v1/tts", data=ormsgpack.packb(body), headers={"content-type": "application/msgpack"})
    assert packed.status_code == 200, packed.text
    assert packed.content == json_r.content  # the same request either way: the same audio (seeded, float32 CPU)


def test_two_lines_of_one_voice_at_once_and_streaming(server) -> None:
    def line(i: int):
        return server.post("/v1/tts", json={"text": f"Line number {i}.", "max_new_tokens": FRAMES, "seed": i,
                                            "references": [{"audio": b64(VOICE), "text": "A reference."}]})

    with concurrent.futures.ThreadPoolExecutor(2) as ex:
        results = list(ex.map(line, range(2)))
    assert all(r.status_code == 200 and frames_of(r.content) == FRAMES - 1 for r in results)
    with server.session.post(server.url("/v1/tts"), stream=True, timeout=300, json={
            "text": "First sentence of the stream is here. And a second sentence follows it.", "streaming": True,
            "chunk_length": 50, "max_new_tokens": FRAMES, "references": [{"audio": b64(VOICE), "text": "A ref."}]}) as r:
        body = r.content
    assert r.status_code == 200 and body[:4] == b"RIFF"
    assert len(body) - 44 == 2 * 2 * 2048 * (FRAMES - 1)  # two chunks of 16-bit samples


def test_a_reference_longer_than_the_codec_takes_is_refused_at_once(server) -> None:
    """Not 202 and a failure in the worker later: the server reads the codec's limit (95.1 s for the tiny codec)
    from its config and judges the reference's header against it."""
    long_voice = wav_bytes(100.0, 140.0, rate=8000)
    r = server.post("/v1/jobs", json={"speakers": {"a": {"reference_audio": data_url(long_voice),
                                                          "reference_text": "A long reference."}},
                                      "segments": [{"speaker": "a", "text": "Hi."}]})
    assert r.status_code == 400 and "at most 95.1 s" in r.text, r.text
