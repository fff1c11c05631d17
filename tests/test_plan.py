"""The plan reproduces every configuration of the user guide (seed 004), in-process and through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from fishmp.config import Settings
from fishmp.planning.gpus import GPU, _visible_filter, parse_gpu_spec, select_devices
from fishmp.planning.plan import make_plan, plan_log_lines

GUIDE = [  # (GPUs as --gpus, FISH_MODEL_MEMORY_GB, workers per GPU)
    ("NVIDIA GeForce RTX 4090:24", 8.0, [2]),
    ("NVIDIA GeForce RTX 4090:24", 6.0, [3]),
    ("NVIDIA GeForce RTX 4080:16", 8.0, [1]),
    ("NVIDIA GeForce RTX 4080:16", 7.0, [2]),
    ("NVIDIA GeForce RTX 4090:24,NVIDIA GeForce RTX 4090:24", 8.0, [2, 2]),
    ("NVIDIA GeForce RTX 4090:24,NVIDIA GeForce RTX 4090:24", 6.0, [3, 3]),
    ("NVIDIA GeForce RTX 3060:12,NVIDIA GeForce RTX 3060:12", 9.0, [1, 1]),
    ("NVIDIA A100-SXM4-80GB:80", 8.0, [9]),
    ("NVIDIA A100-SXM4-80GB:80", 6.5, [11]),
]


@pytest.mark.parametrize("spec,mem,expected", GUIDE)
def test_guide_configurations(spec: str, mem: float, expected: list[int]) -> None:
    plan = make_plan(parse_gpu_spec(spec), Settings(model_memory_gb=mem, multiprocess_mode="true"))
    assert [g.workers for g in plan.gpus] == expected
    assert plan.workers == sum(expected)
    assert plan.mode == "multiprocess"


@pytest.mark.parametrize("spec,mem,expected", GUIDE)
def test_guide_configurations_cli(spec: str, mem: float, expected: list[int], tmp_path) -> None:
    env = {**os.environ, "FISH_MODEL_MEMORY_GB": str(mem), "FISH_MULTIPROCESS_MODE": "true"}
    out = subprocess.run([sys.executable, "-m", "fishmp", "plan", "--gpus", spec, "--json"],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=60)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [g["workers"] for g in data["gpus"]] == expected
    assert data["workers"] == sum(expected) and data["mode"] == "multiprocess"
    assert "Total Memory" in out.stderr  # the guide's log lines go to stderr


def test_log_lines_match_the_guide() -> None:
    plan = make_plan(parse_gpu_spec("NVIDIA GeForce RTX 4090:24,NVIDIA GeForce RTX 4090:24"), Settings())
    assert plan_log_lines(plan) == [
        "[GPU 0] NVIDIA GeForce RTX 4090, Total Memory: 24.00 GB",
        "[GPU 0] Can run 2 workers (Available: 21.60 GB)",
        "[GPU 1] NVIDIA GeForce RTX 4090, Total Memory: 24.00 GB",
        "[GPU 1] Can run 2 workers (Available: 21.60 GB)",
        "[Main] Using 4 parallel workers across 2 GPU(s)",
        "[Main] GPU 0: 2 workers",
        "[Main] GPU 1: 2 workers",
    ]


def test_at_least_one_worker_with_warning() -> None:
    plan = make_plan(parse_gpu_spec("small:6"), Settings(model_memory_gb=8.0))
    # auto runs even a lone worker as a child process (deadlines, SIGTERM and crashes work as with many)
    assert plan.workers == 1 and plan.mode == "multiprocess"
    assert any("less than FISH_MODEL_MEMORY_GB" in w for w in plan.warnings)


def test_free_memory_caps_workers() -> None:
    busy = GPU(0, "RTX 4090", total_gib=24.0, free_gib=10.0, uuid="GPU-a")
    plan = make_plan([busy], Settings(model_memory_gb=8.0, multiprocess_mode="true"))
    assert plan.gpus[0].capacity == 2 and plan.gpus[0].workers == 1
    assert any("only 10.00 GB free" in w for w in plan.warnings)


def test_all_gpus_busy_still_tries_one() -> None:
    full = [GPU(0, "a", 24.0, 1.0, "GPU-a"), GPU(1, "b", 24.0, 3.0, "GPU-b")]
    plan = make_plan(full, Settings())
    assert [g.workers for g in plan.gpus] == [0, 1]


def test_job_size_caps_and_spreads_across_gpus() -> None:
    gpus = parse_gpu_spec("a:80,b:80")
    plan = make_plan(gpus, Settings(), n_segments=3)
    assert [g.workers for g in plan.gpus] == [2, 1]  # never 3 on one GPU while the other idles
    assert make_plan(gpus, Settings(), n_segments=1).workers == 1


def test_max_workers_spreads_across_gpus() -> None:
    plan = make_plan(parse_gpu_spec("a:80,b:80"), Settings(max_workers=4))
    assert [g.workers for g in plan.gpus] == [2, 2]


def test_single_mode_is_one_in_process_worker() -> None:
    plan = make_plan(parse_gpu_spec("a:80,b:80"), Settings(multiprocess_mode="false"))
    assert plan.workers == 1 and plan.in_process


def test_no_gpu_uses_cpu_workers() -> None:
    plan = make_plan([], Settings(cpu_workers=2))
    assert plan.mode == "cpu" and plan.workers == 2 and plan.slots() == [("cpu", None)] * 2
    assert make_plan([], Settings()).mode == "cpu"
    assert make_plan([], Settings(multiprocess_mode="false")).mode == "single"


def test_slots_interleave_gpus() -> None:
    plan = make_plan(parse_gpu_spec("a:24,b:24"), Settings())
    assert [d for d, _ in plan.slots()] == ["cuda:0", "cuda:1", "cuda:0", "cuda:1"]


def test_cuda_visible_devices_filtering() -> None:
    gpus = [GPU(i, f"g{i}", 24.0, 24.0, f"GPU-{i}aaa-{i}") for i in range(4)]
    assert [g.index for g in _visible_filter(gpus, "2,0", "PCI_BUS_ID")] == [2, 0]
    assert [g.index for g in _visible_filter(gpus, "GPU-3aaa-3,1", None)] == [3, 1]
    assert [g.index for g in _visible_filter(gpus, "1,7,2", None)] == [1]  # CUDA stops at an invalid entry
    assert _visible_filter(gpus, "", None) == []
    assert _visible_filter(gpus, None, None) == gpus


def test_fish_devices_selection() -> None:
    gpus = parse_gpu_spec("a:24,b:24")
    assert [g.index for g in select_devices(gpus, "1")] == [1]
    assert select_devices(gpus, "cpu") == []
    with pytest.raises(ValueError, match="FISH_DEVICES entry '5'"):
        select_devices(gpus, "5")


@pytest.mark.parametrize("bad", ["", "abc", "x:0", "x:-2", "24,foo:bar"])
def test_bad_gpu_spec(bad: str) -> None:
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpu_spec(bad)


def test_index_order_warning_on_mixed_gpus(caplog) -> None:
    mixed = [GPU(0, "A100", 80.0, 80.0, "GPU-a"), GPU(1, "T4", 16.0, 16.0, "GPU-b")]
    with caplog.at_level("WARNING", logger="fishmp"):
        assert [g.index for g in _visible_filter(mixed, "1", None)] == [1]
    assert "CUDA_DEVICE_ORDER=PCI_BUS_ID" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="fishmp"):
        _visible_filter(mixed, "1", "PCI_BUS_ID")
    assert caplog.text == ""


def _greedy_deal(limits: list[int], total: int) -> list[int]:
    """The original one-at-a-time dealing, the reference the O(GPUs) version must equal."""
    got = [0] * len(limits)
    for _ in range(total):
        open_ = [i for i in range(len(limits)) if got[i] < limits[i]]
        if not open_:
            break
        got[min(open_, key=lambda k: (got[k], -limits[k], k))] += 1
    return got


def test_dealing_equals_one_at_a_time_dealing() -> None:
    import random

    from fishmp.planning.plan import _deal

    rng = random.Random(7)
    for _ in range(2000):
        limits = [rng.randint(0, 9) for _ in range(rng.randint(1, 6))]
        total = rng.randint(0, sum(limits) + 3)
        assert _deal(limits, total) == _greedy_deal(limits, total), (limits, total)


def test_plan_arithmetic_is_o_gpus_not_o_workers() -> None:
    """Issue 11 item 4: FISH_MODEL_MEMORY_GB=1e-5 on 24 GB planned 2,160,000 workers in 11 s, dealt one by one. The
    setting's range now stops that value; a (simulated) 1.2 PB GPU at 0.5 GiB gives as many workers."""
    import time

    start = time.perf_counter()
    plan = make_plan(parse_gpu_spec("a:1200000"), Settings(model_memory_gb=0.5))
    eight = make_plan(parse_gpu_spec(",".join(["b:400000"] * 8)), Settings(model_memory_gb=0.5, max_workers=10**9))
    assert time.perf_counter() - start < 0.5
    assert plan.workers == 2_160_000 and [g.workers for g in eight.gpus] == [720_000] * 8
    assert plan_log_lines(plan)[-1] == "[Main] GPU 0: 2160000 workers"


