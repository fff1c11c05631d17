"""Streaming rows (fishmp.engines.streaming, fishmp.worker.streams) on the tiny checkpoint, CPU fp32: a streamed row's
pieces put together against the same line decoded whole, and a non-streamed row beside it unchanged."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import numpy as np
import pytest

from fishmp.config import Settings
from fishmp.engines.base import SpeakerPrompt, SynthesisParams
from fishmp.engines.fish import FishSpeechEngine

TEXT = "A streamed line comes out in pieces, and the pieces make the whole line."


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: str) -> Iterator[FishSpeechEngine]:
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = FishSpeechEngine(Settings(checkpoint_dir=tiny_checkpoint, stream_first_frames=4, stream_frames=12), "cpu")
    eng.load()
    yield eng
    torch.set_num_threads(threads)


def snr_db(ref: np.ndarray, got: np.ndarray) -> float:
    err = ref - got
    return float(10 * np.log10((ref ** 2).sum() / max(float((err ** 2).sum()), 1e-30)))


def test_streamed_pieces_match_the_whole_decode(engine: FishSpeechEngine) -> None:
    voice = SpeakerPrompt("v", np.random.default_rng(3).integers(0, 1024, (10, 40)), "a reference")
    params = SynthesisParams(seed=11, max_new_tokens=60)
    whole = engine.synthesize(TEXT, voice, params)
    session = engine.open_batch(2)
    try:
        session.add("s", TEXT, params, voice, stream=True)
        session.add("w", TEXT, dataclasses.replace(params, seed=11), voice)  # a batchmate that does not stream
        pieces: list[np.ndarray] = []
        done: dict[str, object] = {}
        steps_at_first = None
        steps = 0
        while len(done) < 2:
            for key, audio in session.step():
                done[key] = audio
            steps += 1
            for key, index, audio in session.streamed:
                assert key == "s" and index == len(pieces)
                if steps_at_first is None:
                    steps_at_first = steps
                pieces.append(audio)
    finally:
        session.close()
    assert np.array_equal(done["w"].samples, whole.samples)  # a row that does not stream: exactly as before
    streamed = np.concatenate(pieces)
    assert np.array_equal(done["s"].samples, streamed)  # the wav written is what was streamed
    assert len(pieces) >= 3 and steps_at_first is not None and steps_at_first < whole.tokens / 2
    assert len(streamed) == len(whole.samples)  # the same frames: the same length
    assert snr_db(whole.samples, streamed) >= 30.0, snr_db(whole.samples, streamed)
