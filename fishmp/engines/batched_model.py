"""The model-facing math of batched decoding (fishmp.engines.batched): the session's own KV cache, the slow forward
with per-row RoPE positions and a (B, 1, Q, K) mask over the filled slots only, and fish-speech's sampling for B rows.

fish-speech's Attention repeat_interleaves the whole preallocated cache every layer, every step, and attends over all
max_seq_len slots; `forward_rows` attends over the first K slots only (GQA inside SDPA, `enable_gqa`), K = the
furthest slot any row reads. fish-speech's weights and modules are used as they are (no fork).

Static shapes for torch.compile / CUDA graphs (FISH_COMPILE): a decode step pads its rows to a batch bucket (1, 2, 4,
... capacity) with dummy rows (fed token 0, attending slot 0 only, writing the scratch slot max_seq_len - 1 of their
own cache row, their outputs dropped) and its attention length to a multiple of LENGTH_BUCKET slots (the extra slots
masked), so only a few shapes ever reach the compiled step. Masked slots and dummy rows cannot change a real row's
values: a masked slot's weight is exactly 0 (every cached K/V is finite) and rows never mix in a matmul.
"""

from __future__ import annotations

import math
from typing import Any

LENGTH_BUCKET = 256  # attention-length bucket (slots) of a compiled decode step
FAST_CODEBOOK_VOCAB = 1024  # decode_one_token_ar cuts the fast logits to this many codes


def batch_bucket(n: int, capacity: int) -> int:
    """The smallest power of two >= n, capped at capacity (capacity itself is always a bucket)."""
    return min(1 << max(n - 1, 0).bit_length(), capacity)