def _batched(mem: float, batch: int, **kw: object) -> Settings:
    settings = Settings(model_memory_gb=mem, multiprocess_mode="true", **kw)
    return settings.replace(batch_size=batch)


def test_workers_times_batch_rows() -> None:
    """One more row costs its KV cache only; FISH_MODEL_MEMORY_GB stays the memory of one worker at batch 1."""
    from fishmp.planning.plan import DEFAULT_ROW_GIB

    # 80 GB x 0.9 = 72 GiB; a worker of 8 rows at 6.5 GiB + 7 x 1.0 GiB = 13.5 GiB -> 5 workers of 8 rows.
    plan = make_plan(parse_gpu_spec("NVIDIA A100-SXM4-80GB:80"), _batched(6.5, 8), row_gib=1.0)
    assert [(g.workers, g.rows, g.worker_gib) for g in plan.gpus] == [(5, 8, 13.5)]
    assert plan_log_lines(plan)[-1] == "[Main] GPU 0: 5 workers x 8 rows"
    assert plan.to_dict()["gpus"][0]["rows"] == 8
    # Without the checkpoint's figure the plan assumes S1-mini's full-length row (0.875 GiB in bf16 at 8192).
    assert abs(DEFAULT_ROW_GIB - 0.875) < 0.001
    assert make_plan(parse_gpu_spec("a:16"), _batched(8.0, 4)).gpus[0].capacity == 1  # 14.4 / (8 + 3 x 0.875)
    # Batch 1 is the guide's formula unchanged.
    assert [g.workers for g in make_plan(parse_gpu_spec("a:80"), _batched(6.5, 1)).gpus] == [11]
    small = make_plan(parse_gpu_spec("small:16"), _batched(8.0, 16), row_gib=1.0)
    assert small.workers == 1 and "one worker of 16 rows (23.00 GB" in small.warnings[0]


