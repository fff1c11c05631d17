"""Batched decoding (fishmp.engines.batched) on the tiny checkpoint, CPU fp32: against fish-speech's own generate
(the oracle of the model math: fed the session's noise, or greedy) and against itself at batch 1.

`FishSpeechEngine.synthesize` is a session of one row (the same sampler as any batch); `synthesize_upstream` is
fish-speech's generate_long. Equal audio samples mean equal codes: the codec is deterministic on CPU, and any
differing code changes the samples.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import numpy as np
import pytest

from fishmp.config import Settings
from fishmp.engines.base import Audio, BadReferenceError, SpeakerPrompt, SynthesisParams, TextTooLongError
from fishmp.engines.fish import FishSpeechEngine

TEXTS = [
    "Hello there.",
    "A much longer sentence that goes on for a while, with commas, clauses and quite a few more words in it.",
    "Hi!",
    "Number four is here to stay, or so it says.",
    "Five.",
    "The sixth line of the job is of middling length.",
]


@pytest.fixture(scope="module")
def engine(tiny_checkpoint: str) -> Iterator[FishSpeechEngine]:
    import torch

    # One thread: the tiny model's matrices are too small to gain from more, and a busy CI machine makes spinning
    # OpenMP threads slow. Both paths under test run with the same setting.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    eng = FishSpeechEngine(Settings(checkpoint_dir=tiny_checkpoint), "cpu")
    eng.load()
    yield eng
    torch.set_num_threads(threads)


def speaker(key: str, seed: int, frames: int = 60) -> SpeakerPrompt:
    tokens = np.random.default_rng(seed).integers(0, 1024, (10, frames))
    return SpeakerPrompt(key=key, tokens=tokens, text=f"This is the voice of {key}, speaking.")


Item = tuple  # (key, text, params) in the run's voice, or (key, text, params, voice)


def run_session(engine: FishSpeechEngine, voice: SpeakerPrompt | None, items: list[Item], capacity: int,
                refill: bool = True, **kw: object) -> dict[str, Audio]:
    """Decode items through one session; refill=False waits for the whole batch before adding more."""
    session = engine.open_batch(capacity, **kw)
    pending, out = list(items), {}
    while pending or session.active():
        if refill or session.active() == 0:
            while pending and session.free_rows():
                item = pending.pop(0)
                session.add(*item) if len(item) == 4 else session.add(*item, voice)
        out.update(session.step())
    session.close()
    return out


def assert_same(ref: dict[str, Audio], got: dict[str, Audio]) -> None:
    assert sorted(got) == sorted(ref)
    for key in ref:
        assert got[key].tokens == ref[key].tokens, key
        assert np.array_equal(got[key].samples, ref[key].samples), key
        assert got[key].sample_rate == ref[key].sample_rate


def references(engine: FishSpeechEngine, voice: SpeakerPrompt | None,
               items: list[tuple[str, str, SynthesisParams]]) -> dict[str, Audio]:
    return {key: engine.synthesize(text, voice, params) for key, text, params in items}


def upstream_fed(engine: FishSpeechEngine, voice: SpeakerPrompt | None,
                 items: list[tuple[str, str, SynthesisParams]]) -> dict[str, Audio]:
    """fish-speech's own generate_long, its sampling draw fed the session's noise: fish-speech's sampler calls
    multinomial_sample_one_no_sync ten times a frame (main token, then codebooks 1-9) and generate_long once per
    text chunk, so the n-th draw of chunk c is frame n // 10, codebook n % 10 of row_key(seed, c)."""
    import torch

    from fishmp.engines.fish_common import import_fish_speech
    from fishmp.engines.sampling import draw_code, exponential, row_key

    inference = import_fish_speech()["inference"]
    state = {"seed": 0, "chunk": -1, "n": 0}
    generate = engine._generate

    def chunk(text: str, prompt: object, params: SynthesisParams) -> object:
        state["chunk"], state["n"] = state["chunk"] + 1, 0
        return generate(text, prompt, params)

    def fed(probs: torch.Tensor) -> torch.Tensor:
        n = state["n"]
        state["n"] += 1
        code = draw_code(torch.tensor(row_key(state["seed"], state["chunk"])), torch.tensor(n // 10),
                         torch.tensor(n % 10))
        q = exponential(code, probs.shape[-1]).to(probs.dtype)
        return torch.argmax(probs / q, dim=-1, keepdim=True).to(dtype=torch.int)

    out = {}
    saved = inference.multinomial_sample_one_no_sync
    inference.multinomial_sample_one_no_sync, engine._generate = fed, chunk
    try:
        for key, text, params in items:
            state.update(seed=params.seed, chunk=-1)
            out[key] = engine.synthesize_upstream(text, voice, params)
    finally:
        inference.multinomial_sample_one_no_sync = saved
        del engine._generate
    return out


def test_session_matches_fish_speech_fed_the_same_noise(engine: FishSpeechEngine) -> None:
    # The model math against fish-speech's own generate: same noise in, same codes out, at batch 1 and in batches
    # of other rows (mixed lengths and parameters, a long text split into chunks, rows refilled mid-flight).
    voice = speaker("olga", 12)
    long = " ".join(f"Sentence number {i} carries a few words of its own to make the text long." for i in range(12))
    assert engine.prompt_length(long, engine._speaker_prompt(voice)) > engine.max_seq_len - 2048  # chunks
    items = [(f"u{i}", t, SynthesisParams(seed=40 + i, max_new_tokens=12 + 4 * i, temperature=0.7 + 0.1 * i,
                                          top_p=0.9 - 0.05 * i, repetition_penalty=1.0 + 0.15 * i))
             for i, t in enumerate(TEXTS[:4])] + [("long", long, SynthesisParams(seed=3, max_new_tokens=8))]
    ref = upstream_fed(engine, voice, items)
    assert ref["long"].tokens > 8
    assert_same(ref, references(engine, voice, items))  # synthesize: a session of one row
    assert_same(ref, run_session(engine, voice, items, capacity=3))


def test_seeded_sampling_matches_batch_one_whatever_the_batch(engine: FishSpeechEngine) -> None:
    voice = speaker("alice", 1)
    items = [(f"s{i}", t, SynthesisParams(seed=10 + i, max_new_tokens=10 + 5 * i, temperature=0.9, top_p=0.85,
                                          repetition_penalty=1.2 if i % 2 else 1.1))
             for i, t in enumerate(TEXTS)]
    ref = references(engine, voice, items)
    assert len({a.tokens for a in ref.values()}) > 2  # mixed lengths, so rows finish at different steps
    assert_same(ref, run_session(engine, voice, items, capacity=6))  # all at once, mixed text lengths
    assert_same(ref, run_session(engine, voice, items, capacity=8))  # rows to spare
    assert_same(ref, run_session(engine, voice, items, capacity=3))  # rows added mid-flight by refill
    assert_same(ref, run_session(engine, voice, items, capacity=3, refill=False))
    # Other batchmates: the same segment among different ones, in another order.
    again = run_session(engine, voice, [items[3], items[0], ("x", "Another text entirely.", SynthesisParams(seed=5))],
                        capacity=3)
    assert_same({k: ref[k] for k in ("s3", "s0")}, {k: again[k] for k in ("s3", "s0")})


def test_greedy_matches_fish_speech(engine: FishSpeechEngine) -> None:
    # fish-speech always samples; a top_p below 1 / vocabulary (<= the best token's probability) keeps only the best
    # token, so the draw is an argmax whatever the noise: fish-speech's own generate, its own RNG, unpatched, and no
    # seed. (0.01 is not greedy on a random model.)
    voice = speaker("bob", 2)
    assert 1e-4 < 1 / 4096 and 1e-4 < 1 / len(engine._model.tokenizer.semantic_id_to_token_id)
    items = [(f"g{i}", t, SynthesisParams(top_p=1e-4, temperature=0.5, max_new_tokens=12 + 5 * i))
             for i, t in enumerate(TEXTS[:4])]
    ref = {key: engine.synthesize_upstream(text, voice, params) for key, text, params in items}
    assert_same(ref, run_session(engine, voice, items, capacity=3))
    assert_same(ref, references(engine, voice, items))


def test_greedy_draws_do_not_depend_on_the_seed(engine: FishSpeechEngine) -> None:
    # With top_p keeping one token a draw is an argmax, so the seed cannot matter. These seeds once drew a token
    # top-p had removed (a noise of exactly 0 gave NaN): they gave other codes than seed 0 from some frame on.
    voice = speaker("bob", 2)
    runs = {seed: run_session(engine, voice, [("g", TEXTS[2], SynthesisParams(
        top_p=1e-4, temperature=0.5, max_new_tokens=22, seed=seed))], capacity=1)["g"]
        for seed in (0, 26, 48, 61, 96, 136)}
    for seed, audio in runs.items():
        assert audio.tokens == runs[0].tokens and np.array_equal(audio.samples, runs[0].samples), seed


def test_mixed_voices_match_batch_one_whatever_the_mix(engine: FishSpeechEngine) -> None:
    # Rows of four voices (prefixes of different lengths, one without a reference) in one session: each segment gets
    # its batch-1 codes and its single-voice session's codes, whatever the mix, the order, refill and B.
    voices = [speaker("carol", 3, frames=40), speaker("dave", 4, frames=90), None, speaker("erin", 5, frames=25)]
    items = [(f"m{i}", TEXTS[i % len(TEXTS)], SynthesisParams(seed=60 + i, max_new_tokens=8 + 3 * (i % 5),
                                                             temperature=0.9), voices[i % 4]) for i in range(10)]
    prefills = engine.prefixes.prefills
    ref = {key: engine.synthesize(text, voice, params) for key, text, params, voice in items}  # batch 1
    assert engine.prefixes.prefills - prefills == 4  # each voice prefilled once, then kept
    single: dict[str, Audio] = {}
    for voice in voices:
        single.update(run_session(engine, voice, [it[:3] for it in items if it[3] is voice], capacity=3))
    assert_same(ref, single)
    shuffled = [items[i] for i in np.random.default_rng(1).permutation(len(items))]
    for capacity, order, refill in ((1, items, True), (3, items, True), (3, shuffled, False), (8, items[::-1], True),
                                    (8, shuffled, False)):
        assert_same(ref, run_session(engine, None, order, capacity, refill))
    assert_same(ref, run_session(engine, None, items, 3, codec_thread=False))  # the codec inline: same audio
    assert engine.prefixes.prefills - prefills == 4  # no voice prefilled twice


def test_codec_runs_off_the_decode_loop(engine: FishSpeechEngine) -> None:
    # A row whose codes wait on a stalled codec does not stall the others: its slot takes the next row and the
    # decode steps go on; the row is returned once its audio is there, the same audio as at batch 1.
    import threading

    voice = speaker("ivy", 14)
    items = [("short", "Hi.", SynthesisParams(seed=1, max_new_tokens=3)),
             ("long", TEXTS[1], SynthesisParams(seed=2, max_new_tokens=40)),
             ("next", "Next one.", SynthesisParams(seed=3, max_new_tokens=30))]
    ref = references(engine, voice, items)
    gate, calls = threading.Event(), []
    decode = engine._decode

    def stalled(codes: object) -> object:
        calls.append(threading.current_thread().name)
        gate.wait(30)
        return decode(codes)

    engine._decode = stalled
    try:
        session = engine.open_batch(2)
        for item in items[:2]:
            session.add(*item, voice)
        out: dict[str, Audio] = {}
        while not calls:  # until the short row's codes reach the codec
            out.update(session.step())
        assert calls[0].startswith("fishmp-codec") and session.free_rows() == 1 and session.active() == 2
        session.add(*items[2], voice)  # into the short row's slot, while its audio is still being made
        steps = session._steps
        for _ in range(4):
            out.update(session.step())
        assert session._steps == steps + 4 and "short" not in out  # four decode steps ran past the stalled codec
        gate.set()
        while session.active():
            out.update(session.step())
        session.close()
    finally:
        gate.set()
        del engine._decode
    assert_same(ref, out)


def test_prefix_cache_is_bounded_least_recently_used_first() -> None:
    import torch

    from fishmp.engines.prefix_cache import Prefix, PrefixCache

    def make(key: str, n: int) -> object:
        return lambda: Prefix(key, None, torch.zeros((11, n), dtype=torch.long), (), ())

    cache = PrefixCache(budget=100)
    a = cache.get("a", make("a", 40))
    assert cache.get("a", make("a", 40)) is a and cache.prefills == 1  # a hit
    cache.get("b", make("b", 40))
    cache.get("a", make("a", 40))  # a is now the most recently used
    cache.get("c", make("c", 40))  # 120 > 100: b (least recently used) goes
    assert cache.tokens == 80 and len(cache) == 2 and cache.prefills == 3
    assert cache.get("a", make("a", 40)) is a
    cache.get("b", make("b", 40))
    assert cache.prefills == 4 and cache.tokens <= 100
    big = cache.get("huge", make("huge", 150))  # larger than the budget: served, never kept
    assert big.length == 150 and "huge" not in cache._entries and cache.tokens <= 100


def test_bad_input_on_add_leaves_other_rows_untouched(engine: FishSpeechEngine) -> None:
    voice = speaker("fay", 6)
    good = ("ok", TEXTS[1], SynthesisParams(seed=4, max_new_tokens=16))
    ref = references(engine, voice, [good])
    session = engine.open_batch(3)
    session.add(*good, voice)
    out = dict(session.step())
    with pytest.raises(ValueError, match="top_p"):
        session.add("bad-params", "Fine text.", SynthesisParams(top_p=1.5), voice)
    with pytest.raises(TextTooLongError, match="segment too-long"):
        session.add("too-long", "x" * 5000, SynthesisParams(), voice)
    bad_voice = SpeakerPrompt(key="bad", tokens=np.zeros((3, 10), np.int64), text="Wrong shape.")
    with pytest.raises(BadReferenceError, match="speaker bad"):
        session.add("bad-voice", "Fine text.", SynthesisParams(), bad_voice)
    assert session.active() == 1 and session.free_rows() == 2
    while session.active():
        out.update(session.step())
    assert_same(ref, out)
    session.close()


def test_capacity_accounting_and_empty_text(engine: FishSpeechEngine) -> None:
    voice = speaker("gus", 7)
    session = engine.open_batch(2)
    assert (session.capacity, session.free_rows(), session.active()) == (2, 2, 0)
    session.add("empty", "   ", SynthesisParams(), voice)
    assert (session.free_rows(), session.active()) == (2, 1)  # nothing to decode: it takes no row
    session.add("one", "One.", SynthesisParams(seed=1, max_new_tokens=5), voice)
    session.add("two", "Two.", SynthesisParams(seed=2, max_new_tokens=5), voice)
    with pytest.raises(RuntimeError, match="full"):
        session.add("three", "Three.", SynthesisParams(), voice)
    out: dict[str, Audio] = {}
    while session.active():
        out.update(session.step())
    assert out["empty"].tokens == 0 and len(out["empty"].samples) == 0
    items = [("one", "One.", SynthesisParams(seed=1, max_new_tokens=5)), ("two", "Two.", SynthesisParams(seed=2,
                                                                                                  max_new_tokens=5))]
    assert_same(references(engine, voice, items), {k: out[k] for k in ("one", "two")})
    session.close()
    assert session.step() == []


def test_one_token_is_a_clear_parameter_error(engine: FishSpeechEngine) -> None:
    # max_new_tokens=1: fish-speech's decode loop runs zero times and raises UnboundLocalError (which a worker takes
    # for a broken engine); both paths refuse it up front as a parameter error naming the allowed range.
    voice = speaker("hal", 8)
    with pytest.raises(ValueError, match="max_new_tokens >= 2"):
        engine.synthesize("Just one token.", voice, SynthesisParams(seed=2, max_new_tokens=1))
    session = engine.open_batch(2)
    with pytest.raises(ValueError, match="max_new_tokens >= 2"):
        session.add("one", "Just one token.", SynthesisParams(seed=2, max_new_tokens=1), voice)
    assert session.free_rows() == 2
    session.close()


def compile_items() -> list[tuple[str, str, SynthesisParams]]:
    return [(f"c{i}", t, SynthesisParams(seed=20 + i, max_new_tokens=8 + 4 * i, temperature=0.9))
            for i, t in enumerate(TEXTS)]


def test_bucketed_steps_match_batch_one(engine: FishSpeechEngine) -> None:
    # What a compiled step sees: rows padded to a batch bucket (2, 4, ... capacity) with dummy rows and attention
    # padded to a multiple of 256 slots, in the decode steps and in the fast transformer after each prefill.
    from fishmp.engines.batched_model import batch_bucket, length_bucket

    assert [batch_bucket(n, 6) for n in range(1, 7)] == [2, 2, 4, 4, 6, 6]
    assert batch_bucket(1, 1) == 1
    assert (length_bucket(1, 2560), length_bucket(256, 2560), length_bucket(257, 2560), length_bucket(2559, 2560)) \
        == (256, 256, 512, 2560)
    voice = speaker("ida", 9)
    items = compile_items()
    ref = references(engine, voice, items)
    for capacity in (6, 3, 1):  # 6: buckets 2, 4, 6 as rows finish; 3: refill mid-flight, buckets 2, 3; 1: one
        # row stepped with a dummy row (a compiled step is never batch 1)
        session = engine.open_batch(capacity, bucketed=True)
        assert session._net.bucketed and not session._net.compiled and session._net.rows == max(capacity, 2)
        session.close()
        assert_same(ref, run_bucketed(engine, voice, items, capacity, compiled=False))


def run_bucketed(engine: FishSpeechEngine, voice: SpeakerPrompt, items: list[tuple[str, str, SynthesisParams]],
                 capacity: int, compiled: bool) -> dict[str, Audio]:
    return run_session(engine, voice, items, capacity, compiled=compiled, bucketed=True)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_steps_match_batch_one(engine: FishSpeechEngine, backend: str) -> None:
    # FISH_COMPILE with batching: the decode step and the fast-transformer step run through torch.compile. aot_eager
    # (the CPU default) traces the graphs and runs them op by op; inductor generates C++ kernels (what runs on CUDA,
    # there with CUDA graphs): on this tiny model both still give the batch-1 path's exact tokens and samples.
    # Buckets + automatic dynamic shapes keep the number of graphs small however many shapes the rows go through.
    import torch
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    environ = dict(os.environ)  # inductor sets TORCHINDUCTOR_CACHE_DIR in the process: not for the other tests
    saved, engine._compiled_batch = engine._compiled_batch, None
    try:
        engine.compiled_batch().steps(backend=backend)
        voice = speaker("jay", 10)
        # Short segments of mixed lengths (compiling takes ~10-40 s here; each compiled call has overhead on a CPU).
        tokens = (10, 6, 8, 9) if backend == "aot_eager" else (6, 4, 5)
        items = [(k, t, SynthesisParams(seed=p.seed, max_new_tokens=n, temperature=0.9))
                 for (k, t, p), n in zip(compile_items(), tokens, strict=False)]
        ref = references(engine, voice, items)
        before = counters["stats"]["unique_graphs"]
        if backend == "inductor":  # the code inductor generates, fresh (no cache hit), as a GPU worker compiles it
            from torch._inductor.utils import run_and_get_code

            with torch._inductor.config.patch(fx_graph_cache=False), \
                    torch._functorch.config.patch(enable_autograd_cache=False):
                got, code = run_and_get_code(run_bucketed, engine, voice, items, 4, compiled=True)
            # The KV caches are updated in place: no copy_ back into them (a write through a view of the cache
            # made inductor copy every layer's whole cache twice per step). "_to_copy" is a dtype conversion.
            assert code and not [c for c in code if re.search(r"(?<!to_)copy_", c)]
            assert_same(ref, got)
        else:
            assert_same(ref, run_bucketed(engine, voice, items, 4, compiled=True))
        graphs = counters["stats"]["unique_graphs"] - before
        # a layer, the fast step, the main draw and the fast draw, each static at its first shape then one dynamic
        # graph; no graph break (they compile with fullgraph: a break would have raised)
        assert 4 <= graphs <= 8, graphs
        assert not counters["graph_break"]
        assert_same(ref, run_bucketed(engine, voice, items, 4, compiled=True))  # again: no new graphs
        # a smaller session runs on the first rows of the kept caches (same addresses for CUDA graphs)
        two = {k: ref[k] for k, _, _ in items[:2]}
        assert_same(two, run_bucketed(engine, voice, items[:2], 2, compiled=True))
        assert counters["stats"]["unique_graphs"] - before == graphs
        if backend == "aot_eager":  # two compiled sessions open at once: the second gets caches of its own
            other = speaker("kim", 11)
            ref_b = references(engine, other, items[2:])
            sa, sb = (engine.open_batch(2, compiled=True) for _ in range(2))
            assert sa._net.k[0].data_ptr() != sb._net.k[0].data_ptr()
            pa, pb, got = [(*it, voice) for it in items[:2]], [(*it, other) for it in items[2:]], {}
            while pa or pb or sa.active() or sb.active():
                for session, pending in ((sa, pa), (sb, pb)):
                    while pending and session.free_rows():
                        session.add(*pending.pop(0))
                    got.update(session.step())
            sa.close()
            sb.close()
            assert_same({**two, **ref_b}, got)
    finally:
        engine._compiled_batch = saved
        engine.release_memory()
        torch._dynamo.reset()
        os.environ.clear()
        os.environ.update(environ)


def test_batched_codec_decode_cuts_each_row(engine: FishSpeechEngine) -> None:
    # decode_many batched (the CUDA default): one padded codec call, each row cut to its own length. Rows as long as
    # the longest are bit-identical to a lone decode; padded ones differ by float32 rounding only (measured 7.5e-8).
    import torch

    from fishmp.engines.codec import decode_many

    gen = torch.Generator().manual_seed(3)
    codes = [torch.randint(0, 1024, (10, n), generator=gen) for n in (40, 25, 40, 7, 0)]
    alone = [engine._decode(c) for c in codes]
    for batched in (True, False):
        got = decode_many(engine, codes, batched=batched)
        for c, a, g in zip(codes, alone, got, strict=True):
            assert len(g) == len(a) == c.shape[1] * 2048 and g.dtype == np.float32
            if not batched or c.shape[1] in (0, 40):
                assert np.array_equal(g, a)
            else:
                assert np.abs(g - a).max() <= 1e-6
