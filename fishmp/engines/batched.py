"""Batched decoding on fish-speech 0.1.0's modules (no fork): many segments of one speaker decoded together.

fish-speech decodes one row (its caches are set up with max_batch_size=1) and its attention repeat_interleaves the
whole preallocated KV cache every layer, every step. This session keeps its own KV cache of `capacity` rows and runs its
own slow forward over fish-speech's weights: attention over the filled slots only (GQA inside SDPA, `enable_gqa`),
per-row RoPE positions and a (B, 1, Q, K) mask, so rows of different lengths and ages share one step.

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

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from .base import Audio, EngineError, SynthesisParams, TextTooLongError
from .fish import GENERATION_RESERVE, _guard_oom, import_fish_speech, split_text

if TYPE_CHECKING:
    from .fish import FishSpeechEngine

WINDOW = 16  # decode_n_tokens' repetition-penalty window (frames)
FAST_CODEBOOK_VOCAB = 1024  # decode_one_token_ar cuts the fast logits to this many codes


def check_params(params: SynthesisParams) -> None:
    """The ranges generate_long asserts, as a one-line ValueError."""
    if not (0 < params.top_p <= 1 and 0 < params.temperature < 2 and 0 < params.repetition_penalty < 2
            and params.max_new_tokens > 0):
        raise ValueError(f"sampling parameters out of range for fish-speech: {params} (allowed: 0 < top_p <= 1, "
                         f"0 < temperature < 2, 0 < repetition_penalty < 2, max_new_tokens > 0)")


def encode_prompt(engine: FishSpeechEngine, text: str, prompt: tuple[Any, str] | None) -> Any:
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


def sample_rows(logits: Any, temperature: Any, top_p: Any, penalty: Any, previous: Any | None,
                generators: list[Any]) -> Any:
    """fish-speech's logits_to_probs + multinomial_sample_one_no_sync, row by row in one batch.

    logits (b, V); temperature / top_p / penalty (b, 1) bf16; previous (b, W) or None; one generator per row.
    Returns (b,) long."""
    import torch

    if previous is not None:
        previous = previous.long()
        score = torch.gather(logits, dim=-1, index=previous)
        score = torch.where(score < 0, score * penalty, score / penalty)
        logits = logits.scatter(dim=-1, index=previous, src=score)
    sorted_logits, sorted_indices = torch.sort(logits, descending=True)
    cum_probs = torch.cumsum(torch.nn.functional.softmax(sorted_logits, dim=-1), dim=-1)
    remove = cum_probs > top_p
    remove[:, 0] = False  # keep at least one option (upstream: [0] on a 1-D row)
    remove = remove.scatter(dim=-1, index=sorted_indices, src=remove)
    logits = logits.masked_fill(remove, -float("Inf"))
    logits = logits / torch.clip(temperature, min=1e-5)
    probs = torch.nn.functional.softmax(logits, dim=-1)
    # Each row draws exponential noise over its whole row from its own generator, as the global RNG does at batch 1.
    q = torch.stack([torch.empty_like(probs[r]).exponential_(1, generator=g) for r, g in enumerate(generators)])
    return torch.argmax(probs / q, dim=-1)


def rotary_rows(x: Any, freqs: Any) -> Any:
    """apply_rotary_emb with per-row positions: x (b, Q, H, D), freqs (b, Q, D/2, 2) (the bf16 table's rows)."""
    import torch

    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs.view(xs.size(0), xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
                       xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], -1)
    return out.flatten(3).type_as(x)


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

    def __init__(self, engine: FishSpeechEngine, prompt: tuple[Any, str] | None, capacity: int) -> None:
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
            shape = (capacity, cfg.n_local_heads, engine.max_seq_len, cfg.head_dim)
            with torch.device(self._device):
                self._k = [torch.zeros(shape, dtype=self._dtype) for _ in model.layers]
                self._v = [torch.zeros(shape, dtype=self._dtype) for _ in model.layers]
                self._history = torch.zeros((capacity, self._ncb + 1, self._frames_cap), dtype=torch.long)
                self._current = torch.zeros((capacity, self._ncb + 1), dtype=torch.long)
                self._fast_caches: dict[int, list[Any]] = {}
            with torch.inference_mode():
                self._prefill(slice(0, capacity), self._prefix[None].to(self._device), 0)

        _guard_oom(f"opening a batch of {capacity} rows on {engine.device}", allocate)

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
            return _guard_oom(f"decoding a batch of {self.active()} rows on {self._engine.device}", self._step)
        except EngineError as exc:
            self._broken = str(exc)
            raise
        except Exception as exc:
            self._broken = f"{type(exc).__name__}: {exc}"
            raise EngineError(f"batched decoding failed: {self._broken}") from exc

    def close(self) -> None:
        self._rows = [None] * self.capacity
        self._k = self._v = []
        self._history = self._current = None
        self._fast_caches = {}

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
            for index, row in enumerate(self._rows):
                if row is None:
                    continue
                if not row.pending and self._chunk_done(row):
                    self._finish_chunk(index, row)  # its next chunk, if any, is prefilled at the next step
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
        penalty, as generate()). Texts are right-aligned in the input so every row's last token is the last column;
        pad columns write a scratch slot and attend slot 0 only (finite, never read by a real row)."""
        import torch

        dev, p = self._device, self._prefix.shape[1]
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
        width = max(t.shape[1] for t in texts)
        inp = torch.zeros((len(rows), self._ncb + 1, width), dtype=torch.long)
        for j, t in enumerate(texts):
            inp[j, :, width - t.shape[1]:] = t
        pad = torch.tensor([width - t.shape[1] for t in texts], device=dev)
        col = torch.arange(width, device=dev)
        real = col[None, :] >= pad[:, None]
        positions = torch.where(real, p + col[None, :] - pad[:, None], 0)
        write = torch.where(real, positions, self._engine.max_seq_len - 1)
        k_len = max(r.prompt_len for r in rows if r is not None)
        slots = torch.arange(k_len, device=dev)
        mask = torch.where(real[:, :, None], slots[None, None, :] <= positions[:, :, None], slots[None, None, :] == 0)
        row_ids = torch.tensor(indices, device=dev)
        logits, hidden = self._forward(inp.to(dev), row_ids, positions, write, mask[:, None], k_len)
        first = self._sample_frame(logits, hidden, rows, None)
        self._current[row_ids] = first
        self._history[row_ids] = 0
        for j, row in enumerate(rows):
            assert row is not None
            row.first, row.pending = first[j], False

    def _finish_chunk(self, index: int, row: _Row) -> None:
        import torch

        frames = torch.cat([row.first[:, None], self._history[index, :, : row.decoded]], dim=1)
        codes = frames[1:, :-1]  # generate_long: drop the final im_end (or last frame when tokens ran out)
        row.frames += codes.shape[1]
        row.pieces.append(self._engine._decode(codes))
        row.codes.append(codes)
        self._next_chunk(row)

    # -- model -----------------------------------------------------------------------------------------------------

    def _params(self, params: list[SynthesisParams]) -> tuple[Any, Any, Any]:
        import torch

        def col(name: str) -> Any:  # bf16 like generate(); (b, 1) so each row keeps its own value
            return torch.tensor([[getattr(p, name)] for p in params], dtype=torch.bfloat16, device=self._device)

        return col("temperature"), col("top_p"), col("repetition_penalty")

    def _decode_step(self, indices: list[int]) -> None:
        import torch

        hi = indices[-1] + 1  # rows [0, hi) run; free ones inside are masked to slot 0 and write a scratch slot
        live = [r if r is not None and not r.pending else None for r in self._rows[:hi]]
        dev = self._device
        active = torch.tensor([r is not None for r in live], device=dev)
        slot_list = [r.slot if r is not None else 0 for r in live]
        slots = torch.tensor(slot_list, device=dev)
        decoded = torch.tensor([r.decoded if r is not None else 0 for r in live], device=dev)
        k_len = max(slot_list) + 1
        write = torch.where(active, slots, self._engine.max_seq_len - 1)
        inp = torch.where(active[:, None], self._current[:hi], 0)[:, :, None]
        mask = (torch.arange(k_len, device=self._device)[None, :] <= slots[:, None])[:, None, None, :]
        logits, hidden = self._forward(inp, slice(0, hi), slots[:, None], write[:, None], mask, k_len)
        start = torch.clamp(decoded - WINDOW, min=0)
        cols = (start[:, None] + torch.arange(WINDOW, device=self._device))[:, None, :].expand(-1, self._ncb + 1, -1)
        window = torch.gather(self._history[:hi], 2, cols)
        tokens = self._sample_frame(logits, hidden, live, window)
        sel = active.nonzero()[:, 0]
        self._history[sel, :, decoded[sel]] = tokens[sel]
        self._current[sel] = tokens[sel]
        mains = tokens[:, 0].tolist()  # one device sync per step, for the stop test
        for r, main in zip(live, mains, strict=True):
            if r is not None:
                r.decoded += 1
                r.last_main = main

    def _sample_frame(self, logits: Any, hidden: Any, rows: list[_Row | None], window: Any | None) -> Any:
        """decode_one_token_ar after forward_generate, for b rows: (b, 11) long. Free rows (None) draw nothing."""
        import torch

        model = self._model
        b = logits.shape[0]
        live = [i for i, r in enumerate(rows) if r is not None]
        params = self._params([r.params if r is not None else SynthesisParams() for r in rows])
        gens = [r.generator if r is not None else None for r in rows]
        out = torch.zeros((b, self._ncb + 1), dtype=torch.long, device=self._device)

        def draw(lg: Any, prev: Any | None) -> Any:
            sel = torch.tensor(live, device=self._device)
            t, p, rp = (x[sel] for x in params)
            res = torch.zeros(b, dtype=torch.long, device=self._device)
            res[sel] = sample_rows(lg[sel], t, p, rp, prev[sel] if prev is not None else None, [gens[i] for i in live])
            return res

        main = draw(logits[:, -1], window[:, :, 0] if window is not None else None)
        out[:, 0] = main
        saved = [layer.attention.kv_cache for layer in model.fast_layers]
        try:
            for layer, cache in zip(model.fast_layers, self._fast_cache(b), strict=True):
                layer.attention.kv_cache = cache
                cache.k_cache.zero_()
                cache.v_cache.zero_()
            model.forward_generate_fast(hidden, torch.tensor([0], device=self._device, dtype=torch.long))
            a = main - model.tokenizer.semantic_begin_id
            a[a < 0] = 0
            out[:, 1] = a
            h = model.fast_embeddings(a)
            for cb in range(1, self._ncb):
                fast_logits = model.forward_generate_fast(h, torch.tensor([cb], device=self._device, dtype=torch.long))
                a = draw(fast_logits[:, -1, :FAST_CODEBOOK_VOCAB], window[:, cb + 1] if window is not None else None)
                out[:, cb + 1] = a
                h = model.fast_embeddings(a)
        finally:
            for layer, cache in zip(model.fast_layers, saved, strict=True):
                layer.attention.kv_cache = cache
        return out

    def _fast_cache(self, b: int) -> list[Any]:
        """Fast-transformer KV caches for b rows (fish-speech's own KVCache, swapped in for the step)."""
        if b not in self._fast_caches:
            import torch

            import_fish_speech()
            from fish_speech.models.text2semantic.llama import KVCache

            cfg = self._model.config
            with torch.device(self._device):
                self._fast_caches[b] = [KVCache(b, cfg.num_codebooks, cfg.fast_n_local_heads, cfg.fast_head_dim,
                                            dtype=self._dtype) for _ in self._model.fast_layers]
        return self._fast_caches[b]

    def _prefill(self, rows: slice, inp: Any, start: int) -> tuple[Any, Any]:
        """Run tokens inp (1, 11, Q) at slots [start, start + Q) of rows (written into each of them)."""
        import torch

        q = inp.shape[2]
        positions = torch.arange(start, start + q, device=self._device)[None, :]
        slots = torch.arange(start + q, device=self._device)
        mask = (slots[None, :] <= positions[0][:, None])[None, None]
        return self._forward(inp, rows, positions, slice(start, start + q), mask, start + q)

    def _forward(self, inp: Any, rows: Any, positions: Any, write: Any, mask: Any, k_len: int) -> tuple[Any, Any]:
        """forward_generate for rows of our cache: inp (b, 11, Q), rows a slice or (b,) row ids, positions (b, Q),
        write = a slot slice (the shared prefix: b = 1 broadcast into every row of the `rows` slice) or (b, Q)
        slots, mask (b|1, 1, Q, K). Returns last-column logits (b, 1, V) and fast-projected hidden (b, 1, fast)."""
        import torch
        import torch.nn.functional as F

        model, cfg = self._model, self._model.config
        tok = model.tokenizer
        embeds = [model.codebook_embeddings(inp[:, i + 1] + i * cfg.codebook_size) for i in range(cfg.num_codebooks)]
        vq_sum = torch.stack(embeds, dim=1).sum(dim=1)
        vq_masks = (inp[:, 0] >= tok.semantic_begin_id) & (inp[:, 0] <= tok.semantic_end_id)
        vq_sum[~vq_masks] = 0
        x = model.embeddings(inp[:, 0]) + vq_sum
        if cfg.scale_codebook_embeddings:
            x = torch.where(vq_masks.unsqueeze(-1).expand_as(x), x / math.sqrt(cfg.num_codebooks + 1), x)
        freqs = model.freqs_cis[positions]  # (b, Q, D/2, 2), the bf16 table as upstream
        if not isinstance(write, slice):
            # Cache rows x heads flattened, so the write is one index_put with two adjacent leading indices.
            ids = torch.arange(rows.start, rows.stop, device=self._device) if isinstance(rows, slice) else rows
            n_kv = cfg.n_local_heads
            heads = (ids[:, None] * n_kv + torch.arange(n_kv, device=self._device)[None, :])[:, :, None]
            write = write[:, None, :]  # (b, 1, Q) against heads (b, H, 1)
        for index, layer in enumerate(model.layers):
            att = layer.attention
            h_in = layer.attention_norm(x)
            b, s, _ = h_in.shape
            q_size, kv_size = att.n_head * att.head_dim, att.n_local_heads * att.head_dim
            q, k, v = att.wqkv(h_in).split([q_size, kv_size, kv_size], dim=-1)
            q = q.view(b, s, att.n_head, att.head_dim)
            k = k.view(b, s, att.n_local_heads, att.head_dim)
            v = v.view(b, s, att.n_local_heads, att.head_dim)
            if att.attention_qk_norm:
                q, k = att.q_norm(q), att.k_norm(k)
            q, k = rotary_rows(q, freqs), rotary_rows(k, freqs)
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            if isinstance(write, slice):  # the shared prefix: computed once (b = 1), written into every row
                kc, vc = self._k[index][rows], self._v[index][rows]
                kc[:, :, write] = k
                vc[:, :, write] = v
                kc, vc = kc[:1, :, :k_len], vc[:1, :, :k_len]
            else:
                shape = (-1, *self._k[index].shape[2:])
                self._k[index].view(shape)[heads, write] = k
                self._v[index].view(shape)[heads, write] = v
                # decode (a slice of rows): a view of the filled slots; text prefill (row ids): a copy of them
                kc, vc = self._k[index][rows, :, :k_len], self._v[index][rows, :, :k_len]
            y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask,
                                               enable_gqa=att.n_head != att.n_local_heads)
            y = y.transpose(1, 2).contiguous().view(b, s, q_size)
            h = x + att.wo(y)
            x = h + layer.feed_forward(layer.ffn_norm(h))
        if x.size(1) > 1:
            x = x[:, -1:]
        slow = model.norm(x)
        logits = F.linear(slow, model.embeddings.weight) if cfg.tie_word_embeddings else model.output(slow)
        return logits, model.fast_project_in(x)
