"""FISH_MODEL_MEMORY_GB=auto (issue 13 item 3): one worker per GPU measures itself after a warm-up, then each GPU is
filled by the measurement; and `plan --measure`'s throughput cache shown by `plan --explain`.

The fill arithmetic is checked against hand-computed examples; the whole path (start plan, worker-side warm-up and
footprint, grow) runs end to end through the CLI on simulated GPUs with the synthetic engine, whose
FISH_SYNTHETIC_FOOTPRINT_GB stands in for NVML (which needs a real GPU)."""

from __future__ import annotations

import json
import random

import pytest
from conftest import jsonl_events, synthetic_env

from fishmp.config import ConfigError, Settings
from fishmp.measure import measure_gpu
from fishmp.planning.gpus import GIB, GPU, parse_gpu_spec
from fishmp.planning.plan import _deal, fill_plan, make_plan, plan_log_lines
from fishmp.planning.throughput import cached_throughput
from fishmp.running.autofill import planned_gib
from fishmp.worker.footprint import Footprint, FootprintProbe, run_warm_up

AUTO = Settings(model_memory_gb="auto", multiprocess_mode="true")


def _fill(spec: str, measured: dict[int, float], settings: Settings = AUTO, n: int | None = None,
          row_gib: float | None = None, gpus: list[GPU] | None = None) -> list[int]:
    gpus = gpus or parse_gpu_spec(spec)
    start = make_plan(gpus, settings, n)
    return [g.workers for g in fill_plan(start, measured, settings, n, row_gib).gpus]


def test_auto_start_plan_is_one_worker_per_gpu() -> None:
    plan = make_plan(parse_gpu_spec("H200:140,H200:140,L4:24"), AUTO)
    assert [g.workers for g in plan.gpus] == [1, 1, 1] and all(g.worker_gib == 0 for g in plan.gpus)
    lines = plan_log_lines(plan)
    assert "[GPU 0] Can run ? workers until one has measured itself (Available: 126.00 GB)" in lines
    assert "[Main] Using 3 parallel workers across 3 GPU(s)" in lines
    assert [g.workers for g in make_plan(parse_gpu_spec("a:80,b:80,c:80"), AUTO, n_segments=2).gpus] == [1, 1, 0]
    assert make_plan([], AUTO).cpu_workers == 1  # no GPU: the CPU plan, auto changes nothing
    single = make_plan(parse_gpu_spec("a:80,b:80"), AUTO.replace(multiprocess_mode="false"))
    assert single.workers == 1 and any("not measured (FISH_MULTIPROCESS_MODE=false)" in w for w in single.warnings)


def test_fill_hand_computed() -> None:
    # 140 GB x 0.9 = 126 GB; 126 / 5.9 = 21.36 -> 21 workers (21 x 5.9 = 123.9; 22 x 5.9 = 129.8 > 126).
    assert _fill("H200:140", {0: 5.9}) == [21]
    assert _fill("H200:140", {0: 5.9}, n=8) == [8]  # never more workers than segments
    # 80 x 0.9 = 72 / 6.0 = 12; 24 x 0.9 = 21.6 / 7.0 = 3.09 -> 3: each GPU by its own figure.
    assert _fill("a:80,b:24", {0: 6.0, 1: 7.0}) == [12, 3]
    # FISH_MAX_WORKERS=6 dealt spread-first from the 1 + 1 already running: 3 + 3.
    assert _fill("a:80,b:24", {0: 6.0, 1: 7.0}, AUTO.replace(max_workers=6)) == [3, 3]
    # 8 rows of 0.5 GB: one worker is 5.9 + 7 x 0.5 = 9.4 GB; 126 / 9.4 = 13.4 -> 13 workers x 8 rows.
    batched = fill_plan(make_plan(parse_gpu_spec("H200:140"), AUTO.replace(batch_size=8)), {0: 5.9},
                        AUTO.replace(batch_size=8), None, 0.5)
    assert (batched.gpus[0].workers, batched.gpus[0].rows, batched.gpus[0].worker_gib) == (13, 8, 9.4)
    assert "[Main] GPU 0: 13 workers x 8 rows" in plan_log_lines(batched)
    # A GPU whose first worker never measured keeps the one it runs.
    assert _fill("a:80,b:80", {0: 6.0}) == [12, 1]
    # Free memory before our first worker started caps it: 30 GB free / 6.0 = 5 (with the plan's warning).
    busy = [GPU(0, "busy", 80.0, 30.0)]
    filled = fill_plan(make_plan(busy, AUTO), {0: 6.0}, AUTO)
    assert filled.gpus[0].workers == 5 and any("only 30.00 GB free" in w for w in filled.warnings)
    # A measurement larger than the GPU: still the one worker it runs, with the plan's warning.
    small = fill_plan(make_plan(parse_gpu_spec("s:8"), AUTO), {0: 9.0}, AUTO)
    assert small.gpus[0].workers == 1 and any("the measured worker=9" in w for w in small.warnings)