def length_bucket(n: int, limit: int) -> int:
    """n slots rounded up to a multiple of LENGTH_BUCKET, capped at limit."""
    return min(-(-n // LENGTH_BUCKET) * LENGTH_BUCKET, limit)


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


def forward_rows(model: Any, ks: list[Any], vs: list[Any], inp: Any, rows: Any, positions: Any, write: Any,
                 mask: Any, k_len: int) -> tuple[Any, Any]:
    """forward_generate for rows of the caches ks / vs (one (capacity, H_kv, max_seq_len, D) tensor per layer):
    inp (b, 11, Q), rows a slice or (b,) row ids, positions (b, Q), write = a slot slice (the shared prefix: b = 1
    broadcast into every row of the `rows` slice) or (b, Q) slots, mask (b|1, 1, Q, K). Returns last-column logits
    (b, 1, V) and fast-projected hidden (b, 1, fast). A pure function of its arguments, so one compiled version
    serves every session of an engine (torch.compile guards on the tensors' shapes, not on who owns them)."""
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
    if not isinstance(write, slice):
        # Cache rows x heads flattened, so the write is one index_put with two adjacent leading indices.
        ids = torch.arange(rows.start, rows.stop, device=device) if isinstance(rows, slice) else rows
        n_kv = cfg.n_local_heads
        heads = (ids[:, None] * n_kv + torch.arange(n_kv, device=device)[None, :])[:, :, None]
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
            kc, vc = ks[index][rows], vs[index][rows]
            kc[:, :, write] = k
            vc[:, :, write] = v
            kc, vc = kc[:1, :, :k_len], vc[:1, :, :k_len]
        else:
            shape = (-1, *ks[index].shape[2:])
            ks[index].view(shape)[heads, write] = k
            vs[index].view(shape)[heads, write] = v
            # decode (a slice of rows): a view of the filled slots; text prefill (row ids): a copy of them
            kc, vc = ks[index][rows, :, :k_len], vs[index][rows, :, :k_len]
        y = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask, enable_gqa=att.n_head != att.n_local_heads)
        y = y.transpose(1, 2).contiguous().view(b, s, q_size)
        h = x + att.wo(y)
        x = h + layer.feed_forward(layer.ffn_norm(h))
    if x.size(1) > 1:
        x = x[:, -1:]
    slow = model.norm(x)
    logits = F.linear(slow, model.embeddings.weight) if cfg.tie_word_embeddings else model.output(slow)
    return logits, model.fast_project_in(x)


def decode_rows(model: Any, ks: list[Any], vs: list[Any], inp: Any, slots: Any, write: Any, mask: Any,
                k_len: int) -> tuple[Any, Any]:
    """One decode step of rows [0, b) (b = inp's rows): the function FISH_COMPILE compiles."""
    return forward_rows(model, ks, vs, inp, slice(0, inp.shape[0]), slots, write, mask, k_len)


class BatchedModel:
    """A KV cache of `capacity` rows over a loaded fish-speech DualARTransformer, and the forwards that use it.

    `decode` is the compiled function when one is given (static shapes: batch and length buckets), else eager;
    `bucketed` pads eager steps the same way (to test that padding never changes a real row)."""

    def __init__(self, model: Any, device: Any, dtype: Any, capacity: int, max_seq_len: int,
                 decode: Any = None, bucketed: bool = False, caches: tuple[list[Any], list[Any]] | None = None
                 ) -> None:
        import torch

        self.model, self.device, self.dtype = model, device, dtype
        self.capacity, self.max_seq_len = capacity, max_seq_len
        self.bucketed = bucketed or decode is not None
        self._decode = decode or decode_rows
        self.compiled = decode is not None
        cfg = model.config
        if caches is None:
            shape = (capacity, cfg.n_local_heads, max_seq_len, cfg.head_dim)
            with torch.device(device):
                caches = ([torch.zeros(shape, dtype=dtype) for _ in model.layers],
                          [torch.zeros(shape, dtype=dtype) for _ in model.layers])
        self.k, self.v = caches
        self._fast_caches: dict[int, list[Any]] = {}
        self.scratch = max_seq_len - 1  # the slot masked rows write (never read: a real row's slot stays below it)

    def close(self) -> None:
        self.k = self.v = []
        self._fast_caches = {}

    def prefill_prefix(self, prefix: Any) -> None:
        """Run the shared prefix (11, P) at slots [0, P) once and write it into every row."""
        import torch

        q = prefix.shape[1]
        positions = torch.arange(q, device=self.device)[None, :]
        mask = (positions[0][None, :] <= positions[0][:, None])[None, None]
        forward_rows(self.model, self.k, self.v, prefix[None].to(self.device), slice(0, self.capacity), positions,
                     slice(0, q), mask, q)

    def prefill_texts(self, texts: list[Any], row_ids: list[int], start: int) -> tuple[Any, Any]:
        """Prefill each row's text (11, n) after the shared prefix (slots start.. ) in one forward. Texts are
        right-aligned so every row's last token is the last column; pad columns write the scratch slot and attend
        slot 0 only (finite, never read by a real row)."""
        import torch

        dev = self.device
        width = max(t.shape[1] for t in texts)
        inp = torch.zeros((len(texts), texts[0].shape[0], width), dtype=torch.long)
        for j, t in enumerate(texts):
            inp[j, :, width - t.shape[1]:] = t
        pad = torch.tensor([width - t.shape[1] for t in texts], device=dev)
        col = torch.arange(width, device=dev)
        real = col[None, :] >= pad[:, None]
        positions = torch.where(real, start + col[None, :] - pad[:, None], 0)
        write = torch.where(real, positions, self.scratch)
        k_len = start + max(t.shape[1] for t in texts)
        slots = torch.arange(k_len, device=dev)
        mask = torch.where(real[:, :, None], slots[None, None, :] <= positions[:, :, None], slots[None, None, :] == 0)
        return forward_rows(self.model, self.k, self.v, inp.to(dev), torch.tensor(row_ids, device=dev), positions,
                            write, mask[:, None], k_len)

    def decode(self, tokens: Any, slots: list[int], active: list[bool]) -> tuple[Any, Any]:
        """One decode step of rows [0, len(slots)): tokens (hi, 11) are fed at each active row's slot; inactive rows
        are masked (their outputs are meaningless). Returns logits (hi, 1, V) and hidden (hi, 1, fast)."""
        import torch

        hi, dev = len(slots), self.device
        k_len = max(s for s, a in zip(slots, active, strict=True) if a) + 1
        b = hi
        if self.bucketed:
            b, k_len = batch_bucket(hi, self.capacity), length_bucket(k_len, self.max_seq_len)
            slots, active = slots + [0] * (b - hi), active + [False] * (b - hi)
        live = torch.tensor(active, device=dev)
        slot_t = torch.tensor(slots, device=dev)
        inp = torch.zeros((b, tokens.shape[1]), dtype=torch.long, device=dev)
        inp[:hi] = tokens
        inp = torch.where(live[:, None], inp, 0)[:, :, None]
        write = torch.where(live, slot_t, self.scratch)
        mask = (torch.arange(k_len, device=dev)[None, :] <= slot_t[:, None])[:, None, None, :]
        if self.compiled and dev.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # the last step's outputs are consumed: replay may reuse them
        logits, hidden = self._decode(self.model, self.k, self.v, inp, slot_t[:, None], write[:, None], mask, k_len)
        return logits[:hi], hidden[:hi]

    def sample_frame(self, logits: Any, hidden: Any, params: tuple[Any, Any, Any], generators: list[Any | None],
                     window: Any | None) -> Any:
        """decode_one_token_ar after forward_generate, for b rows: (b, 11) long. Rows whose generator is None (free
        or dummy rows) draw nothing; their tokens are 0 or meaningless."""
        import torch

        model, dev = self.model, self.device
        b = logits.shape[0]
        live = [i for i, g in enumerate(generators) if g is not None]
        sel = torch.tensor(live, device=dev)
        live_params = tuple(x[sel] for x in params)
        gens = [generators[i] for i in live]
        out = torch.zeros((b, model.config.num_codebooks + 1), dtype=torch.long, device=dev)

        def draw(lg: Any, prev: Any | None) -> Any:
            res = torch.zeros(b, dtype=torch.long, device=dev)
            res[sel] = sample_rows(lg[sel], *live_params, prev[sel] if prev is not None else None, gens)
            return res

        main = draw(logits[:, -1], window[:, :, 0] if window is not None else None)
        out[:, 0] = main
        saved = [layer.attention.kv_cache for layer in model.fast_layers]
        try:
            for layer, cache in zip(model.fast_layers, self._fast_cache(b), strict=True):
                layer.attention.kv_cache = cache
                cache.k_cache.zero_()
                cache.v_cache.zero_()
            model.forward_generate_fast(hidden, torch.tensor([0], device=dev, dtype=torch.long))
            a = main - model.tokenizer.semantic_begin_id
            a[a < 0] = 0
            out[:, 1] = a
            h = model.fast_embeddings(a)
            for cb in range(1, model.config.num_codebooks):
                fast_logits = model.forward_generate_fast(h, torch.tensor([cb], device=dev, dtype=torch.long))
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
            from fish_speech.models.text2semantic.llama import KVCache

            cfg = self.model.config
            with torch.device(self.device):
                self._fast_caches[b] = [KVCache(b, cfg.num_codebooks, cfg.fast_n_local_heads, cfg.fast_head_dim,
                                                dtype=self.dtype) for _ in self.model.fast_layers]
        return self._fast_caches[b]
