"""The model-facing math of batched decoding (fishmp.engines.batched): the session's own KV cache, the slow forward
with per-row RoPE positions and a (B, 1, Q, K) mask over the filled slots only, the fast transformer and the sampling
of a frame for B rows (the sampler itself: fishmp.engines.sampling).

fish-speech's Attention repeat_interleaves the whole preallocated cache every layer, every step, and attends over all
max_seq_len slots; `forward_rows` attends over the first K slots only (GQA inside SDPA, `enable_gqa`), K = the
furthest slot any row reads. fish-speech's weights and modules are used as they are (no fork).

Static shapes for torch.compile / CUDA graphs (FISH_COMPILE, fishmp.engines.batched_compile): a decode step pads its
rows to a batch bucket (2, 4, ... capacity) with dummy rows (fed token 0, attending slot 0 only, writing the scratch
slot max_seq_len - 1 of their own cache row, their outputs dropped) and its attention length to a multiple of
LENGTH_BUCKET slots (the extra slots masked), so only a few shapes ever reach the compiled step. Masked slots and dummy
rows cannot change a real row's values: a masked slot's weight is exactly 0 (every cached K/V is finite) and rows never
mix in a matmul.
"""

from __future__ import annotations

import math
from typing import Any

from .sampling import frame_noise, sample_params

LENGTH_BUCKET = 256  # attention-length bucket (slots) of a compiled decode step
FAST_CODEBOOK_VOCAB = 1024  # decode_one_token_ar cuts the fast logits to this many codes


def batch_bucket(n: int, capacity: int) -> int:
    """The smallest power of two >= max(n, 2), capped at capacity (capacity itself is always a bucket). Never 1
    when capacity allows 2: torch specialises size-1 dims, so batch 1 would cost a compiled graph of its own."""
    return min(1 << max(n - 1, 1).bit_length(), capacity)


def bucket_rows(capacity: int) -> int:
    """Cache rows a bucketed step may touch: a session of one row steps two (one dummy), never batch 1."""
    return max(capacity, 2)


def mark_static(tensors: list[Any], device: Any) -> None:
    """On CUDA, tell torch.compile these tensors (KV caches the compiled steps mutate in place) keep a fixed address:
    CUDA graphs then record them as they are instead of copying them in or skipping the graph."""
    if str(device).startswith("cuda"):
        import torch

        for t in tensors:
            torch._dynamo.mark_static_address(t)


def to_device(data: Any, device: Any, dtype: Any = None) -> Any:
    """torch.tensor(data) on `device` without waiting: on CUDA a tensor built on the device from a Python list is a
    blocking copy that first waits for every queued kernel (the host could not queue the next ops meanwhile); from
    pinned memory the copy is queued like a kernel (the caching host allocator keeps the buffer until it is done)."""
    import torch

    if str(device).startswith("cuda"):
        return torch.tensor(data, dtype=dtype, pin_memory=True).to(device, non_blocking=True)
    return torch.tensor(data, dtype=dtype, device=device)


