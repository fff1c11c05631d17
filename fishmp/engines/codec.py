"""Codec decode for batched decoding: the audio of several rows' codes.

A batch session hands the codes of the rows whose chunk ended to a CodecQueue and returns a finished row once its
audio is there (the rows' slots are free for the next rows meanwhile).
"""

from __future__ import annotations

import time
from concurrent.futures import Future
from typing import Any

import numpy as np

# Padded frames per batched codec call (rows x longest row): bounds the decoder's activations, which run at 44.1 kHz
# (2,048 frames = 95 s of audio, e.g. 32 rows of 3 s; a few GB for the S1-mini codec).
CODEC_BATCH_FRAMES = 2048


def decode_many(engine: Any, codes: list[Any], batched: bool | None = None) -> list[np.ndarray]:
    """Audio of several rows' codes (10, n_i). batched (default: on CUDA): one padded codec call per group of up
    to CODEC_BATCH_FRAMES padded frames, each row cut to its own n_i frames. The codec is causal (causal
    convolutions, causally masked transformers), so the padding after a row does not reach its samples, but the
    longer input changes float32 summation order: a padded row's samples differ from a lone decode by ~1e-7
    (measured 7.5e-8 max on CPU), far below 16-bit PCM's step (3e-5). On CPU the codec is compute-bound (little
    to gain) and rows decode one by one, bit-exact with `synthesize`."""
    import torch

    if batched is None:
        batched = engine.device.startswith("cuda")
    out: list[np.ndarray] = [np.zeros(0, np.float32)] * len(codes)
    order = sorted((i for i, c in enumerate(codes) if c.shape[1] > 0), key=lambda i: -codes[i].shape[1])
    frame = int(engine._codec.frame_length)
    while order:
        longest = codes[order[0]].shape[1]
        group = order[: max(1, CODEC_BATCH_FRAMES // longest)] if batched else order[:1]
        order = order[len(group):]
        if len(group) == 1:
            out[group[0]] = engine._decode(codes[group[0]])
            continue
        batch = torch.zeros((len(group), codes[group[0]].shape[0], longest), dtype=torch.long)
        for j, i in enumerate(group):
            batch[j, :, : codes[i].shape[1]] = codes[i]
        lengths = torch.tensor([codes[i].shape[1] for i in group], device=engine.device)
        with torch.inference_mode(), engine._autocast():
            audio, _ = engine._codec.decode(batch.to(engine.device), lengths)
        audio = audio[:, 0].float().clamp(-1, 1).cpu().numpy()
        for j, i in enumerate(group):
            out[i] = audio[j, : codes[i].shape[1] * frame].copy()
    return out


class CodecQueue:
    """Decodes groups of rows' codes to audio; `busy_s` = seconds spent decoding."""

    def __init__(self, engine: Any) -> None:
        self._engine = engine
        self.busy_s = 0.0

    def submit(self, codes: list[Any]) -> Future:
        """Future of the rows' audio (one array per row), decoded now."""
        import torch

        t0 = time.perf_counter()
        done: Future = Future()
        with torch.inference_mode():
            done.set_result(decode_many(self._engine, codes))
        self.busy_s += time.perf_counter() - t0
        return done

    def close(self) -> None:
        pass
