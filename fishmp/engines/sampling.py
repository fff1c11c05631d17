"""Sampling for batched decoding: fish-speech's top-p / temperature / repetition-penalty sampler for B rows at once,
with counter-based noise instead of a torch RNG.

fish-speech samples a token as `argmax(probs / q)` with q ~ Exp(1) drawn from the global RNG over the whole
vocabulary (`multinomial_sample_one_no_sync`): the exponential race, an exact draw from `probs`. Here q comes from
a hash: the noise of vocabulary index i for a row at (seed, text chunk, frame, codebook) is a pure function of those
five numbers (`row_key`, `draw_code`, `exponential`). So
- a row's tokens never depend on its batchmates, the batch size, their order or refill (nothing is shared: no
  generator state advances with the rows around it);
- the whole batch's noise is one elementwise computation in tensor ops (no torch.Generator per row, no Python loop
  over rows), which torch.compile fuses into one kernel and a CUDA graph can capture;
- the integer hash is exact on every device (64-bit integer ops on values below 2^32: products stay below 2^59),
  and the uniform built from its top 23 bits is exact in float32 and strictly inside (0, 1); only `-log(u)` is a
  float op (a device's log may round differently in the last bit, which changes a draw only on an exact tie).
It does not reproduce fish-speech's RNG draws (nothing could, batch-invariantly), so tests feed fish-speech's own
generate the same noise to prove the model math equal, and check the sampler's distribution statistically.
"""

from __future__ import annotations

from typing import Any

M32 = 0xFFFFFFFF
_MUL = 0x45D9F3B  # the 32-bit integer hash of Thomas Mueller (good avalanche; < 2^31, so x * _MUL < 2^59)
_SEED_SALT, _CODEBOOK_SALT, _INDEX_SALT = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


def mix32(x: Any) -> Any:
    """A bijective 32-bit hash of x in [0, 2^32): Python ints and int64 tensors alike (same values)."""
    x = ((x >> 16) ^ x) * _MUL & M32
    x = ((x >> 16) ^ x) * _MUL & M32
    return (x >> 16) ^ x


def row_key(seed: int, chunk: int) -> int:
    """A row's key for one text chunk: its seed (any int; 64 bits of it are used) and the chunk's index."""
    s = seed & (2**64 - 1)
    return mix32(mix32(mix32((s & M32) ^ _SEED_SALT) ^ (s >> 32)) ^ (chunk & M32))


def draw_code(keys: Any, frames: Any, codebooks: Any) -> Any:
    """The code of one draw: row key x frame (0 = the prefill's frame) x codebook (0 = the main token, 1-9 the
    fast codebooks). Tensors broadcast (e.g. keys (b, 1), frames (b, 1), codebooks (C,) -> (b, C))."""
    return mix32(mix32(keys ^ frames) ^ ((codebooks + _CODEBOOK_SALT) & M32))


_INDEX_HASHES: dict[tuple[int, str], Any] = {}  # (size, device) -> mix32(arange(size) + salt), made once


def index_hashes(size: int, device: Any) -> Any:
    """mix32(i + salt) for the vocabulary indices 0..size-1: the same for every draw, so made once per size and
    device (8 tensor ops a draw less, 16 a frame: a few per cent of a batch-1 step on a CPU). Traced by
    torch.compile (FISH_COMPILE) it is computed in the graph instead: a graph constant of its own."""
    import torch

    if torch.compiler.is_compiling():
        return mix32(torch.arange(size, device=device, dtype=torch.long) + _INDEX_SALT)
    key = (size, str(device))
    if key not in _INDEX_HASHES:
        with torch.inference_mode(False):  # a normal tensor: usable inside and outside inference mode alike
            _INDEX_HASHES[key] = mix32(torch.arange(size, device=device, dtype=torch.long) + _INDEX_SALT)
    return _INDEX_HASHES[key]


def exponential(codes: Any, size: int) -> Any:
    """Exp(1) noise (..., size) float32 for draws `codes` (...) int64: vocabulary index i of a draw gets
    `noise_from_bits` of mix32(code ^ mix32(i + salt))."""
    h = codes[..., None] ^ index_hashes(size, codes.device)  # a new tensor: the cached hashes stay untouched
    for _ in range(2):  # mix32 in place: on a CPU, fresh (b, V) buffers per op cost more than the ops (2.3x)
        h ^= h >> 16
        h *= _MUL
        h &= M32
    h ^= h >> 16
    return noise_from_bits(h)


def noise_from_bits(h: Any) -> Any:
    """-log(u) float32 for 32-bit hashes h (int64 tensor, consumed in place): u = (top 23 bits + 0.5) / 2^23, so
    2^-24 <= u <= 1 - 2^-24, both exact in float32, and the noise is in (0, 16.7]. Never 0: with 24 bits the
    largest u, 1 - 2^-25, rounds to 1.0 in float32, the noise to 0, and probs / noise then gave NaN (0 / 0) for
    the tokens top-p had removed, which argmax picks: a removed token drawn about once in 600 frames."""
    import torch

    h >>= 9
    return h.to(torch.float32).add_(0.5).mul_(1.0 / 2**23).log_().neg_()


def sample_rows(logits: Any, temperature: Any, top_p: Any, penalty: Any, previous: Any | None, noise: Any) -> Any:
    """fish-speech's logits_to_probs + multinomial_sample_one_no_sync for b rows in one batch, each row with its
    own parameters. logits (b, V); temperature / top_p / penalty (b, 1) bf16 (as generate() wraps them);
    previous (b, W) or None (no penalty, the prefill's frame); noise (b, V) Exp(1). Returns (b,) long."""
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
    return torch.argmax(probs / noise.to(probs.dtype), dim=-1)  # q takes probs' dtype, as empty_like(probs) does


def frame_noise(keys: Any, frames: Any, codebooks: Any, vocab: int, fast_vocab: int) -> tuple[Any, Any]:
    """The noise of one frame for b rows: the main token's (b, vocab) and the fast codebooks' (C - 1, b,
    fast_vocab), codebook-major so each codebook's is one contiguous block. keys / frames (b,) long, codebooks (C,)
    long = 0..C-1."""
    codes = draw_code(keys[None, :], frames[None, :], codebooks[:, None])  # (C, b)
    return exponential(codes[0], vocab), exponential(codes[1:], fast_vocab)


def sample_params(logits: Any, params: Any, previous: Any | None, noise: Any) -> Any:
    """sample_rows with the rows' parameters as one (b, 3) bf16 tensor (temperature, top_p, penalty)."""
    return sample_rows(logits, params[:, 0:1], params[:, 1:2], params[:, 2:3], previous, noise)
