"""The FISH_COMPILE parts of benchmarks/batching.py: compiling the batch-1 baseline and the batched steps ahead (as
FishSpeechEngine.load does), and what torch.compile did in a run (graphs, graph breaks, CUDA graphs)."""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

from fishmp.engines.base import SpeakerPrompt, SynthesisParams


def compile_baseline(engine: Any, speaker: SpeakerPrompt, name: str, args: argparse.Namespace, modes: list[bool],
                     report: Callable[[dict], None]) -> tuple[list[bool], Any]:
    """fish-speech's batch-1 decode step compiled as FishSpeechEngine.load does under FISH_COMPILE (skipped with
    --no-compile-baseline: 25-250 s for S1-mini on a GPU). Returns the baseline's modes and the compiled step."""
    import torch

    eager = engine._decode_one
    if not args.compile_baseline:
        return [m for m in modes if not m] or [False], eager
    on_cuda = engine.device.startswith("cuda")
    t0 = time.perf_counter()
    try:
        engine._decode_one = torch.compile(eager, backend="inductor" if on_cuda else "aot_eager",
                                           mode="reduce-overhead" if on_cuda else None, fullgraph=True)
        engine.synthesize_upstream("Warm-up.", speaker, SynthesisParams(max_new_tokens=8, seed=0))
        compiled = engine._decode_one
        error = None
    except Exception as exc:  # reported; the eager baseline is still measured
        compiled, error = eager, f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
    engine._decode_one = eager
    report(dict(event="compile", part="batch-1", checkpoint=name, seconds=round(time.perf_counter() - t0, 1),
              error=error))
    return ([m for m in modes if not m] or [False]) if error else modes, compiled


def compile_batched(engine: Any, name: str, capacity: int, modes: list[bool], report: Callable[[dict], None],
                    backend: str | None = None) -> list[bool]:
    """The batched steps compiled ahead, as load() does for FISH_BATCH_SIZE > 1 under FISH_COMPILE (`backend`:
    the engine's default, inductor on CUDA and aot_eager on CPU, unless given)."""
    t0 = time.perf_counter()
    try:
        engine.compiled_batch().steps(backend=backend)
        session = engine.open_batch(capacity, compiled=True)
        session.warm_up()
        session.close()
        error = None
    except Exception as exc:  # reported; the eager configurations are still measured
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
        engine.release_memory()
    report(dict(event="compile", part="batched", checkpoint=name, capacity=capacity, backend=backend,
              seconds=round(time.perf_counter() - t0, 1), error=error))
    return ([m for m in modes if not m] or [False]) if error else modes


def compile_counters(name: str, device: str) -> dict:
    """What torch.compile did in this run: graphs dynamo compiled, graph breaks (0: the batched steps compile with
    fullgraph, so a break would have failed their compile; a break counted here is the batch-1 baseline's or
    another's), and on CUDA the graphs CUDA-graph trees recorded
    and the graphs they skipped (each skip's reason is logged with TORCH_LOGS=perf_hints). A skip means that step
    runs without CUDA graphs: slower, and the numbers above do not show compile at its best."""
    from torch._dynamo.utils import counters

    rec = dict(event="compile_counters", checkpoint=name, device=device,
               dynamo_graphs=counters["stats"]["unique_graphs"],
               graph_breaks=sum(counters["graph_break"].values()),
               cudagraph_skips=counters["inductor"]["cudagraph_skips"])
    if device.startswith("cuda"):
        from torch._inductor import cudagraph_trees

        index = int(device.split(":")[1]) if ":" in device else 0
        manager = cudagraph_trees.get_container(index).tree_manager
        nodes, recorded = list(manager.get_roots()) if manager is not None else [], 0
        while nodes:
            node = nodes.pop()
            recorded += 1
            nodes += [c for children in node.children.values() for c in children]
        rec["cudagraphs_recorded"] = recorded
    return rec
