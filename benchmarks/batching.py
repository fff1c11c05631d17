"""Batched decoding benchmark (issue 10): frames/s of ONE worker's engine at batch sizes B, refill on and off, against
fish-speech's own batch-1 path (`FishSpeechEngine.synthesize_upstream`), all configurations interleaved in one run.

    .venv/bin/python benchmarks/batching.py                                   # tiny + S1-mini-sized, CPU
    .venv/bin/python benchmarks/batching.py --checkpoints s1-mini --device cuda --sizes 1,2,4,8,16,32,64 \\
        --seconds-per-config 8 --json-out batching.jsonl
    .venv/bin/python benchmarks/batching.py --checkpoint checkpoints/openaudio-s1-mini --device cuda

Per checkpoint: the engine loads once (bfloat16 on cuda, float32 on cpu, as the engine does), a random speaker prompt of
--prompt-frames frames stands in for an encoded reference, and segments of mixed text lengths and max_new_tokens
(drawn in [max_new_tokens / 2, max_new_tokens], seeded) are generated until the configuration's time is up:
  baseline         fish-speech's own generate_long one segment after another (engine.synthesize_upstream: fishmp
                   before batching; a worker at FISH_BATCH_SIZE=1 now runs a session of one row, "B=1")
  B=n refill=on    one session of n rows; a row that finishes takes the next segment at the next step
  B=n refill=off   waves of n segments; the next wave starts when the whole wave has finished
Frames = semantic frames produced (finished segments' tokens + the frames of rows cut off by the time limit); the
time includes the session's prefix prefill, text prefills and codec decodes. Each configuration gets
--seconds-per-config seconds split over --rounds interleaved rounds (config order rotates each round), so drift of the
machine affects every configuration alike. One JSON line per measurement goes to --json-out as it is made (a run cut
short keeps what it measured), then one summary line per configuration with its ratio to batched B=1 and to baseline.
On cuda the peak memory per configuration (torch.cuda.max_memory_allocated) is reported. --codec thread,inline measures
each batched configuration with the codec on its own thread (a worker's default: finished rows become audio off the
decode loop) and inline; summaries give the codec's share of the time (seconds the codec spent / the
configuration's seconds) and thread_vs_inline. Random weights: the audio is
noise, and rows may stop early at a random end token (frames are counted, not assumed).

--compile on|both (FISH_COMPILE): the engine loads with compile on (fish-speech's batch-1 decode step compiled, and
the batched steps compiled ahead at B = max(--sizes), as a worker does), then `on` measures the compiled paths only,
`both` measures every configuration eager AND compiled in the same run (the baseline's eager runs swap fish-speech's
plain decode_one_token_ar back in). Compile time is reported (load) and excluded from the measurements. Summaries say
`compiled` per configuration and `ratio_to_best_batch1` = frames/s over the best of the batch-1 configurations
(baseline and batched B=1, eager or compiled) measured in this run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections import defaultdict
from typing import Any

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from batching_compile import compile_baseline, compile_batched, compile_counters  # noqa: E402

from fishmp.config import Settings  # noqa: E402
from fishmp.engines.base import SpeakerPrompt, SynthesisParams  # noqa: E402

WORDS = ("the quick brown fox jumps over a lazy dog while seven singing birds watch from tall green trees near "
         "an old stone bridge").split()


def checkpoint_dir(name: str, cache: str) -> str:
    """'tiny' / 's1-mini' -> a random checkpoint cached under `cache` (written once); anything else is a directory."""
    if name not in ("tiny", "s1-mini"):
        return name
    path = os.path.join(cache, f"fishmp-bench-{name}")
    if not os.path.isfile(os.path.join(path, "codec.pth")):
        from fishmp.engines.tiny import write_checkpoint

        t0 = time.perf_counter()
        print(f"writing the random {name} checkpoint to {path} ...", file=sys.stderr, flush=True)
        tmp = path + ".partial"
        write_checkpoint(tmp, name)
        os.replace(tmp, path)
        print(f"  written in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    return path


class Segments:
    """An endless seeded stream of (key, text, params) of mixed lengths."""

    def __init__(self, max_new_tokens: int, seed: int = 0) -> None:
        self.rng, self.max_new, self.n = np.random.default_rng(seed), max_new_tokens, 0

    def next(self) -> tuple[str, str, SynthesisParams]:
        self.n += 1
        text = " ".join(self.rng.choice(WORDS, size=int(self.rng.integers(3, 25)))).capitalize() + "."
        max_new = int(self.rng.integers(max(2, self.max_new // 2), self.max_new + 1))
        return f"s{self.n}", text, SynthesisParams(seed=self.n, max_new_tokens=max_new)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def run_baseline(engine: Any, speaker: SpeakerPrompt, segs: Segments, seconds: float) -> tuple[int, int, float]:
    t0, frames, done = time.perf_counter(), 0, 0
    while time.perf_counter() - t0 < seconds:
        _, text, params = segs.next()
        frames += engine.synthesize_upstream(text, speaker, params).tokens
        done += 1
    sync(engine.device)
    return frames, done, time.perf_counter() - t0


def run_batched(engine: Any, speaker: SpeakerPrompt, segs: Segments, seconds: float, size: int,
                refill: bool, compiled: bool = False, codec_thread: bool = True) -> tuple[int, int, float, float]:
    """Frames, segments finished, seconds, and the seconds the codec spent (on its thread, or inline)."""
    t0, frames, done = time.perf_counter(), 0, 0
    session = engine.open_batch(size, compiled=compiled, codec_thread=codec_thread)
    try:
        while time.perf_counter() - t0 < seconds:
            if session.free_rows() and (refill or session.active() == 0):
                while session.free_rows():
                    session.add(*segs.next(), speaker)
            for _, audio in session.step():
                frames += audio.tokens
                done += 1
        sync(engine.device)
        frames += session.in_flight_frames()
        codec_s = session.codec_seconds
    finally:
        session.close()
    return frames, done, time.perf_counter() - t0, codec_s


def match_check(engine: Any, speaker: SpeakerPrompt, name: str, n: int, size: int, out: Any,
                compiled: bool = False) -> None:
    """n segments through synthesize and through one batched session of `size` rows (refill on): how many give the
    same codes (exact on CPU float32; on GPU bf16 kernels differ with the batch shape), and for the others the frame
    where the codes first differ and the share of equal codes."""
    import torch

    codes: list[Any] = []
    decode = engine._decode
    engine._decode = lambda c: (codes.append(c.cpu()), decode(c))[1]
    gen = Segments(48, seed=7)
    segs = [gen.next() for _ in range(n)]
    ref: dict[str, Any] = {}
    try:
        for key, text, params in segs:
            codes.clear()
            engine.synthesize(text, speaker, params)
            ref[key] = torch.cat(codes, dim=1)
    finally:
        engine._decode = decode
    got: dict[str, Any] = {}
    session = engine.open_batch(size, compiled=compiled)
    pending = list(segs)
    while pending or session.active():
        while pending and session.free_rows():
            session.add(*pending.pop(0), speaker)
        session.step()
        got.update({k: torch.cat(v, dim=1).cpu() for k, v in session.finished_codes.items()})
    session.close()
    first_diff, equal, total = [], 0, 0
    for key, a in ref.items():
        b = got[key]
        m = min(a.shape[1], b.shape[1])
        same = (a[:, :m] == b[:, :m]).all(dim=0)
        equal += int((a[:, :m] == b[:, :m]).sum())
        total += a.numel()
        if a.shape != b.shape or not bool(same.all()):
            first_diff.append(int((~same).nonzero()[0]) if not bool(same.all()) else m)
    emit(dict(event="match", checkpoint=name, device=engine.device, batch=size, segments=n, compiled=compiled,
              identical=n - len(first_diff), first_differing_frame=first_diff,
              equal_code_share=round(equal / max(total, 1), 4), frames_ref=sum(a.shape[1] for a in ref.values()),
              frames_batched=sum(b.shape[1] for b in got.values())), out)


def profile_steps(engine: Any, speaker: SpeakerPrompt, name: str, size: int, out: Any,
                  compiled: bool = False) -> None:
    """Time single decode steps of a full session of `size` rows, then a torch.profiler table of 3 steps."""
    from torch.profiler import ProfilerActivity, profile

    segs = Segments(400, seed=5)
    session = engine.open_batch(size, compiled=compiled)
    while session.free_rows():
        session.add(*segs.next(), speaker)
    times = []
    for _ in range(8):
        sync(engine.device)
        t0 = time.perf_counter()
        session.step()
        sync(engine.device)
        times.append(round((time.perf_counter() - t0) * 1000, 1))
    emit(dict(event="profile", checkpoint=name, device=engine.device, batch=size, compiled=compiled,
              step_ms=times), out)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if engine.device.startswith("cuda") else [])
    with profile(activities=activities) as prof:
        for _ in range(3):
            session.step()
        sync(engine.device)
    # Ops the host dispatches per step (top-level ones): eager decoding on a GPU is bound by launching them
    top = sum(1 for e in prof.events() if e.cpu_parent is None and e.device_type.name == "CPU")
    emit(dict(event="profile", checkpoint=name, device=engine.device, batch=size, compiled=compiled,
              host_ops_per_step=round(top / 3)), out)
    key = "self_cuda_time_total" if engine.device.startswith("cuda") else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=50), flush=True)
    session.close()


def bench_checkpoint(name: str, args: argparse.Namespace, out: Any) -> list[dict]:
    import torch

    from fishmp.engines.fish import FishSpeechEngine

    path = checkpoint_dir(name, args.cache_dir)
    settings = Settings(checkpoint_dir=path, max_seq_len=args.max_seq_len, precision=args.precision)
    t0 = time.perf_counter()
    engine = FishSpeechEngine(settings, args.device)
    engine.load()
    emit(dict(event="load", checkpoint=name, device=args.device, seconds=round(time.perf_counter() - t0, 1)), out)

    def report(rec: dict) -> None:
        emit(rec, out)

    rng = np.random.default_rng(1)
    speaker = SpeakerPrompt(key=f"bench-{name}", tokens=rng.integers(0, 1024, (10, args.prompt_frames)),
                            text="This is the reference transcript of the benchmark voice, a sentence or two long.")
    engine.synthesize_upstream("Warm-up.", speaker, SynthesisParams(max_new_tokens=4, seed=0))
    eager_one = compiled_one = engine._decode_one
    base_modes = batch_modes = {"off": [False], "on": [True], "both": [False, True]}[args.compile]
    if args.compile != "off":
        # As FISH_COMPILE does in load(), timed here and allowed to fail: a failure drops the compiled
        # configurations (reported) instead of ending the run.
        base_modes, compiled_one = compile_baseline(engine, speaker, name, args, base_modes, report)
        batch_modes = compile_batched(engine, name, max(args.sizes), batch_modes, report, args.backend)
    # Warm-up, not timed: a few steps at every batch size (the first step at a new shape pays kernel selection:
    # seconds at B=64 on an H200; compiled, CUDA graphs record).
    warm = Segments(8, seed=99)
    for size in args.sizes:
        for compiled in batch_modes:
            session = engine.open_batch(size, compiled=compiled)
            while session.free_rows():
                session.add(*warm.next(), speaker)
            for _ in range(3):
                session.step()
            session.close()
    sync(args.device)
    if args.match:
        for compiled in batch_modes:
            match_check(engine, speaker, name, args.match, min(8, max(args.sizes)), out, compiled)
    for size in args.profile:
        for compiled in batch_modes:
            profile_steps(engine, speaker, name, size, out, compiled)

    # (kind, batch, refill, compiled, codec on its thread); the baseline decodes inline
    configs: list[tuple[str, int, bool, bool, bool]] = [] if args.no_baseline else [
        ("baseline", 1, False, c, False) for c in base_modes]
    for size in args.sizes:
        configs += [("batched", size, refill, c, t) for refill in args.refill for c in batch_modes for t in args.codec]
    totals: dict[tuple, list[float]] = defaultdict(lambda: [0, 0, 0.0, 0, 0.0])
    budget = args.seconds_per_config / args.rounds
    for rnd in range(args.rounds):
        order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]
        for cfg in order:
            kind, size, refill, compiled, thread = cfg
            segs = Segments(args.max_new_tokens, seed=1000 * rnd + size)
            if args.device.startswith("cuda"):
                torch.cuda.reset_peak_memory_stats()
            codec_s = 0.0
            try:
                if kind == "baseline":
                    engine._decode_one = compiled_one if compiled else eager_one
                    frames, done, secs = run_baseline(engine, speaker, segs, budget)
                else:
                    frames, done, secs, codec_s = run_batched(engine, speaker, segs, budget, size, refill, compiled,
                                                              thread)
                error = None
            except Exception as exc:  # e.g. out of memory at a large B: report it, keep measuring the others
                frames, done, secs, error = 0, 0, 0.0, f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                engine.release_memory()
            peak = torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda") else None
            rec = dict(event="measure", checkpoint=name, device=args.device, round=rnd, config=kind, batch=size,
                       compiled=compiled, codec="thread" if thread else "inline",
                       refill=refill if kind == "batched" else None, frames=frames, segments=done,
                       seconds=round(secs, 3), frames_per_s=round(frames / secs, 3) if secs else 0.0,
                       codec_s=round(codec_s, 3), peak_memory_gib=round(peak, 3) if peak is not None else None,
                       error=error)
            emit(rec, out)
            acc = totals[cfg]
            acc[0] += frames
            acc[1] += done
            acc[2] += secs
            acc[3] = max(acc[3], peak or 0)
            acc[4] += codec_s
    fps = {cfg: (t[0] / t[2] if t[2] else 0.0) for cfg, t in totals.items()}
    first, codec0 = batch_modes[0], args.codec[0]  # eager when measured
    b1 = fps.get(("batched", 1, True, first, codec0)) or fps.get(("batched", 1, False, first, codec0)) or 0.0
    base = fps.get(("baseline", 1, False, base_modes[0], False), 0.0)
    best1 = max([v for (kind, size, *_), v in fps.items() if size == 1], default=0.0)
    summary = []
    for cfg in configs:
        kind, size, refill, compiled, thread = cfg
        t = totals[cfg]
        inline = fps.get((kind, size, refill, compiled, False)) if thread and False in args.codec else None
        rec = dict(event="summary", checkpoint=name, device=args.device, compiled=compiled, config=kind,
                   batch=size, refill=refill if kind == "batched" else None, codec="thread" if thread else "inline",
                   frames=t[0], segments=t[1], seconds=round(t[2], 2), frames_per_s=round(fps[cfg], 3),
                   ratio_to_b1=round(fps[cfg] / b1, 2) if b1 else None,
                   ratio_to_baseline=round(fps[cfg] / base, 2) if base else None,
                   ratio_to_best_batch1=round(fps[cfg] / best1, 2) if best1 else None,
                   codec_share=round(t[4] / t[2], 3) if t[2] and kind == "batched" else None,
                   thread_vs_inline=round(fps[cfg] / inline, 2) if inline else None,
                   peak_memory_gib=round(t[3], 3) if args.device.startswith("cuda") else None)
        emit(rec, out)
        summary.append(rec)
    if True in base_modes + batch_modes:
        emit(compile_counters(name, args.device), out)
    del engine
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return summary


def emit(rec: dict, out: Any) -> None:
    line = json.dumps(rec)
    if out is not None:
        out.write(line + "\n")
        out.flush()
    if rec["event"] == "summary":
        refill = "" if rec["refill"] is None else (" refill" if rec["refill"] else " waves ")
        mem = f"  peak {rec['peak_memory_gib']:.2f} GiB" if rec.get("peak_memory_gib") else ""
        mode = "compiled" if rec["compiled"] else "eager"
        codec = "" if rec["codec_share"] is None else f"  codec {rec['codec'] } {rec['codec_share']:.0%} of the time"
        codec += f" (x{rec['thread_vs_inline']} vs inline)" if rec["thread_vs_inline"] else ""
        print(f"[{rec['checkpoint']}] {rec['config']:8s} {mode:8s} B={rec['batch']:<3d}{refill:7s} "
              f"{rec['frames_per_s']:9.2f} frames/s  x{rec['ratio_to_b1']} vs B=1  x{rec['ratio_to_baseline']} vs "
              f"baseline  x{rec['ratio_to_best_batch1']} vs best batch-1{mem}{codec}", flush=True)
    else:
        print(line, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="cpu or cuda (cuda:N)")
    ap.add_argument("--checkpoints", default="tiny,s1-mini",
                    help="comma-separated: tiny, s1-mini (random, written once under --cache-dir) or directories")
    ap.add_argument("--checkpoint", help="one checkpoint directory (overrides --checkpoints)")
    ap.add_argument("--sizes", default="1,2,4,8,16", help="batch sizes, e.g. 1,2,4,8,16,32,64")
    ap.add_argument("--refill", default="on,off", help="on, off or on,off")
    ap.add_argument("--codec", default="thread",
                    help="thread (finished rows become audio on the codec's own thread), inline, or thread,inline")
    ap.add_argument("--seconds-per-config", type=float, default=20.0, help="time per configuration (all rounds)")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="segments draw max_new_tokens in [n/2, n]")
    ap.add_argument("--prompt-frames", type=int, default=100, help="frames of the random speaker prompt")
    ap.add_argument("--max-seq-len", type=int, default=4096, help="KV-cache length (FISH_MAX_SEQ_LEN)")
    ap.add_argument("--precision", default="bfloat16", help="on cuda (cpu always runs float32)")
    ap.add_argument("--compile", default="off", choices=("off", "on", "both"),
                    help="FISH_COMPILE: off, on (compiled paths only) or both (eager and compiled, one run)")
    ap.add_argument("--no-compile-baseline", dest="compile_baseline", action="store_false",
                    help="with --compile: leave the batch-1 baseline eager (its compile takes 25-250 s on a GPU)")
    ap.add_argument("--backend", default=None,
                    help="torch.compile backend of the batched steps (default: inductor on cuda, aot_eager on cpu)")
    ap.add_argument("--match", type=int, default=0,
                    help="first check N segments: batched (B=min(8, max size)) vs synthesize give the same audio")
    ap.add_argument("--profile", default="", help="batch sizes to profile (step times + torch.profiler table)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the baseline (fish-speech's own generate_long)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--cache-dir", default="/tmp", help="where random checkpoints are cached")
    ap.add_argument("--json-out", help="append one JSON line per measurement and per summary")
    args = ap.parse_args(argv)
    try:
        args.sizes = sorted({int(s) for s in args.sizes.split(",") if s.strip()})
        args.profile = [int(s) for s in args.profile.split(",") if s.strip()]
        args.refill = [{"on": True, "off": False}[s.strip()] for s in args.refill.split(",") if s.strip()]
        args.codec = [{"thread": True, "inline": False}[s.strip()] for s in args.codec.split(",") if s.strip()]
        if not args.sizes or min(args.sizes) < 1 or not args.refill or not args.codec or args.rounds < 1:
            raise ValueError
    except (KeyError, ValueError):
        ap.error("--sizes takes whole numbers >= 1, --refill on/off, --codec thread/inline, --rounds >= 1")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA device: run with --device cpu", file=sys.stderr)
        return 2
    names = [args.checkpoint] if args.checkpoint else [c.strip() for c in args.checkpoints.split(",") if c.strip()]
    out = open(args.json_out, "a") if args.json_out else None  # noqa: SIM115  (kept open for the whole run)
    try:
        if args.device.startswith("cuda"):
            emit(dict(event="device", name=torch.cuda.get_device_name(), torch=torch.__version__), out)
        for name in names:
            bench_checkpoint(name, args, out)
    finally:
        if out:
            out.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
