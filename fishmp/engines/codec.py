"""Codec decode for batched decoding: the audio of several rows' codes, off the decode loop.

A batch session hands the codes of the rows whose chunk ended to a CodecQueue and goes on decoding: the queue
decodes them on a thread of its own (on CUDA also on a stream of its own, so its kernels overlap the decode steps'),
and the session returns a finished row once its audio is there. The decode steps never wait for the codec; the codec
waits for nothing but the codes it was given (on CUDA an event recorded after they were copied out of the rows'
history). `threaded=False` decodes inline, in the caller's thread (the benchmarks' "before").
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
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


def _done(value: Any) -> Future:
    future: Future = Future()
    future.set_result(value)
    return future


class CodecQueue:
    """Decodes groups of rows' codes to audio in submission order; `busy_s` = seconds spent decoding."""

    def __init__(self, engine: Any, threaded: bool = True) -> None:
        import torch

        self._engine = engine
        self._cuda = engine.device.startswith("cuda")
        self._pool: ThreadPoolExecutor | None = None
        self._stream: Any = None
        self._lock = threading.Lock()
        self.busy_s = 0.0
        if threaded:
            # A new thread starts with torch's default count. On a CPU the codec thread gets one: with the decode
            # thread's own OpenMP team on the same cores, two teams oversubscribe them (B=8 whole job 1.28x faster
            # with one, docs/clone-mode.md); on a GPU it keeps the caller's count.
            threads = torch.get_num_threads() if self._cuda else 1
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fishmp-codec",
                                            initializer=torch.set_num_threads, initargs=(threads,))
            if self._cuda:
                self._stream = torch.cuda.Stream(device=engine.device)

    def submit(self, codes: list[Any]) -> list[Future]:
        """One future per row, of its audio. `codes` (10, n_i) must stay unchanged (fresh tensors, not views of
        the rows' history); on CUDA the caller's stream may still be writing them: the codec's stream waits for an
        event recorded here. On CUDA the rows are decoded together (decode_many's padded calls) and their futures
        complete together; on a CPU each row is a job of its own, so the first row is back (and its lane can take
        the next segment) without waiting for the others."""
        import torch

        if self._pool is None:
            return [_done(a) for a in self._decode(codes, None)]
        if not self._cuda:
            return [self._pool.submit(lambda c: self._decode([c], None)[0], c) for c in codes]
        event = torch.cuda.Event()
        event.record()
        group = self._pool.submit(self._decode, codes, event)
        rows: list[Future] = [Future() for _ in codes]

        def split(done: Future) -> None:
            error = done.exception()
            for j, row in enumerate(rows):
                row.set_exception(error) if error is not None else row.set_result(done.result()[j])

        group.add_done_callback(split)
        return rows

    def _decode(self, codes: list[Any], event: Any) -> list[np.ndarray]:
        import contextlib

        import torch

        t0 = time.perf_counter()
        with torch.inference_mode(), (torch.cuda.stream(self._stream) if self._stream is not None
                                      else contextlib.nullcontext()):
            if event is not None:
                torch.cuda.current_stream().wait_event(event)
                for c in codes:  # made on the decode stream, used on this one: the allocator must know
                    c.record_stream(torch.cuda.current_stream())
            out = decode_many(self._engine, codes)  # ends with a copy to the host: the time includes the GPU's
        with self._lock:
            self.busy_s += time.perf_counter() - t0
        return out

    def close(self) -> None:
        """Stop the thread after the decode it runs (queued ones are dropped)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
