"""Inside one worker: what the KV-cache length (FISH_MAX_SEQ_LEN) and the writer thread buy, on any machine.

fish-speech preallocates the KV cache and causal mask for the checkpoint's full max_seq_len (8192 on S1-mini) and
every decoded token attends over that whole preallocated length, so a shorter cache should decode faster. This
measures it with the real FishSpeechEngine on a tiny random checkpoint whose config says max_seq_len 8192 (the
S1-mini value), lowered by FISH_MAX_SEQ_LEN, runs interleaved (A B C A B C ...) so machine noise hits all alike.
It also times the wav write that the worker's writer thread takes off the generation thread, and what preparing a
speaker's prompt costs per segment when it is not kept: re-encoding the reference, or the disk cache's lookup
(hash the audio + load the .npy), against the worker's in-memory prompt (what fishmp does).

    .venv/bin/python benchmarks/worker.py [--rounds 3] [--tokens 64]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fishmp.config import Settings  # noqa: E402
from fishmp.engines import SpeakerPrompt, SynthesisParams  # noqa: E402
from fishmp.engines.audio import speech_like  # noqa: E402
from fishmp.engines.fish import FishSpeechEngine  # noqa: E402
from fishmp.engines.tiny import write_checkpoint  # noqa: E402
from fishmp.worker.files import write_wav  # noqa: E402

LENGTHS = (8192, 4096, 2560)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=64, help="max_new_tokens per segment (random weights never stop)")
    args = ap.parse_args()
    import soundfile as sf
    import torch

    torch.set_num_threads(1)  # one worker's share of a 2-core machine running 2 workers
    tmp = tempfile.mkdtemp(prefix="fishmp-bench-worker-")
    ckpt = os.path.join(tmp, "ckpt")
    write_checkpoint(ckpt, "tiny")
    cfg_path = os.path.join(ckpt, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["max_seq_len"] = 8192
    json.dump(cfg, open(cfg_path, "w"))
    ref = os.path.join(tmp, "ref.wav")
    sf.write(ref, speech_like(3.0), 44100)

    engines = {}
    for n in LENGTHS:
        eng = FishSpeechEngine(Settings(checkpoint_dir=ckpt, max_seq_len=None if n == 8192 else n), "cpu")
        eng.load()
        engines[n] = eng
    tokens = engines[8192].encode_reference(ref)
    speaker = SpeakerPrompt("bench", tokens, "Hello, this is my voice.")
    params = SynthesisParams(max_new_tokens=args.tokens, seed=1)
    text = "The quick brown fox jumps over the lazy dog."
    for eng in engines.values():  # warm-up
        eng.synthesize(text, speaker, params)

    rate: dict[int, list[float]] = {n: [] for n in LENGTHS}
    writes: list[float] = []
    synth: list[float] = []
    for _ in range(args.rounds):
        for n, eng in engines.items():
            t0 = time.perf_counter()
            audio = eng.synthesize(text, speaker, params)
            dt = time.perf_counter() - t0
            rate[n].append(audio.tokens / dt)
            synth.append(dt)
            t0 = time.perf_counter()
            write_wav(os.path.join(tmp, f"out{n}.wav"), audio.samples, audio.sample_rate)
            writes.append(time.perf_counter() - t0)

    from fishmp.worker.references import encode_cached

    cache = os.path.join(tmp, "cache")
    prep: dict[str, list[float]] = {"re-encode the reference": [], "disk cache lookup": [], "in-memory prompt": []}
    for _ in range(args.rounds * 3):
        t0 = time.perf_counter()
        engines[8192].encode_reference(ref)
        prep["re-encode the reference"].append(time.perf_counter() - t0)
        encode_cached(engines[8192], ref, cache)  # fills the cache on the first round
        t0 = time.perf_counter()
        encode_cached(engines[8192], ref, cache)
        prep["disk cache lookup"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        engines[8192]._speaker_prompt(speaker)  # the engine keeps the last speaker's prepared tensors
        prep["in-memory prompt"].append(time.perf_counter() - t0)

    base = statistics.median(rate[8192])
    print(f"CPU, 1 thread, tiny random checkpoint, {args.tokens} tokens/segment, {args.rounds} interleaved rounds\n")
    print("| KV cache (max_seq_len) | tokens/s (median) | vs 8192 |")
    print("| --- | --- | --- |")
    for n in LENGTHS:
        med = statistics.median(rate[n])
        print(f"| {n} | {med:.1f} | {med / base:.2f}x |")
    print(f"\nwav write (atomic, fsync) {statistics.median(writes) * 1000:.1f} ms median per segment = "
          f"{statistics.median(writes) / statistics.median(synth) * 100:.1f}% of a segment's synthesis time, "
          "taken off the generation thread by the worker's writer thread")
    seg = statistics.median(synth)
    print("\n| speaker prompt per segment (3 s reference) | ms | % of a segment |\n| --- | --- | --- |")
    for name, times in prep.items():
        print(f"| {name} | {statistics.median(times) * 1000:.2f} | {statistics.median(times) / seg * 100:.1f}% |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