def length_bucket(n: int, limit: int) -> int:
    """n slots rounded up to a multiple of LENGTH_BUCKET, capped at limit."""
    return min(-(-n // LENGTH_BUCKET) * LENGTH_BUCKET, limit)


def rotary_rows(x: Any, freqs: Any) -> Any:
    """apply_rotary_emb with per-row positions: x (b, Q, H, D), freqs (b, Q, D/2, 2) (the bf16 table's rows)."""
    import torch

    xs = x.float().reshape(*x.shape[:-1], -1, 2)
    f = freqs.view(xs.size(0), xs.size(1), 1, xs.size(3), 2)
    out = torch.stack([xs[..., 0] * f[..., 0] - xs[..., 1] * f[..., 1],
                       xs[..., 1] * f[..., 0] + xs[..., 0] * f[..., 1]], -1)
    return out.flatten(3).type_as(x)


def qkv_heads(att: Any, h_in: Any) -> tuple[Any, Any, Any]:
    """A layer's q, k, v as upstream's Attention.forward computes them, (b, s, heads, head_dim) each, qk-normed when
    the checkpoint says so; shared by the slow and the fast forward."""
    b, s, _ = h_in.shape
    q_size, kv_size = att.n_head * att.head_dim, att.n_local_heads * att.head_dim
    q, k, v = att.wqkv(h_in).split([q_size, kv_size, kv_size], dim=-1)
    q = q.view(b, s, att.n_head, att.head_dim)
    k = k.view(b, s, att.n_local_heads, att.head_dim)
    v = v.view(b, s, att.n_local_heads, att.head_dim)
    if att.attention_qk_norm:
        q, k = att.q_norm(q), att.k_norm(k)
    return q, k, v


def layer_rows(layer: Any, kcache: Any, vcache: Any, x: Any, freqs: Any, write: Any, mask: Any, k_len: int,
               rows: Any = None) -> Any:
    """One slow-transformer layer for b rows against its cache (capacity, H_kv, max_seq_len, D). The K/V of x go
    to cache[write] (write = (row, head, slot) index tensors broadcasting to (b, H_kv, Q)), or with `write` a slot
    slice (a speaker prefix, b = 1) into every row of the `rows` slice. Attention reads the first k_len slots of
    the first b rows (rows None: a decode step, a view) or of the `rows` ids (text prefill, a copy).
    Under FISH_COMPILE this is the unit compiled (regional compilation): every layer has the same code and shapes,
    so one graph serves all of them and compiling costs one layer, not the whole unrolled model."""
    import torch.nn.functional as F

    att = layer.attention
    q, k, v = qkv_heads(att, layer.attention_norm(x))
    b, s, q_size = x.shape[0], x.shape[1], att.n_head * att.head_dim
    q, k = rotary_rows(q, freqs), rotary_rows(k, freqs)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    if isinstance(write, slice):  # a speaker prefix: computed once (b = 1), alone in its own cache
        kc, vc = kcache[rows], vcache[rows]
        kc[:, :, write] = k
        vc[:, :, write] = v
        kc, vc = kc[:1, :, :k_len], vc[:1, :, :k_len]
    else:
        # indexed on the cache itself, not a view of it: inductor then updates it in place (through a view it
        # copied the whole cache twice per layer and step)
        kcache[write] = k
        vcache[write] = v
        if rows is None:
            kc, vc = kcache[:b, :, :k_len], vcache[:b, :, :k_len]
        else:
            kc, vc = kcache[rows, :, :k_len], vcache[rows, :, :k_len]
    y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=att.n_head != att.n_local_heads)
    y = y.transpose(1, 2).contiguous().view(b, s, q_size)
    h = x + att.wo(y)
    return h + layer.feed_forward(layer.ffn_norm(h))


def forward_rows(model: Any, ks: list[Any], vs: list[Any], inp: Any, rows: Any, positions: Any, write: Any,
                 mask: Any, k_len: int, layer_step: Any = layer_rows) -> tuple[Any, Any]:
    """forward_generate for rows of the caches ks / vs (one (capacity, H_kv, max_seq_len, D) tensor per layer):
    inp (b, 11, Q), rows a slice (the first b rows, or the one row of a prefix) or (b,) row ids, positions (b, Q),
    write = a slot slice (a speaker prefix: b = 1 broadcast into every row of the `rows` slice) or (b, Q) slots,
    mask (b|1, 1, Q, K). Returns last-column logits (b, 1, V) and fast-projected hidden (b, 1, fast).
    `layer_step` runs each layer (layer_rows, or its compiled version in a decode step)."""
    import torch
    import torch.nn.functional as F

    cfg, tok = model.config, model.tokenizer
    device = inp.device
    embeds = [model.codebook_embeddings(inp[:, i + 1] + i * cfg.codebook_size) for i in range(cfg.num_codebooks)]
    vq_sum = torch.stack(embeds, dim=1).sum(dim=1)
    vq_masks = (inp[:, 0] >= tok.semantic_begin_id) & (inp[:, 0] <= tok.semantic_end_id)
    vq_sum = torch.where(vq_masks[..., None], vq_sum, 0)  # upstream: vq_sum[~vq_masks] = 0 (same values, no sync)
    x = model.embeddings(inp[:, 0]) + vq_sum
    if cfg.scale_codebook_embeddings:
        x = torch.where(vq_masks.unsqueeze(-1).expand_as(x), x / math.sqrt(cfg.num_codebooks + 1), x)
    freqs = model.freqs_cis[positions]  # (b, Q, D/2, 2), the bf16 table as upstream
    read = rows
    if not isinstance(write, slice):
        ids = torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice) else rows
        heads = torch.arange(cfg.n_local_heads, device=device)
        write = (ids[:, None, None], heads[None, :, None], write[:, None, :])  # (b, 1, 1), (1, H, 1), (b, 1, Q)
        read = None if isinstance(rows, slice) else rows  # decode: rows [0, b), read as a view
    for layer, kcache, vcache in zip(model.layers, ks, vs, strict=True):
        x = layer_step(layer, kcache, vcache, x, freqs, write, mask, k_len, read)
    if x.size(1) > 1:
        x = x[:, -1:]
    slow = model.norm(x)
    logits = F.linear(slow, model.embeddings.weight) if cfg.tie_word_embeddings else model.output(slow)
    return logits, model.fast_project_in(x)


