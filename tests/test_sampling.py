"""The counter-based sampler (fishmp/engines/sampling.py): its noise is a pure function of (seed, chunk, frame,
codebook, vocabulary index), and the tokens it draws follow fish-speech's own sampling distribution (top-p,
temperature, repetition penalty), checked statistically against fish-speech's logits_to_probs and its sampler."""

from __future__ import annotations

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from fishmp.engines.fish_common import import_fish_speech  # noqa: E402
from fishmp.engines.sampling import (  # noqa: E402
    draw_code,
    exponential,
    mix32,
    noise_from_bits,
    row_key,
    sample_rows,
)


def test_noise_depends_only_on_its_counters() -> None:
    # The hash is the same on Python ints and tensors, so a row key computed on the host matches the device's.
    xs = [0, 1, 2**31, 2**32 - 1, 123456789]
    assert mix32(torch.tensor(xs)).tolist() == [mix32(x) for x in xs]
    assert len({row_key(s, c) for s in (0, 1, -1, 2**40, 3) for c in (0, 1, 7)}) == 15
    assert row_key(5, 0) == row_key(5 + 2**64, 0)  # 64 bits of the seed are used
    keys = torch.tensor([row_key(s, c) for s, c in [(1, 0), (2, 0), (1, 1), (9, 3), (1, 0)]])
    frames = torch.tensor([0, 5, 5, 17, 0])
    batch = exponential(draw_code(keys, frames, torch.tensor([3])), 1024)
    for r in range(len(keys)):  # each row's noise is what it gets alone: batch-invariant by construction
        alone = exponential(draw_code(keys[r:r + 1], frames[r:r + 1], torch.tensor([3])), 1024)
        assert torch.equal(batch[r:r + 1], alone)
    assert torch.equal(batch[0], batch[4])  # same counters, same noise
    assert not torch.equal(batch[0], batch[2])  # another chunk
    other_cb = exponential(draw_code(keys, frames, torch.tensor([4])), 1024)
    assert not torch.equal(batch[0], other_cb[0])  # another codebook
    # Exp(1): mean 1, variance 1, strictly positive and finite; distinct values along the vocabulary
    big = exponential(draw_code(torch.tensor([row_key(s, 0) for s in range(64)]), torch.zeros(64, dtype=torch.long),
                                torch.tensor([0])), 4096)
    assert big.dtype == torch.float32 and bool(torch.isfinite(big).all()) and float(big.min()) > 0
    assert abs(float(big.mean()) - 1) < 0.01 and abs(float(big.var()) - 1) < 0.03
    assert len(torch.unique(big[0])) > 4000


def test_noise_is_never_zero_at_the_extreme_hashes() -> None:
    # The largest hashes once gave u = 1.0 in float32, noise 0, and probs / noise = NaN for every token top-p had
    # removed, which argmax then drew (about one frame in 600 on the tiny checkpoint). Every 32-bit hash around the
    # extremes must give finite noise > 0, and a removed token must never be drawn whatever the noise.
    hashes = torch.tensor([0, 1, 255, 256, 511, 512, 2**31, 2**32 - 512, 2**32 - 257, 2**32 - 256, 2**32 - 1])
    noise = noise_from_bits(hashes.clone())
    assert bool(torch.isfinite(noise).all()) and float(noise.min()) > 0 and float(noise.max()) < 17
    logits = torch.tensor([[3.0, 0.0, -1.0, 0.5]] * len(hashes))
    one = torch.ones((len(hashes), 1))
    drawn = sample_rows(logits, one, one * 1e-4, one, None, noise[:, None].expand(-1, 4).contiguous())
    assert drawn.tolist() == [0] * len(hashes)  # top_p keeps the best token alone: greedy, whatever the noise


def fish_probs(logits: torch.Tensor, params: tuple[float, float, float], previous: torch.Tensor | None) -> np.ndarray:
    inference = import_fish_speech()["inference"]
    t, p, r = (torch.tensor(x, dtype=torch.bfloat16) for x in params)  # as generate() wraps them
    return inference.logits_to_probs(logits.clone(), t, p, r, previous).double().numpy()


