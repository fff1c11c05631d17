"""Batched decoding on fish-speech 0.1.0's modules (no fork): many segments of one speaker decoded together.

fish-speech decodes one row (its caches are set up with max_batch_size=1) and its attention repeat_interleaves the
whole preallocated KV cache every layer, every step. This module is the session's bookkeeping (rows, chunks, refill,
stop, codec decode); fishmp.engines.batched_model holds the model-facing math: its own KV cache of `capacity` rows, a
slow forward over fish-speech's weights with attention over the filled slots only, per-row RoPE positions and a
(B, 1, Q, K) mask (rows of different lengths and ages share one step), the fast transformer and sampling for B rows,
and the static batch / length buckets of FISH_COMPILE.

Layout of one row's cache: slots [0, P) hold the speaker prefix (prefilled once per session, written into every row);
the row's text follows at [P, T) and its frames after it, so a row's slot is its RoPE position and its mask is simply
`slot <= current`. A row that finishes is refilled at the next step (continuous refill).

A row reproduces `FishSpeechEngine.synthesize` (fish-speech's batch-1 `generate_long`) token for token on CPU float32,
whoever its batchmates are, because every upstream detail a row sees is copied:
- sampling parameters are bf16 tensors (generate() re-wraps them so: 0.8 becomes 0.80078125);
- each row draws from its own torch.Generator seeded seed + chunk index, as synthesize seeds the global RNG per chunk;
  fish-speech's `multinomial_sample_one_no_sync` draws `exponential_` over the whole vocabulary, so does each row;
- the first frame (prefill) is sampled without repetition penalty; the main token's penalty reads column 0 of the
  16-frame window across all 11 rows (`previous_tokens[:, 0]`), codebook k reads window row k + 1;
- codebook 0 = main token - semantic_begin_id clamped at 0; the fast transformer's cache is zeroed every step;
- the stop test looks at decoded frames only (not the prefill's), the last frame is dropped (generate_long drops the
  final im_end, or the last frame when max_new_tokens ran out).
Long texts are split exactly as synthesize splits them; chunk k is decoded after chunk k-1 inside the same row.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .base import Audio, EngineError, SynthesisParams, TextTooLongError
from .batched_model import BatchedModel, to_device
from .fish_common import GENERATION_RESERVE, check_params, guard_oom, import_fish_speech, split_text

# `engine` below is a loaded fish.FishSpeechEngine, typed Any: fish.py opens these sessions, so importing it back
# here would tie the two modules into a cycle.

WINDOW = 16  # decode_n_tokens' repetition-penalty window (frames)
# Padded frames per batched codec call (rows x longest row): bounds the decoder's activations, which run at 44.1 kHz
# (2,048 frames = 95 s of audio, e.g. 32 rows of 3 s; a few GB for the S1-mini codec).
CODEC_BATCH_FRAMES = 2048


def encode_prompt(engine: Any, text: str, prompt: tuple[Any, str] | None) -> Any:
    """The (11, T) long tensor generate_long builds for this text and speaker prompt (same construction)."""
    fish = import_fish_speech()
    seq = fish["ContentSequence"](modality="interleave")
    if prompt is not None:
        seq.append([fish["TextPart"](text=prompt[1]), fish["VQPart"](codes=prompt[0])], add_end=True, speaker=0)
    seq.append([fish["TextPart"](text=text)], add_end=False, speaker=0)
    encoded, audio_masks, _ = seq.encode_for_inference(engine._model.tokenizer,
                                                       num_codebooks=engine._model.config.num_codebooks)
    if audio_masks is not None:  # only AudioPart sequences carry them; synthesize never builds one
        raise EngineError("batched decoding does not support audio-part prompts")
    return encoded.long()


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


@dataclass(eq=False)
class _Row:
    key: str
    chunks: list[str]
    params: SynthesisParams
    generator: Any
    chunk: int = -1  # index of the chunk being decoded; -1 until the first prefill
    prompt_len: int = 0  # T of the current chunk
    decoded: int = 0  # frames from decode steps in the current chunk (upstream's loop index)
    max_new: int = 0
    first: Any = None  # (11,) the prefill's frame
    pieces: list[np.ndarray] = field(default_factory=list)
    codes: list[Any] = field(default_factory=list)  # each chunk's codes (10, n), for `finished_codes`
    frames: int = 0
    pending: bool = True  # the current chunk still needs its prefill
    last_main: int = -1  # main token of the last decoded frame

    @property
    def slot(self) -> int:
        """Slot (= RoPE position) of the frame fed to the next decode step."""
        return self.prompt_len + self.decoded


class FishBatchSession:
    """A BatchSession (fishmp.engines.base) over a loaded FishSpeechEngine, for one speaker."""

    def __init__(self, engine: Any, prompt: tuple[Any, str] | None, capacity: int,
                 compiled: bool = False, bucketed: bool = False) -> None:
        """compiled: decode steps run the engine's compiled step (FISH_COMPILE; static batch / length buckets);
        bucketed: eager steps padded to the same buckets (what the compiled step sees, for tests)."""
        import torch

        if capacity < 1:
            raise ValueError(f"batch capacity must be >= 1, not {capacity}")
        self.capacity = capacity
        self._engine, self._prompt = engine, prompt
        model = engine._model
        self._model, self._device, self._dtype = model, torch.device(engine.device), engine._dtype
        cfg = model.config
        self._ncb = cfg.num_codebooks
        self._limit = engine.max_seq_len - GENERATION_RESERVE
        self._im_end = model.tokenizer.get_token_id(import_fish_speech()["inference"].IM_END_TOKEN)
        self._rows: list[_Row | None] = [None] * capacity
        self._broken: str | None = None
        self.finished_codes: dict[str, list[Any]] = {}  # the codes of the rows the last step finished (diagnostics)
        # The shared prefix: the tokens every chunk's prompt starts with (two different texts agree up to it).
        a, b = encode_prompt(engine, "a", prompt), encode_prompt(engine, "b", prompt)
        n = min(a.shape[1], b.shape[1])
        differ = (a[:, :n] != b[:, :n]).any(dim=0).nonzero()
        self._prefix = a[:, : int(differ[0]) if len(differ) else n]
        self._frames_cap = min(engine.max_frames, engine.max_seq_len) + WINDOW + 1

        def allocate() -> None:
            # A compiled step keeps the engine's caches (CUDA graphs need their addresses fixed across sessions).
            shared = engine.compiled_batch() if compiled else None
            caches = shared.caches(capacity, self) if shared else None
            try:
                self._net = BatchedModel(model, self._device, self._dtype, capacity, engine.max_seq_len,
                                         compiled=shared.steps() if shared else None,
                                         bucketed=bucketed, caches=caches)
                with torch.device(self._device):
                    self._history = torch.zeros((capacity, self._ncb + 1, self._frames_cap), dtype=torch.long)
                    self._current = torch.zeros((capacity, self._ncb + 1), dtype=torch.long)
                with torch.inference_mode():
                    self._net.prefill_prefix(self._prefix)
            except BaseException:
                if shared:
                    shared.release(self)
                raise

        guard_oom(f"opening a batch of {capacity} rows on {engine.device}", allocate)

    # -- BatchSession ----------------------------------------------------------------------------------------------

    def free_rows(self) -> int:
        return sum(r is None for r in self._rows)

    def active(self) -> int:
        return self.capacity - self.free_rows()

    def add(self, key: str, text: str, params: SynthesisParams) -> None:
        import torch

        if self._broken:
            raise EngineError(f"batch session unusable after an earlier error: {self._broken}")
        check_params(params)
        if None not in self._rows:
            raise RuntimeError(f"batch session full ({self.capacity} rows): cannot add segment {key}")
        engine, prompt = self._engine, self._prompt
        try:
            chunks = split_text(text, lambda t: engine.prompt_length(t, prompt) < self._limit) if text.strip() else []
        except TextTooLongError as exc:
            raise TextTooLongError(f"segment {key}: {exc}") from None
        generator = torch.Generator(device=self._device)
        row = _Row(key=key, chunks=chunks, params=params, generator=generator)
        self._rows[self._rows.index(None)] = row
        self._next_chunk(row)

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
        if self._engine._compiled_batch is not None:
            self._engine._compiled_batch.release(self)
        self._net.close()
        self._history = self._current = None

    # -- rows ------------------------------------------------------------------------------------------------------

    def _next_chunk(self, row: _Row) -> None:
        """Move `row` to its next chunk (its prefill runs at the next step)."""
        row.chunk += 1
        row.decoded, row.first, row.pending = 0, None, True
        if row.chunk < len(row.chunks):
            seed = row.params.seed
            if seed is None:
                row.generator.seed()
            else:
                row.generator.manual_seed(seed + row.chunk)

    def _step(self) -> list[tuple[str, Audio]]:
        import torch

        finished: list[tuple[str, Audio]] = []
        self.finished_codes = {}
        with torch.inference_mode():
            starting = [i for i, r in enumerate(self._rows)
                        if r is not None and r.pending and r.chunk < len(r.chunks)]
            if starting:
                self._start_chunks(starting)
            decoding = [i for i, r in enumerate(self._rows) if r is not None and not r.pending and r.max_new > 1]
            if decoding:
                self._decode_step(decoding)
            done = [(i, r) for i, r in enumerate(self._rows) if r is not None and not r.pending and self._chunk_done(r)]
            if done:
                self._finish_chunks(done)  # their next chunks, if any, are prefilled at the next step
            for index, row in enumerate(self._rows):
                if row is None:
                    continue
                if row.chunk >= len(row.chunks):
                    samples = np.concatenate(row.pieces) if row.pieces else np.zeros(0, np.float32)
                    self.finished_codes[row.key] = row.codes
                    finished.append((row.key, Audio(samples=samples, sample_rate=self._engine.sample_rate,
                                                    tokens=row.frames)))
                    self._rows[index] = None
        return finished

    def _chunk_done(self, row: _Row) -> bool:
        if row.max_new <= 1:  # upstream's decode loop would not run at all
            return True
        return row.decoded > 0 and (row.decoded >= row.max_new - 1 or row.last_main == self._im_end)

    def _start_chunks(self, indices: list[int]) -> None:
        """Prefill these rows' texts after the shared prefix in one forward and sample their first frames (no
        penalty, as generate())."""
        import torch

        p = self._prefix.shape[1]
        rows = [self._rows[i] for i in indices]
        texts = []
        for row in rows:
            assert row is not None
            encoded = encode_prompt(self._engine, row.chunks[row.chunk], self._prompt)
            if not torch.equal(encoded[:, :p], self._prefix) or encoded.shape[1] <= p:
                raise EngineError(f"segment {row.key}: its prompt does not start with the speaker prefix")
            row.prompt_len = encoded.shape[1]
            row.max_new = min(row.params.max_new_tokens, self._engine.max_frames)
            row.max_new = min(row.max_new, self._engine.max_seq_len - row.prompt_len)
            texts.append(encoded[:, p:])
        logits, hidden = self._net.prefill_texts(texts, indices, p)
        first = self._net.sample_frame(logits, hidden, self._params(rows), [r.generator for r in rows], None)
        first = first[: len(rows)]  # without a bucket's dummy rows
        row_ids = to_device(indices, self._device)
        self._current[row_ids] = first
        self._history[row_ids] = 0
        for j, row in enumerate(rows):
            assert row is not None
            row.first, row.pending = first[j], False

    def _decode_step(self, indices: list[int]) -> None:
        """One decode step of the rows `indices` (rows below the last one that do not decode are masked)."""
        import torch

        hi = indices[-1] + 1
        chosen = set(indices)
        live = [r if i in chosen else None for i, r in enumerate(self._rows[:hi])]
        dev = self._device
        logits, hidden = self._net.decode(self._current[:hi], [r.slot if r else 0 for r in live],
                                          [r is not None for r in live])
        decoded = to_device([r.decoded if r is not None else 0 for r in live], dev)
        start = torch.clamp(decoded - WINDOW, min=0)
        cols = (start[:, None] + torch.arange(WINDOW, device=dev))[:, None, :].expand(-1, self._ncb + 1, -1)
        window = torch.gather(self._history[:hi], 2, cols)
        tokens = self._net.sample_frame(logits, hidden, self._params(live), [r.generator if r else None for r in live],
                                        window)
        sel = to_device(indices, dev)
        self._history[sel, :, decoded[sel]] = tokens[sel]
        self._current[sel] = tokens[sel]
        mains = tokens[:hi, 0].tolist()  # one device sync per step, for the stop test
        for r, main in zip(live, mains, strict=True):
            if r is not None:
                r.decoded += 1
                r.last_main = main

    def _params(self, rows: list[_Row | None]) -> tuple[Any, Any, Any]:
        import torch

        params = [r.params if r is not None else SynthesisParams() for r in rows]

        def col(name: str) -> Any:  # bf16 like generate(); (b, 1) so each row keeps its own value
            return to_device([[getattr(p, name)] for p in params], self._device, torch.bfloat16)

        return col("temperature"), col("top_p"), col("repetition_penalty")

    def _finish_chunks(self, done: list[tuple[int, _Row]]) -> None:
        """Rows whose chunk ended this step: their codes are decoded to audio together (one padded codec call per
        group, each row cut to its own length), then each row moves to its next chunk."""
        import torch

        codes = []
        for index, row in done:
            frames = torch.cat([row.first[:, None], self._history[index, :, : row.decoded]], dim=1)
            codes.append(frames[1:, :-1])  # generate_long: drop the final im_end (or last frame when tokens ran out)
        for (_, row), c, audio in zip(done, codes, decode_many(self._engine, codes), strict=True):
            row.frames += c.shape[1]
            row.pieces.append(audio)
            row.codes.append(c)
            self._next_chunk(row)