def fast_rows(model: Any, fk: list[Any], fv: list[Any], x: Any, input_pos: Any) -> Any:
    """forward_generate_fast for b rows with the fast KV caches passed in ((b, H, num_codebooks, D) per fast layer)
    instead of the layers' KVCache modules: upstream's ops in upstream's order (bit-identical), as a pure function
    that FISH_COMPILE compiles once per engine."""
    import torch.nn.functional as F
    from fish_speech.models.text2semantic.llama import apply_rotary_emb

    cfg = model.config
    x = x.view(x.shape[0], 1, -1)
    mask = model.causal_mask[None, None, input_pos, : cfg.num_codebooks]
    freqs = model.fast_freqs_cis[input_pos]
    for layer, kc, vc in zip(model.fast_layers, fk, fv, strict=True):
        att = layer.attention
        q, k, v = qkv_heads(att, layer.attention_norm(x))
        b, s, q_size = x.shape[0], x.shape[1], att.n_head * att.head_dim
        q, k = apply_rotary_emb(q, freqs), apply_rotary_emb(k, freqs)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        kc[:, :, input_pos] = k
        vc[:, :, input_pos] = v
        k = kc.repeat_interleave(att.n_head // att.n_local_heads, dim=1)
        v = vc.repeat_interleave(att.n_head // att.n_local_heads, dim=1)
        if att.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        else:
            y = att.eq_scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0)
        y = y.transpose(1, 2).contiguous().view(b, s, q_size)
        h = x + att.wo(y)
        x = h + layer.feed_forward(layer.ffn_norm(h))
    return model.fast_output(model.fast_norm(x))


def decode_rows(model: Any, ks: list[Any], vs: list[Any], inp: Any, slots: Any, write: Any, mask: Any,
                k_len: int, layer_step: Any = layer_rows) -> tuple[Any, Any]:
    """One decode step of rows [0, b) (b = inp's rows); FISH_COMPILE passes the compiled layer_rows."""
    return forward_rows(model, ks, vs, inp, slice(0, inp.shape[0]), slots, write, mask, k_len, layer_step)


def main_draw(model: Any, logits: Any, params: Any, previous: Any, keys: Any, frames: Any,
              codebooks: Any) -> tuple[Any, Any, Any, Any]:
    """The main token of b rows (logits (b, V), previous (b, 11) or None) and what the fast codebooks start from:
    (main, codebook 0 = main - semantic_begin_id clamped at 0, its fast embedding, the fast codebooks' noise
    (C - 1, b, 1024)). FISH_COMPILE compiles it (sampling in the graph: no graph break, no host sync)."""
    import torch

    main_noise, fast_noise = frame_noise(keys, frames, codebooks, logits.shape[-1], FAST_CODEBOOK_VOCAB)
    main = sample_params(logits, params, previous, main_noise)
    a = torch.clamp(main - model.tokenizer.semantic_begin_id, min=0)  # upstream: a[a < 0] = 0
    return main, a, model.fast_embeddings(a), fast_noise


def fast_draw(model: Any, fk: list[Any], fv: list[Any], h: Any, pos: Any, params: Any, previous: Any,
              noise: Any) -> tuple[Any, Any]:
    """One fast codebook for b rows: the fast transformer at position `pos` on h (b, fast_dim), its draw from the
    first 1024 logits (previous (b, W) or None, noise (b, 1024)), and the next input (the draw's embedding)."""
    logits = fast_rows(model, fk, fv, h, pos)
    a = sample_params(logits[:, -1, :FAST_CODEBOOK_VOCAB], params, previous, noise)
    return a, model.fast_embeddings(a)


class BatchedModel:
    """A KV cache of `capacity` rows over a loaded fish-speech DualARTransformer, and the forwards that use it.

    `compiled` = (decode step, fast step, main draw, fast draw): decode_rows over a compiled layer_rows, and
    compiled fast_rows, main_draw and fast_draw (few shapes: batch and length buckets), else eager; `bucketed` pads
    eager steps the same way (to test that padding never changes a real row). `caches` = (K, V, fast caches by
    batch size) kept by the engine for compiled sessions."""

    def __init__(self, model: Any, device: Any, dtype: Any, capacity: int, max_seq_len: int,
                 compiled: tuple[Any, Any, Any, Any] | None = None, bucketed: bool = False,
                 caches: tuple[list[Any], list[Any], dict[int, Any]] | None = None) -> None:
        import torch

        self.model, self.device, self.dtype = model, device, dtype
        self.capacity, self.max_seq_len = capacity, max_seq_len
        self.bucketed = bucketed or compiled is not None
        self.rows = bucket_rows(capacity) if self.bucketed else capacity
        self._decode, self._fast, self._main_draw, self._fast_draw = compiled or (decode_rows, fast_rows, main_draw,
                                                                                  fast_draw)
        self.compiled = compiled is not None
        cfg = model.config
        if caches is None:
            shape = (self.rows, cfg.n_local_heads, max_seq_len, cfg.head_dim)
            with torch.device(device):
                caches = ([torch.zeros(shape, dtype=dtype) for _ in model.layers],
                          [torch.zeros(shape, dtype=dtype) for _ in model.layers])
            if self.compiled:  # a second open compiled session (the engine's kept caches are taken)
                mark_static(caches[0] + caches[1], device)
        self.k, self.v, self._fast_caches = caches if len(caches) == 3 else (*caches, {})
        self.scratch = max_seq_len - 1  # the slot masked rows write (never read: a real row's slot stays below it)
        # The fast step's position per codebook, made once: a tensor built from a list per call is a blocking
        # host-to-device copy, which on CUDA waits for every queued kernel (10 per decode step)
        with torch.device(device):
            self._codebook_pos = [torch.tensor([i], dtype=torch.long) for i in range(cfg.num_codebooks)]
            self._codebooks = torch.arange(cfg.num_codebooks)  # the draws of a frame (main token, codebooks 1-9)

    def close(self) -> None:
        self.k = self.v = []
        self._fast_caches = {}

    def copy_prefix(self, row_ids: list[int], k: tuple[Any, ...], v: tuple[Any, ...]) -> None:
        """Write a speaker prefix's KV (per layer (H_kv, P, D), prefill_prefix's) into slots [0, P) of these rows."""
        ids = to_device(row_ids, self.device)
        p = k[0].shape[1]
        for kc, vc, pk, pv in zip(self.k, self.v, k, v, strict=True):
            kc[ids, :, :p] = pk
            vc[ids, :, :p] = pv

    def prefill_texts(self, texts: list[Any], row_ids: list[int], starts: list[int]) -> tuple[Any, Any]:
        """Prefill each row's text (11, n) after its own speaker prefix (slots starts[j].. ) in one forward. Texts
        are right-aligned so every row's last token is the last column; pad columns write the scratch slot and
        attend slot 0 only (finite, never read by a real row)."""
        import torch

        dev = self.device
        width = max(t.shape[1] for t in texts)
        inp = torch.zeros((len(texts), texts[0].shape[0], width), dtype=torch.long)
        for j, t in enumerate(texts):
            inp[j, :, width - t.shape[1]:] = t
        pad = to_device([width - t.shape[1] for t in texts], dev)
        start = to_device(starts, dev)
        col = torch.arange(width, device=dev)
        real = col[None, :] >= pad[:, None]
        positions = torch.where(real, start[:, None] + col[None, :] - pad[:, None], 0)
        write = torch.where(real, positions, self.scratch)
        k_len = max(s + t.shape[1] for s, t in zip(starts, texts, strict=True))
        slots = torch.arange(k_len, device=dev)
        mask = torch.where(real[:, :, None], slots[None, None, :] <= positions[:, :, None], slots[None, None, :] == 0)
        return forward_rows(self.model, self.k, self.v, inp.to(dev), to_device(row_ids, dev), positions,
                            write, mask[:, None], k_len)

    def step_rows(self, hi: int) -> int:
        """Rows a decode step of rows [0, hi) runs: hi, or its batch bucket (the extra rows are dummies)."""
        return batch_bucket(hi, self.rows) if self.bucketed else hi

    def decode(self, tokens: Any, slots: Any, live: Any, k_len: int) -> tuple[Any, Any]:
        """One decode step of rows [0, b): tokens (b, 11) are fed at each live row's slot (b,); rows not live are
        masked (token 0, writing the scratch slot; their outputs are meaningless). k_len: the furthest slot a live
        row reads + 1 (a host int: it sets the shapes). Returns logits (b, 1, V) and hidden (b, 1, fast)."""
        import torch

        dev = self.device
        if self.bucketed:
            k_len = length_bucket(k_len, self.max_seq_len)
        inp = torch.where(live[:, None], tokens, 0)[:, :, None]
        write = torch.where(live, slots, self.scratch)
        mask = (torch.arange(k_len, device=dev)[None, :] <= slots[:, None])[:, None, None, :]
        if self.compiled and dev.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed: replay may reuse them
            # CUDA graph outputs live in the graphs' pool until the next step: copied out, as the fast steps follow
            return tuple(t.clone() for t in self._decode(self.model, self.k, self.v, inp, slots[:, None],
                                                          write[:, None], mask, k_len))
        return self._decode(self.model, self.k, self.v, inp, slots[:, None], write[:, None], mask, k_len)

    def warm_up(self) -> None:
        """Compile ahead (FISH_COMPILE traces on first use, which no segment's deadline should absorb): dummy steps
        (every row masked, writing only the scratch slot) at two batch buckets and attention lengths, which compile
        the static graph and the dynamic one every later shape reuses."""
        import torch

        dev, cfg = self.device, self.model.config
        shapes = [(2, LENGTH_BUCKET), (4, 2 * LENGTH_BUCKET)]
        with torch.inference_mode():
            for b, k_len in shapes:
                b, k_len = min(b, self.rows), min(k_len, self.max_seq_len)
                inp = torch.zeros((b, cfg.num_codebooks + 1, 1), dtype=torch.long, device=dev)
                slots = torch.zeros((b, 1), dtype=torch.long, device=dev)
                mask = (torch.arange(k_len, device=dev) == 0)[None, None, None, :].expand(b, 1, 1, k_len)
                if self.compiled and dev.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                logits, hidden = self._decode(self.model, self.k, self.v, inp, slots, slots + self.scratch,
                                              mask.contiguous(), k_len)
                window = torch.zeros((b, cfg.num_codebooks + 1, 16), dtype=torch.long, device=dev)
                self.sample_frame(logits.clone(), hidden.clone(), torch.ones((b, 3), dtype=torch.bfloat16, device=dev),
                                  slots[:, 0], slots[:, 0], window)

    def sample_frame(self, logits: Any, hidden: Any, params: Any, keys: Any, frames: Any,
                     window: Any | None) -> Any:
        """decode_one_token_ar after forward_generate, for b rows at once: (b, 11) long. params (b, 3) bf16
        (temperature, top_p, repetition penalty), keys (b,) the rows' chunk keys, frames (b,) the frame index of
        this draw (fishmp.engines.sampling), window (b, 11, W) the penalty window or None (the prefill's frame).
        Every row is sampled (free and dummy rows too: their tokens are meaningless), so nothing here depends on
        which rows are live. A prefill's rows are padded to their batch bucket when bucketed, so the fast step
        sees bucketed shapes only; the result keeps the padded rows."""
        import torch

        model = self.model
        if self.bucketed and batch_bucket(logits.shape[0], self.rows) > logits.shape[0]:
            extra = batch_bucket(logits.shape[0], self.rows) - logits.shape[0]

            def pad(t: Any) -> Any:
                return torch.cat([t, t.new_zeros((extra, *t.shape[1:]))])

            logits, hidden, params, keys, frames = (pad(t) for t in (logits, hidden, params, keys, frames))
        # the decode steps' draws run compiled under FISH_COMPILE; a prefill's (no window) eager: one graph each
        compiled = self.compiled and window is not None
        main_step, fast_step = (self._main_draw, self._fast_draw) if compiled else (main_draw, fast_draw)
        fk, fv = self._fast_cache(logits.shape[0])
        for t in fk + fv:  # decode_one_token_ar zeroes the fast cache every step
            t.zero_()
        previous = window[:, :, 0].contiguous() if window is not None else None
        main, a, h, fast_noise = self._call(compiled, main_step, model, logits[:, -1].contiguous(), params, previous,
                                            keys, frames, self._codebooks)
        codes = [main, a]
        self._fast_step(hidden, fk, fv, 0)  # position 0: the slow transformer's hidden state (logits unused)
        for c in range(1, model.config.num_codebooks):
            previous = window[:, c + 1].contiguous() if window is not None else None
            a, h = self._call(compiled, fast_step, model, fk, fv, h, self._codebook_pos[c], params, previous,
                              fast_noise[c - 1])
            codes.append(a)
        return torch.stack(codes, dim=1)

    def _call(self, compiled: bool, fn: Any, *args: Any) -> Any:
        """fn(*args); a compiled fn on CUDA replays CUDA graphs, whose outputs live in the graphs' pool until the
        next replay: they are copied out."""
        if not (compiled and self.device.type == "cuda"):
            return fn(*args)
        import torch

        torch.compiler.cudagraph_mark_step_begin()
        return tuple(t.clone() for t in fn(*args))

    def _fast_step(self, x: Any, fk: list[Any], fv: list[Any], codebook: int) -> Any:
        import torch

        pos = self._codebook_pos[codebook]
        x = x.reshape(x.shape[0], 1, -1)
        if not self.compiled:
            return self._fast(self.model, fk, fv, x, pos)
        x = x.clone(memory_format=torch.contiguous_format)  # one rank and layout (offset 0) every call: no recompiles
        if self.device.type != "cuda":
            return self._fast(self.model, fk, fv, x, pos)
        torch.compiler.cudagraph_mark_step_begin()
        return self._fast(self.model, fk, fv, x, pos).clone()  # out of the CUDA graphs' pool before the next replay

    def _fast_cache(self, b: int) -> tuple[list[Any], list[Any]]:
        """Fast-transformer KV caches for b rows: (b, H, num_codebooks, D) per fast layer (a compiled session's are
        the engine's, at fixed addresses for CUDA graphs)."""
        if b not in self._fast_caches:
            import torch

            cfg = self.model.config
            shape = (b, cfg.fast_n_local_heads, cfg.num_codebooks, cfg.fast_head_dim)
            with torch.device(self.device):
                fk = [torch.zeros(shape, dtype=self.dtype) for _ in self.model.fast_layers]
                fv = [torch.zeros(shape, dtype=self.dtype) for _ in self.model.fast_layers]
            if self.compiled:
                mark_static(fk + fv, self.device)
            self._fast_caches[b] = (fk, fv)
        return self._fast_caches[b]