def test_alternatives_weigh_workers_against_rows() -> None:
    from fishmp.planning.plan import alternatives

    alts = alternatives(72.0, 6.5, 1.0)  # 72 GiB available, 6.5 GiB a worker, 1 GiB a row
    assert [(a.workers, a.rows) for a in alts[:3]] == [(1, 66), (2, 30), (3, 18)]
    assert alts[-1].workers == 11 and alts[-1].rows == 1  # floor(72 / 6.5): the guide's plan, no batching room
    assert all(a.total_gib <= 72.0 + 1e-9 for a in alts)
    assert alternatives(4.0, 6.5, 1.0) == []
    assert len(alternatives(1_080_000.0, 0.5, 1.0)) == 8  # a bounded list even for millions of workers


def test_memory_check_names_the_short_gpu() -> None:
    from fishmp.planning.plan import memory_check

    gpus = [GPU(0, "NVIDIA GeForce RTX 3060", 12.0, 12.0, "GPU-a"), GPU(1, "NVIDIA L4", 4.0, 4.0, "GPU-b")]
    plan = make_plan(gpus, Settings())
    assert memory_check(plan, 4.3) == [
        "[GPU 1] NVIDIA L4: one worker needs about 4.30 GB by the estimate, 3.60 GB is available (4.00 GB total, "
        "4.00 GB free, reserve kept): short by 0.70 GB"]
    assert memory_check(plan, 3.0) == []


def test_plan_explain_cli(tiny_checkpoint: str, tmp_path) -> None:
    from conftest import run_fishmp

    out = run_fishmp(["plan", "--gpus", "NVIDIA GeForce RTX 4090:24,NVIDIA L4:0.5", "--explain", "--json"],
                     cwd=str(tmp_path), env={"FISH_CHECKPOINT_DIR": tiny_checkpoint}, timeout=120)
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert [g["workers"] for g in data["gpus"]] == [2, 0]  # the guide's plan is unchanged by --explain
    ex = data["explain"]
    names = [c["name"] for c in ex["estimate"]["components"]]
    assert names == ["LLM weights", "LLM buffers", "KV cache", "prefix cache", "codec weights", "codec buffers",
                     "activations", "CUDA context", "allocator slack", "safety margin"]
    assert sum(c["bytes"] for c in ex["estimate"]["components"]) == ex["estimate"]["total_bytes"]
    assert ex["gpus"][0]["alternatives"][0]["workers"] == 1
    assert any("[GPU 1] NVIDIA L4: one worker needs about" in s and "short by" in s for s in ex["suggestions"])
    assert any("FISH_MODEL_MEMORY_GB=" in s and "would run" in s for s in ex["suggestions"])
    assert "[Memory]   total" in out.stderr and "[Suggest]" in out.stderr


def test_plan_explain_without_checkpoint_is_one_clear_line(tmp_path) -> None:
    from conftest import run_fishmp

    out = run_fishmp(["plan", "--gpus", "24", "--explain"], cwd=str(tmp_path),
                     env={"FISH_CHECKPOINT_DIR": str(tmp_path / "none")})
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        f"fishmp: plan --explain reads the checkpoint: checkpoint '{tmp_path / 'none'}' lacks config.json "
        "(FISH_CHECKPOINT_DIR); `python -m fishmp tiny-checkpoint DIR --size s1-mini` writes a random one of the real size"]


def test_plan_measure_without_gpu_says_so(tmp_path) -> None:
    from conftest import run_fishmp

    out = run_fishmp(["plan", "--measure", "--json"], cwd=str(tmp_path), env={"FISH_DEVICES": "cpu"})
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == {"measured": [], "reason": "no GPU"}
    assert "no GPU visible" in out.stderr