def _greedy(limits: list[int], total: int, base: list[int]) -> list[int]:
    got = list(base)
    limits = [max(x, b) for x, b in zip(limits, base, strict=True)]
    while sum(got) < total:
        open_ = [i for i in range(len(limits)) if got[i] < limits[i]]
        if not open_:
            break
        got[min(open_, key=lambda k: (got[k], -limits[k], k))] += 1
    return got


def test_dealing_from_running_workers_equals_one_at_a_time() -> None:
    rng = random.Random(11)
    for _ in range(2000):
        n = rng.randint(1, 6)
        limits = [rng.randint(0, 9) for _ in range(n)]
        base = [rng.randint(0, 1) for _ in range(n)]
        total = rng.randint(sum(base), sum(limits) + sum(base) + 3)
        assert _deal(limits, total, base) == _greedy(limits, total, base), (limits, total, base)


def test_planned_gib_from_a_footprint(tiny_checkpoint: str) -> None:
    synthetic = Settings(engine="synthetic", model_memory_gb="auto")
    gib, how = planned_gib(synthetic, Footprint(int(5.86 * GIB), 199, "NVML"))
    assert gib == 5.9 and "measured one worker: 5.86 GB" in how  # rounded up to 0.1; no estimate to add
    gib, how = planned_gib(synthetic, Footprint(0, 199, "NVML unavailable (NVMLError)"))
    assert gib == 8.0 and "could not measure (NVML unavailable" in how
    # Fish: the measurement plus what the estimate adds for 30 s / 1024 frames over the warm-up's work.
    from fishmp.planning.explain import estimate_for
    from fishmp.planning.memory import estimate
    from fishmp.planning.warmup import warm_up_workload

    fish = Settings(checkpoint_dir=tiny_checkpoint, model_memory_gb="auto", max_seq_len=2560)
    worst, warm = estimate_for(fish), estimate(tiny_checkpoint, "bfloat16", 2560, workload=warm_up_workload(199))
    extra = (worst.total_bytes - worst.component("safety margin") - warm.total_bytes
             + warm.component("safety margin")) / GIB
    gib, how = planned_gib(fish, Footprint(int(2.0 * GIB), 199, "NVML"))
    assert extra > 0 and gib == pytest.approx(max(0.5, -(-(2.0 + extra) * 10 // 1) / 10)) and "estimate adds" in how


def test_longest_work_of_the_running_jobs(tmp_path, make_wav, tiny_checkpoint: str) -> None:
    """The extra over the warm-up is sized to the job: its longest reference and largest max_new_tokens."""
    from fishmp.job import load_job
    from fishmp.running.autofill import LongestWork, long_work_extra_gib, longest_work

    make_wav(str(tmp_path / "a.wav"), 3.0)
    make_wav(str(tmp_path / "b.wav"), 1.5, 16000)
    (tmp_path / "job.json").write_text(json.dumps({
        "speakers": {"a": {"reference_audio": "a.wav", "reference_text": "a"},
                     "b": {"reference_audio": "b.wav", "reference_text": "b"}},
        "segments": [{"speaker": "a", "text": "x", "params": {"max_new_tokens": 300}},
                     {"speaker": "b", "text": "y", "params": {"max_new_tokens": 120}}]}))
    work = longest_work([load_job(str(tmp_path / "job.json"))])
    assert work == LongestWork(3.0, 300)
    assert longest_work([]) == LongestWork(30.0, 1024)  # no job (a library pool): the worst case
    fish = Settings(checkpoint_dir=tiny_checkpoint, model_memory_gb="auto", max_seq_len=2560)
    assert long_work_extra_gib(fish, 199, work) < long_work_extra_gib(fish, 199)  # a shorter job, a smaller extra
    assert long_work_extra_gib(fish, 2000, LongestWork(1.0, 100)) == 0.0  # never below the measurement


def test_auto_is_refused_with_ray_in_one_line(tmp_path, fishmp_cli) -> None:
    with pytest.raises(ConfigError, match="FISH_MODEL_MEMORY_GB=auto measures and fills local GPUs only"):
        Settings(model_memory_gb="auto", backend="ray")
    out = fishmp_cli(["plan", "--gpus", "24"], str(tmp_path), {"FISH_MODEL_MEMORY_GB": "auto", "FISH_BACKEND": "ray"})
    lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
    assert out.returncode == 2 and len(lines) == 1 and "FISH_BACKEND=ray" in lines[0], out.stderr


def test_plan_command_uses_the_estimate_under_auto(tiny_checkpoint: str, tmp_path, fishmp_cli) -> None:
    from fishmp.planning.explain import auto_model_memory_gb

    gb = auto_model_memory_gb(Settings(checkpoint_dir=tiny_checkpoint))
    out = fishmp_cli(["plan", "--gpus", "24", "--json"], str(tmp_path),
                     {"FISH_MODEL_MEMORY_GB": "auto", "FISH_CHECKPOINT_DIR": tiny_checkpoint})
    assert out.returncode == 0, out.stderr
    assert f"planned here with the estimate, {gb:.1f} GB per worker" in out.stderr
    assert json.loads(out.stdout)["gpus"][0]["capacity"] == int(24 * 0.9 / gb + 1e-9)


def test_auto_fills_simulated_gpus_end_to_end(tmp_path, synthetic_job, fishmp_cli) -> None:
    """Two simulated GPUs, the synthetic engine 'measuring' 5.86 GB: 1 + 1 workers warm up and report, then
    24 x 0.9 / 5.9 = 3 and 16 x 0.9 / 5.9 = 2 (14.4 / 5.9 = 2.44): 3 more start, every segment is done."""
    job = synthetic_job({"a": [f"Line {i} of a." for i in range(8)], "b": [f"Line {i} of b." for i in range(6)]})
    env = synthetic_env(tmp_path, FISH_MODEL_MEMORY_GB="auto", FISH_SYNTHETIC_FOOTPRINT_GB="5.86",
                        FISH_SYNTHETIC_SECONDS_PER_CHAR="0.03")
    out = fishmp_cli(["generate", job, "-o", "out", "--progress", "jsonl", "--gpus", "A:24,B:16"], str(tmp_path), env)
    assert out.returncode == 0, out.stderr
    err = out.stderr
    assert "[GPU 0] measured one worker: 5.86 GB (FISH_SYNTHETIC_FOOTPRINT_GB of the synthetic engine" in err
    assert "planning 5.9 GB per worker at batch 1" in err
    assert "[GPU 0] Can run 3 workers (Available: 21.60 GB)" in err and "[GPU 1] Can run 2 workers" in err
    assert "[Main] GPU 0: 3 workers" in err and "[Main] GPU 1: 2 workers" in err
    ready = [e for e in jsonl_events(out.stdout) if e["event"] == "worker_ready"]
    assert sorted(e["device"] for e in ready) == ["cuda:0"] * 3 + ["cuda:1"] * 2 and len({e["pid"] for e in ready}) == 5
    assert json.loads(out.stdout.splitlines()[-1])["done"] == 14


def test_auto_without_a_measurement_falls_back(tmp_path, synthetic_job, fishmp_cli) -> None:
    """A simulated GPU has no NVML and no footprint knob: FISH_MODEL_MEMORY_GB's default 8.0 (24 x 0.9 / 8 = 2)."""
    job = synthetic_job({"a": [f"Line {i}." for i in range(6)]})
    out = fishmp_cli(["generate", job, "-o", "out", "--progress", "none", "--gpus", "24"], str(tmp_path),
                     synthetic_env(tmp_path, FISH_MODEL_MEMORY_GB="auto"))
    assert out.returncode == 0, out.stderr
    assert "could not measure (NVML unavailable" in out.stderr and "[Main] GPU 0: 2 workers" in out.stderr


def test_probe_runs_only_under_auto_and_on_a_gpu(monkeypatch) -> None:
    from fishmp.engines.synthetic import SyntheticEngine

    assert FootprintProbe.start(AUTO, None, True) is None  # CPU worker
    assert FootprintProbe.start(AUTO, "0", False) is None  # in-process (FISH_MULTIPROCESS_MODE=false)
    assert FootprintProbe.start(Settings(model_memory_gb=8.0), "0", True) is None  # a fixed number: no warm-up
    monkeypatch.setenv("FISH_SYNTHETIC_FOOTPRINT_GB", "3.5")
    monkeypatch.setenv("FISH_SYNTHETIC_LOAD_S", "0")
    engine = SyntheticEngine(Settings(engine="synthetic"), "cuda:0")
    fp = FootprintProbe.start(AUTO, "GPU-00000000-fake", True).finish(engine)
    assert fp.bytes == int(3.5 * GIB) and fp.frames > 0


def test_warm_up_on_the_real_engine(tiny_checkpoint: str) -> None:
    """The worker's warm-up is plan --measure's segment, run by fish-speech's real code (tiny checkpoint, CPU)."""
    from fishmp.engines import create_engine

    engine = create_engine(Settings(checkpoint_dir=tiny_checkpoint, precision="float32"), "cpu")
    engine.load()
    assert run_warm_up(engine, reference_s=2.0, new_tokens=8) > 0


def test_measured_throughput_is_cached_and_explained(tiny_checkpoint: str, tmp_path, fishmp_cli) -> None:
    """--measure on the CPU path: frames/s at 1 row and at FISH_BATCH_SIZE=2 rows go to FISH_CACHE_DIR/throughput.json;
    `plan --explain` for a GPU of that name shows them next to the alternatives with those rows."""
    settings = Settings(checkpoint_dir=tiny_checkpoint, precision="float32", batch_size=2, cache_dir=str(tmp_path / "c"))
    r = measure_gpu(None, settings, 2560, reference_s=2.0, new_tokens=16)
    assert "error" not in r, r
    assert [t["rows"] for t in r["throughput"]] == [1, 2] and all(t["frames_per_s"] > 0 for t in r["throughput"])
    cached = cached_throughput(settings.replace(max_seq_len=2560), "cpu")
    assert set(cached) == {1, 2} and cached[2]["frames_per_s"] == r["throughput"][1]["frames_per_s"]
    assert cached_throughput(settings.replace(max_seq_len=4096), "cpu") == {}  # other settings: not this entry
    out = fishmp_cli(["plan", "--explain", "--json", "--gpus", "cpu:24"], str(tmp_path),
                     {"FISH_CHECKPOINT_DIR": tiny_checkpoint, "FISH_PRECISION": "float32", "FISH_BATCH_SIZE": "2",
                      "FISH_MAX_SEQ_LEN": "2560", "FISH_CACHE_DIR": str(tmp_path / "c")})
    assert out.returncode == 0, out.stderr
    alts = {a["rows_each"]: a for a in json.loads(out.stdout)["explain"]["gpus"][0]["alternatives"]}
    assert alts[1]["frames_per_s"] == cached[1]["frames_per_s"] and alts[2]["frames_per_s"] == cached[2]["frames_per_s"]
    assert f"measured {cached[2]['frames_per_s']:.1f} frames/s per worker at 2 rows" in out.stderr


def _gpu_present() -> bool:
    from fishmp.planning.gpus import nvml_inventory

    return bool(nvml_inventory())


@pytest.mark.skipif(not _gpu_present(), reason="needs a GPU (NVML): the worker's footprint is an NVML drop")
def test_auto_measures_with_nvml_and_fills_a_real_gpu(tiny_checkpoint: str, tmp_path, make_wav, fishmp_cli) -> None:
    make_wav(str(tmp_path / "v.wav"), 2.0)
    segs = [{"id": f"{i}", "speaker": "v", "text": f"Line {i}.", "params": {"max_new_tokens": 8}} for i in range(6)]
    (tmp_path / "job.json").write_text(json.dumps({"speakers": {"v": {"reference_audio": "v.wav",
                                                                      "reference_text": "hi"}}, "segments": segs}))
    out = fishmp_cli(["generate", "job.json", "-o", "out", "--progress", "none"], str(tmp_path),
                     {"FISH_MODEL_MEMORY_GB": "auto", "FISH_CHECKPOINT_DIR": tiny_checkpoint, "FISH_MAX_WORKERS": "3",
                      "FISH_CACHE_DIR": str(tmp_path / "c")}, timeout=600)
    assert out.returncode == 0, out.stderr
    assert "measured one worker:" in out.stderr and "(NVML, after a" in out.stderr, out.stderr
    assert "[Main] Using 3 parallel workers" in out.stderr.split("measured one worker:")[-1], out.stderr
