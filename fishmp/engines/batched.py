"""Batched decoding on fish-speech 0.1.0's modules (no fork): many segments decoded together, of any speakers.

fish-speech decodes one row (its caches are set up with max_batch_size=1) and its attention repeat_interleaves the
whole preallocated KV cache every layer, every step. This module is the session's bookkeeping (rows, chunks, refill,
stop, codec decode); fishmp.engines.batched_model holds the model-facing math: its own KV cache of `capacity` rows, a
slow forward over fish-speech's weights with attention over the filled slots only, per-row RoPE positions and a
(B, 1, Q, K) mask (rows of different lengths and ages share one step), the fast transformer and the sampling of a
frame for B rows (fishmp.engines.sampling), and the static batch / length buckets of FISH_COMPILE.

Layout of one row's cache: slots [0, P) hold its speaker's prefix (prefilled once per worker and kept,
fishmp.engines.prefix_cache; copied into the row's slots when a row of that speaker starts there, unless the slot's
last row had the same prefix); the row's text follows at [P, T) and its frames after it, so a row's slot is its RoPE
position and its mask is simply `slot <= current`. Rows of different speakers (and jobs) share a step: each has its
own prefix, P and positions. A row that finishes is refilled at the next step (continuous refill).

A row gives the same tokens whatever its batchmates, their speakers, the batch size, arrival order or refill (exact
on CPU float32; `FishSpeechEngine.synthesize` is a session of one row), and reproduces fish-speech's own batch-1
`generate_long` token for token when fed the same sampling noise (the tests), because every upstream detail a row
sees is copied:
- sampling parameters are bf16 tensors (generate() re-wraps them so: 0.8 becomes 0.80078125);
- the noise of a draw is a function of (seed, chunk, frame, codebook, vocabulary index) only (fishmp.engines.sampling),
  over the whole vocabulary as fish-speech's `multinomial_sample_one_no_sync` draws it; a row without a seed gets a
  random one when added;
- the first frame (prefill) is sampled without repetition penalty; the main token's penalty reads column 0 of the
  16-frame window across all 11 rows (`previous_tokens[:, 0]`), codebook k reads window row k + 1;
- codebook 0 = main token - semantic_begin_id clamped at 0; the fast transformer's cache is zeroed every step;
- the stop test looks at decoded frames only (not the prefill's), the last frame is dropped (generate_long drops the
  final im_end, or the last frame when max_new_tokens ran out).
Long texts are split exactly as synthesize splits them; chunk k is decoded after chunk k-1 inside the same row.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import secrets
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import Audio, EngineError, SpeakerPrompt, SynthesisParams, TextTooLongError
from .batched_model import BatchedModel, to_device
from .codec import CodecQueue
from .fish_common import GENERATION_RESERVE, check_params, guard_oom, import_fish_speech, split_text
from .prefix_cache import Prefix, encode_prompt
from .sampling import row_key
from .streaming import StreamingRows, StreamPlan, hand_out, submit_piece

# `engine` below is a loaded fish.FishSpeechEngine, typed Any: fish.py opens these sessions, so importing it back
# here would tie the two modules into a cycle.

WINDOW = 16  # decode_n_tokens' repetition-penalty window (frames)


@dataclass(eq=False)
class _Row:
    key: str
    chunks: list[str]
    params: SynthesisParams
    seed: int  # params.seed, or a random one drawn when the row was added
    prefix: Prefix  # its speaker's
    chunk: int = -1  # index of the chunk being decoded; -1 until the first prefill
    prompt_len: int = 0  # T of the current chunk
    max_new: int = 0
    pieces: list[Future] = field(default_factory=list)  # each chunk's audio (the codec's)
    codes: list[Any] = field(default_factory=list)  # each chunk's codes (10, n), for `finished_codes`
    frames: int = 0
    pending: bool = True  # the current chunk still needs its prefill
    stream: bool = False  # progressive: `pieces` are the streamed chunks' audio (fishmp.engines.streaming)
    sent: int = 0  # streaming: frames of the current text chunk already handed to the codec
    handed: int = 0  # streaming: pieces already returned by `streamed`


class FishBatchSession(StreamingRows):
    """A BatchSession (fishmp.engines.base) over a loaded FishSpeechEngine; each row has its own speaker.

    The rows' state lives in device tensors of the model's rows (slots, frames decoded, keys, parameters, the
    penalty window's history): a decode step is the same tensor ops whatever B, with no Python loop over rows and
    one device-to-host copy (the stop test). The host keeps what shapes need (the furthest slot a live row reads)
    as numpy arrays, updated only when rows start or stop."""

    def __init__(self, engine: Any, capacity: int, compiled: bool = False, bucketed: bool = False,
                 codec_thread: bool = True) -> None:
        """compiled: decode steps run the engine's compiled step (FISH_COMPILE; static batch / length buckets);
        bucketed: eager steps padded to the same buckets (what the compiled step sees, for tests);
        codec_thread: finished rows become audio on a thread of their own (fishmp.engines.codec), else inline."""
        import torch

        if capacity < 1:
            raise ValueError(f"batch capacity must be >= 1, not {capacity}")
        self.capacity = capacity
        self._engine = engine
        model = engine._model
        self._model, self._device, self._dtype = model, torch.device(engine.device), engine._dtype
        self._ncb = model.config.num_codebooks
        self._limit = engine.max_seq_len - GENERATION_RESERVE
        self._im_end = model.tokenizer.get_token_id(import_fish_speech()["inference"].IM_END_TOKEN)
        self._rows: list[_Row | None] = [None] * capacity
        self._slot_prefix: list[str | None] = [None] * capacity  # whose prefix fills each row's slots [0, P)
        self._starting: set[int] = set()  # rows whose current chunk needs its prefill (at the next step)
        self._draining: list[_Row] = []  # rows done decoding (their slot is free again), waiting for their audio
        self._steps = 0  # decode steps run (a live row decodes at every one: its frames = steps - its start)
        self._broken: str | None = None
        self.finished_codes: dict[str, list[Any]] = {}  # the codes of the rows the last step finished (diagnostics)
        self.stream_plan = StreamPlan.from_settings(getattr(engine, "settings", None))
        self._piece_args = (self.stream_plan.context, int(engine._codec.frame_length))  # submit_piece's
        self.streamed: list[tuple[str, int, np.ndarray]] = []  # (key, index, audio) the last step made ready, in order
        self._frames_cap = min(engine.max_frames, engine.max_seq_len) + WINDOW + 1

        def allocate() -> None:
            # A compiled step keeps the engine's caches (CUDA graphs need their addresses fixed across sessions).
            shared = engine.compiled_batch() if compiled else None
            caches = shared.caches(capacity, self) if shared else None
            try:
                self._net = BatchedModel(model, self._device, self._dtype, capacity, engine.max_seq_len,
                                         compiled=shared.steps() if shared else None,
                                         bucketed=bucketed, caches=caches)
                self._allocate_state(self._net.rows)
            except BaseException:
                if shared:
                    shared.release(self)
                raise

        guard_oom(f"opening a batch of {capacity} rows on {engine.device}", allocate)
        self._codec = CodecQueue(engine, threaded=codec_thread)

    def _allocate_state(self, rows: int) -> None:
        """Per-row state for the model's `rows` (capacity, or its bucket: dummy rows stay not live). Inference
        tensors, as the steps that use them make theirs: a compiled step then sees one kind of input (a normal
        tensor where warm-up passed an inference one would recompile it)."""
        import torch

        with torch.device(self._device), torch.inference_mode():
            self._history = torch.zeros((rows, self._ncb + 1, self._frames_cap), dtype=torch.long)
            self._current = torch.zeros((rows, self._ncb + 1), dtype=torch.long)  # the frame fed next
            self._first = torch.zeros((rows, self._ncb + 1), dtype=torch.long)  # the chunk's prefill frame
            self._decoded = torch.zeros(rows, dtype=torch.long)  # frames decoded in the chunk (upstream's loop i)
            self._prompt_len = torch.zeros(rows, dtype=torch.long)
            self._max_new = torch.zeros(rows, dtype=torch.long)
            self._keys = torch.zeros(rows, dtype=torch.long)  # sampling.row_key(seed, chunk)
            self._params = torch.ones((rows, 3), dtype=torch.bfloat16)  # temperature, top_p, penalty
            self._live = torch.zeros(rows, dtype=torch.bool)  # decoding (not pending, not free, not a dummy)
            self._row_ids = torch.arange(rows)
            self._window_cols = torch.arange(WINDOW)
        self._h_live = np.zeros(rows, dtype=bool)  # host copies of what shapes need
        self._h_prompt_len = np.zeros(rows, dtype=np.int64)
        self._h_start = np.zeros(rows, dtype=np.int64)  # self._steps when the row's chunk began decoding

    # -- BatchSession ----------------------------------------------------------------------------------------------

    def free_rows(self) -> int:
        return sum(r is None for r in self._rows)

    def active(self) -> int:
        return self.capacity - self.free_rows() + len(self._draining)

    @property
    def codec_seconds(self) -> float:
        """Seconds the codec has spent decoding this session's rows (off the decode loop with codec_thread)."""
        return self._codec.busy_s

    streams = True  # add(stream=True) rows hand out their audio in pieces as they decode

    def add(self, key: str, text: str, params: SynthesisParams, speaker: SpeakerPrompt | None = None,
            stream: bool = False) -> None:
        """Start a row of `speaker`'s voice (its prefix is prefilled here on a miss of the engine's prefix cache).
        `key` names the segment in input errors ("" for none: FishSpeechEngine.synthesize). `stream`: its audio
        comes out in pieces as it decodes (`streamed` after each step); its Audio is those pieces put together."""
        if self._broken:
            raise EngineError(f"batch session unusable after an earlier error: {self._broken}")
        check_params(params)
        if None not in self._rows:
            raise RuntimeError(f"batch session full ({self.capacity} rows): cannot add segment {key}")
        engine = self._engine
        prefix = engine.prefix(speaker, filled=False)  # a new voice: prefilled with the row's text (_start_chunks)
        try:
            chunks = (split_text(text, lambda t: engine.prompt_length(t, prefix.prompt) < self._limit)
                      if text.strip() else [])
        except TextTooLongError as exc:
            raise TextTooLongError(f"segment {key}: {exc}" if key else str(exc)) from None
        seed = params.seed if params.seed is not None else secrets.randbits(64)
        row = _Row(key=key, chunks=chunks, params=params, seed=seed, prefix=prefix, stream=stream)
        index = self._rows.index(None)
        self._rows[index] = row
        self._next_chunk(index, row)

    def step(self) -> list[tuple[str, Audio]]:
        if self._broken:
            raise EngineError(f"batch session unusable after an earlier error: {self._broken}")
        try:
            return guard_oom(f"decoding a batch of {self.active()} rows on {self._engine.device}", self._step)
        except EngineError as exc:
            self._broken = str(exc)
            raise
        except Exception as exc:
            self._broken = f"{type(exc).__name__}: {exc}"
            raise EngineError(f"batched decoding failed: {self._broken}") from exc

    def warm_up(self) -> None:
        """Compile the session's steps ahead (FISH_COMPILE): see BatchedModel.warm_up."""
        self._net.warm_up()

    def close(self) -> None:
        self._rows = [None] * self.capacity
        self._slot_prefix = [None] * self.capacity
        self._starting.clear()
        self._draining.clear()
        self._codec.close()
        if self._engine._compiled_batch is not None:
            self._engine._compiled_batch.release(self)
        self._net.close()
        self._history = self._current = self._first = None

    def in_flight_frames(self) -> int:
        """Frames produced so far by the rows still in the session (benchmark bookkeeping)."""
        return sum(r.frames + (0 if r.pending else int(self._steps - self._h_start[i]) + 1)
                   for i, r in enumerate(self._rows) if r is not None) + sum(r.frames for r in self._draining)

    # -- rows ------------------------------------------------------------------------------------------------------

    def _next_chunk(self, index: int, row: _Row) -> None:
        """Move the row to its next chunk (its prefill runs at the next step), or, after its last, out of its slot
        (free for the next row at once) to wait for its audio."""
        row.chunk += 1
        row.pending = True
        if row.chunk < len(row.chunks):
            self._starting.add(index)
        else:
            self._rows[index] = None
            self._draining.append(row)

    def _step(self) -> list[tuple[str, Audio]]:
        import torch

        self.finished_codes = {}
        self.streamed = []
        done: list[int] = []
        idle = not self._starting and not self._h_live.any()  # nothing to decode since the last step returned
        with torch.inference_mode():
            if self._starting:
                done += self._start_chunks(sorted(self._starting))
            if self._h_live.any():
                done += self._decode_step()
            if done:
                self._finish_chunks(sorted(done))  # their next chunks, if any, are prefilled at the next step
            self._stream_live(set(done))
        return self._returned(wait=idle)

    def _returned(self, wait: bool) -> list[tuple[str, Audio]]:
        """The draining rows whose audio is ready, in the order they finished decoding. `wait`: nothing was left
        to decode when this step began (the caller had its chance to add rows after the last one and added none):
        wait for the codec rather than spin. Not right after the last live row finished: the caller may have a
        row to add, which then decodes while the codec works (at batch 1 the codec waited for every row before)."""
        def ready(row: _Row) -> bool:
            return all(f.done() for f in row.pieces)

        if (wait and self._draining and not self._starting and not self._h_live.any()
                and not any(map(ready, self._draining))):
            concurrent.futures.wait([f for row in self._draining for f in row.pieces if not f.done()],
                                    return_when=concurrent.futures.FIRST_COMPLETED)
        finished, waiting = [], []
        for row in self._draining:
            if row.stream:
                hand_out(row, self.streamed)
            if not ready(row):
                waiting.append(row)
                continue
            pieces = [f.result() for f in row.pieces]  # a codec error is raised here, for the whole batch
            samples = np.concatenate(pieces) if pieces else np.zeros(0, np.float32)
            self.finished_codes[row.key] = row.codes
            finished.append((row.key, Audio(samples=samples, sample_rate=self._engine.sample_rate, tokens=row.frames)))
        self._draining = waiting
        return finished

    def _start_chunks(self, indices: list[int]) -> list[int]:
        """Prefill these rows' texts, each after its speaker's prefix, in one forward, sample their first frames (no
        penalty, as generate()) and make them live. A row whose voice is not in the prefix cache (nor left in its
        slot) prefills its whole prompt, prefix and text, in that same forward; its prefix's KV then goes to the
        cache. Returns the rows with no decode step to run (max_new_tokens 1)."""
        import torch

        self._starting.clear()
        rows = [self._rows[i] for i in indices]
        texts, starts, copies, whole = [], [], {}, []
        for index, row in zip(indices, rows, strict=True):
            assert row is not None
            prefix, p = row.prefix, row.prefix.length
            encoded = encode_prompt(self._engine, row.chunks[row.chunk], prefix.prompt)
            if not torch.equal(encoded[:, :p], prefix.tokens) or encoded.shape[1] <= p:
                raise EngineError(f"segment {row.key}: its prompt does not start with the speaker prefix")
            start = p
            if self._slot_prefix[index] != prefix.key:  # else the slot's last row left this very prefix there
                if not prefix.filled:  # filled since the row was added (another row of that voice started)?
                    row.prefix = prefix = self._engine.prefixes.peek(prefix.key) or prefix
                if prefix.filled:
                    copies.setdefault(prefix.key, (prefix, []))[1].append(index)
                else:
                    whole.append(index)
                    start = 0
                self._slot_prefix[index] = prefix.key
            row.prompt_len = encoded.shape[1]
            row.max_new = min(row.params.max_new_tokens, self._engine.max_frames,
                              self._engine.max_seq_len - row.prompt_len)
            row.pending = False
            texts.append(encoded[:, start:])
            starts.append(start)
        for prefix, ids in copies.values():
            self._net.copy_prefix(ids, prefix.k, prefix.v)
        for row in rows:  # the KV now lives in the rows' own slots: the cache alone bounds the prefixes kept
            assert row is not None
            row.prefix = dataclasses.replace(row.prefix, k=(), v=())
        dev, n = self._device, len(rows)
        logits, hidden = self._net.prefill_texts(texts, indices, starts)
        for index in whole:  # their prefixes' KV, for the voices' next rows
            row = self._rows[index]
            assert row is not None
            p = row.prefix.length  # a copy of the row's slots [0, P) per layer, (H_kv, P, D) as prefill_prefix's
            k, v = tuple(kc[index, :, :p].clone() for kc in self._net.k), tuple(vc[index, :, :p].clone()
                                                                               for vc in self._net.v)
            self._engine.prefixes.put(dataclasses.replace(row.prefix, k=k, v=v, filled=True))
        params = to_device([[r.params.temperature, r.params.top_p, r.params.repetition_penalty] for r in rows], dev,
                           torch.bfloat16)  # bf16 like generate()
        keys = to_device([row_key(r.seed, r.chunk) for r in rows], dev, torch.long)
        first = self._net.sample_frame(logits, hidden, params, keys, torch.zeros(n, dtype=torch.long, device=dev),
                                       None)[:n]
        ids = to_device(indices, dev, torch.long)
        self._first[ids] = first
        self._current[ids] = first
        self._history[ids] = 0
        self._decoded[ids] = 0
        self._prompt_len[ids] = to_device([r.prompt_len for r in rows], dev, torch.long)
        self._max_new[ids] = to_device([r.max_new for r in rows], dev, torch.long)
        self._keys[ids] = keys
        self._params[ids] = params
        decoding = np.array([r.max_new > 1 for r in rows])  # else upstream's decode loop would not run at all
        self._live[ids] = to_device(decoding.tolist(), dev)
        self._h_live[indices] = decoding
        self._h_prompt_len[indices] = [r.prompt_len for r in rows]
        self._h_start[indices] = self._steps
        return [i for i, d in zip(indices, decoding, strict=True) if not d]

    def _decode_step(self) -> list[int]:
        """One decode step of every live row, all in tensor ops over rows [0, b); returns the rows whose chunk ended
        (the stop test: upstream's im_end or max_new_tokens, on decoded frames only)."""
        import torch

        live_rows = np.flatnonzero(self._h_live)
        b = self._net.step_rows(int(live_rows[-1]) + 1)
        k_len = int((self._h_prompt_len + self._steps - self._h_start)[live_rows].max()) + 1
        live, decoded = self._live[:b], self._decoded[:b]
        slots = torch.where(live, self._prompt_len[:b] + decoded, 0)
        logits, hidden = self._net.decode(self._current[:b], slots, live, k_len)
        start = torch.clamp(decoded - WINDOW, min=0)  # decode_n_tokens' window: frames [i - 16, i), or [0, 16)
        cols = (start[:, None] + self._window_cols)[:, None, :].expand(-1, self._ncb + 1, -1)
        window = torch.gather(self._history[:b], 2, cols)
        tokens = self._net.sample_frame(logits, hidden, self._params[:b], self._keys[:b], decoded + 1, window)
        # A row that is not live writes the last history column, which no window reads (frames stay below it).
        self._history[self._row_ids[:b], :, torch.where(live, decoded, self._frames_cap - 1)] = tokens
        self._current[:b] = tokens
        decoded += live
        stop = live & ((decoded >= self._max_new[:b] - 1) | (tokens[:, 0] == self._im_end))
        live &= ~stop
        stopped = np.flatnonzero(stop.cpu().numpy())  # the step's one device-to-host copy
        self._steps += 1
        self._h_live[stopped] = False
        return stopped.tolist()

    def _finish_chunks(self, indices: list[int]) -> None:
        """Rows whose chunk ended this step: their codes go to the codec together (one padded codec call per group
        on CUDA, each row cut to its own length; off the decode loop), then each row moves to its next chunk."""
        import torch

        codes = []
        for index in indices:
            row = self._rows[index]
            assert row is not None
            n = int(self._steps - self._h_start[index]) if row.max_new > 1 else 0
            frames = torch.cat([self._first[index, :, None], self._history[index, :, :n]], dim=1)
            codes.append(frames[1:, :-1])  # generate_long: drop the final im_end (or last frame when tokens ran out)
        whole = {i: c for i, c in zip(indices, codes, strict=True) if not self._rows[i].stream}  # type: ignore
        audio = dict(zip(whole, self._codec.submit(list(whole.values())), strict=True))
        for index, c in zip(indices, codes, strict=True):
            row = self._rows[index]
            assert row is not None
            if row.stream:  # the rest of the chunk; its earlier frames already went as pieces
                if c.shape[1] > row.sent:
                    submit_piece(self._codec, row, c, c.shape[1], *self._piece_args)
                row.sent = 0
            else:
                row.pieces.append(audio[index])
            row.frames += c.shape[1]
            row.codes.append(c)
            self._next_chunk(index, row)