def chi2_ok(observed: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    """Pearson's statistic over bins with expected > 0, and a bound it stays under unless the distributions differ
    (df + 6 sd: the draws are seeded, so this is deterministic; a wrong distribution lands far above)."""
    keep = expected > 0
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    df = int(keep.sum()) - 1
    return stat, df + 6 * math.sqrt(2 * df)


@pytest.mark.parametrize("params,with_previous", [((0.7, 0.85, 1.3), True), ((1.0, 1.0, 1.0), False),
                                                  ((1.4, 0.6, 1.6), True)])
def test_sampler_distribution_matches_fish_speech(params: tuple[float, float, float], with_previous: bool) -> None:
    gen = torch.Generator().manual_seed(11)
    vocab, n = 48, 40_000
    logits = torch.randn(vocab, generator=gen)
    previous = torch.randint(0, vocab, (16,), generator=gen) if with_previous else None
    expected = fish_probs(logits, params, previous)
    # n draws: half from different seeds at frame 0, half from one seed over many frames
    keys = torch.tensor([row_key(s, 0) for s in range(n // 2)] + [row_key(7, 0)] * (n // 2))
    frames = torch.cat([torch.zeros(n // 2, dtype=torch.long), torch.arange(n // 2)])
    cols = [torch.full((n, 1), x, dtype=torch.bfloat16) for x in params]
    got = sample_rows(logits.expand(n, vocab).clone(), *cols, previous.expand(n, 16) if previous is not None else None,
                      exponential(draw_code(keys, frames, torch.tensor([0])), vocab))
    observed = np.bincount(got.numpy(), minlength=vocab).astype(float)
    assert observed[expected == 0].sum() == 0  # top-p: a removed token is never drawn
    stat, bound = chi2_ok(observed, expected * n)
    assert stat <= bound, (stat, bound)
    # ... and against fish-speech's own sampler, drawing from the global RNG (two-sample homogeneity test)
    inference = import_fish_speech()["inference"]
    t, p, r = (torch.tensor(x, dtype=torch.bfloat16) for x in params)
    m = 8_000
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        theirs = [int(inference.sample(logits.clone()[None, None], t, p, r, previous)[0]) for _ in range(m)]
    counts = np.bincount(theirs, minlength=vocab).astype(float)
    assert counts[expected == 0].sum() == 0
    pooled = (observed + counts) / (n + m)
    stat = float(sum(((o - e) ** 2 / e) for o, e in zip(np.r_[observed, counts], np.r_[pooled * n, pooled * m],
                                                          strict=True) if e > 0))
    df = int((pooled > 0).sum()) - 1
    assert stat < df + 6 * math.sqrt(2 * df), (stat, df)


def test_each_row_keeps_its_own_parameters() -> None:
    # Rows of different parameters in one batch: each follows its own distribution (no parameter leaks across rows).
    gen = torch.Generator().manual_seed(5)
    vocab, n = 32, 20_000
    logits = torch.randn(vocab, generator=gen)
    sets = [(0.5, 0.9, 1.0), (1.2, 1.0, 1.0), (0.9, 0.6, 1.0)]
    rows = torch.arange(3 * n) % 3
    params = torch.tensor(sets, dtype=torch.bfloat16)[rows]
    keys = torch.tensor([row_key(s, 0) for s in range(3 * n)])
    got = sample_rows(logits.expand(3 * n, vocab).clone(), params[:, 0:1], params[:, 1:2], params[:, 2:3], None,
                      exponential(draw_code(keys, torch.zeros(3 * n, dtype=torch.long), torch.tensor([0])), vocab))
    for k, ps in enumerate(sets):
        expected = fish_probs(logits, ps, None) * n
        observed = np.bincount(got[rows == k].numpy(), minlength=vocab).astype(float)
        assert observed[expected == 0].sum() == 0
        stat, bound = chi2_ok(observed, expected)
        assert stat <= bound, (ps, stat, bound)
