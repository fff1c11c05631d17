"""GPU telemetry (issue 15): the aggregation with real numbers, the sampler thread, the service's gpu events and
manifest summary, and that a machine without a GPU prints and records nothing about GPUs.

This machine has no NVML: NvmlReader is the only part that talks to NVML and it is exercised by the lead on a GPU
(see the README's telemetry section). The service-level test replaces only the NVML read by a function that returns
real figures, with the real worker processes' pids, so everything after the read runs as on a GPU."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest
from conftest import jsonl_events, synthetic_env

import fishmp
from fishmp.config import Settings
from fishmp.planning.gpus import GPU
from fishmp.planning.plan import make_plan
from fishmp.running.service import Service
from fishmp.running.telemetry import GpuSample, GpuStats, NvmlReader, PoolTelemetry, Sampler, sample_fields

pytestmark = pytest.mark.timeout(180)


def s(index: int, used: float, util: float | None, procs: dict[int, float] | None = None, total: float = 80.0,
      name: str = "NVIDIA H100") -> GpuSample:
    return GpuSample(index, name, used, total - used, total, util, procs or {})


def test_stats_peak_mean_and_min_free_per_gpu() -> None:
    stats = GpuStats()
    assert not stats and stats.summary() == {}
    workers = {101: "w0", 102: "w1"}
    stats.add([s(0, 10.0, 40.0, {101: 6.5, 999: 1.0}), s(1, 4.0, None)], workers)
    stats.add([s(0, 30.0, 100.0, {101: 7.25, 102: 6.0}), s(1, 8.0, None)], workers)
    stats.add([s(0, 20.0, None, {101: 7.0})], workers)
    out = stats.summary()
    assert list(out) == ["0", "1"]
    g0 = out["0"]
    assert g0["samples"] == 3 and g0["name"] == "NVIDIA H100" and g0["total_gib"] == 80.0
    assert g0["used_gib_peak"] == 30.0 and g0["used_gib_mean"] == 20.0 and g0["free_gib_min"] == 50.0
    assert g0["util_pct_peak"] == 100.0 and g0["util_pct_mean"] == 70.0  # the sample without utilisation is left out
    assert g0["workers_gib_peak"] == {"w0": 7.25, "w1": 6.0}  # pid 999 is not a fishmp worker
    g1 = out["1"]
    assert g1["samples"] == 2 and g1["used_gib_mean"] == 6.0 and g1["util_pct_peak"] is None
    assert g1["util_pct_mean"] is None and g1["workers_gib_peak"] == {}


def test_sample_fields_name_workers_and_others() -> None:
    fields = sample_fields([s(0, 12.3456, 87.0, {101: 6.0, 555: 2.5}), s(1, 1.0, None)], {101: "w0"})
    assert fields[0] == {"index": 0, "name": "NVIDIA H100", "used_gib": 12.346, "free_gib": 67.654,
                         "total_gib": 80.0, "util_pct": 87.0, "workers_gib": {"w0": 6.0}, "others_gib": 2.5}
    assert "others_gib" not in fields[1] and fields[1]["workers_gib"] == {}  # NVML gave no processes


def test_sampler_samples_only_while_busy() -> None:
    got: list[list[GpuSample]] = []
    calls = []

    def read() -> list[GpuSample]:
        calls.append(time.monotonic())
        return [s(0, 1.0 + len(calls), 50.0)]

    sampler = Sampler(read, 0.05, got.append)
    try:
        time.sleep(0.3)
        assert calls == []  # no job: no sampling
        sampler.set_busy(True)
        deadline = time.monotonic() + 10
        while len(got) < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(got) >= 3 and got[0][0].used_gib == 2.0
        sampler.set_busy(False)
        time.sleep(0.15)
        n = len(calls)
        time.sleep(0.3)
        assert len(calls) == n
    finally:
        sampler.stop()
    assert not sampler.thread.is_alive()


def test_sampler_survives_a_failing_read() -> None:
    got: list[list[GpuSample]] = []
    n = {"calls": 0}

    def read() -> list[GpuSample]:
        n["calls"] += 1
        if n["calls"] == 1:
            raise RuntimeError("NVML hiccup")
        return [s(0, 5.0, 10.0)]

    sampler = Sampler(read, 0.05, got.append)
    sampler.set_busy(True)
    deadline = time.monotonic() + 10
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    sampler.stop()
    assert got and n["calls"] >= 2


def test_no_gpu_means_no_reader_and_no_telemetry(tmp_path) -> None:
    assert NvmlReader.open([]) is None
    assert NvmlReader.open(["0", "GPU-00000000-0000-0000-0000-000000000000"]) is None  # no NVML here / no such GPU
    settings = Settings(engine="synthetic", devices="cpu", cache_dir=str(tmp_path / "c"))
    plan = make_plan([], settings)

    class Slots:  # what PoolTelemetry.open reads of a WorkerPool
        def __init__(self, slots: list) -> None:
            self.settings, self.slots = settings, slots

    assert PoolTelemetry.open(Slots(plan.slots())) is None  # a CPU plan: nothing to sample
    off = Settings(engine="synthetic", telemetry_interval_s=0, cache_dir=str(tmp_path / "c"))
    gpu_plan = make_plan([GPU(0, "NVIDIA H100", 80.0, 80.0, "GPU-x")], off)
    slots = Slots(gpu_plan.slots())
    slots.settings = off
    assert PoolTelemetry.open(slots) is None  # FISH_TELEMETRY_INTERVAL_S=0


def test_cli_without_gpu_prints_and_records_nothing_about_gpus(tmp_path, synthetic_job, fishmp_cli) -> None:
    job = synthetic_job({"a": [f"Line {i}." for i in range(6)], "b": ["Hello there."]})
    env = synthetic_env(tmp_path, FISH_TELEMETRY_INTERVAL_S="0.05", FISH_SYNTHETIC_SECONDS_PER_CHAR="0.01")
    r = fishmp_cli(["generate", job, "-o", "out", "--progress", "jsonl"], str(tmp_path), env)
    assert r.returncode == 0, r.stderr
    events = jsonl_events(r.stdout)
    assert [e for e in events if e["event"] == "gpu"] == []
    assert "gpus" not in events[-1] and events[-1]["event"] == "finished"
    with open(tmp_path / "out" / "manifest.json") as f:
        assert "gpus" not in json.dumps(json.load(f).get("summary", {}))
    plain = fishmp_cli(["generate", job, "-o", "out2", "--progress", "plain"], str(tmp_path), env)
    assert plain.returncode == 0, plain.stderr
    # the plan's own "No usable GPU: using N worker(s) on the CPU" is the only line that may name GPUs
    about_gpus = [ln for ln in plain.stderr.splitlines() if re.search(r"\[GPU \d|\bgpu\d|utilisation", ln)]
    assert about_gpus == [], plain.stderr


def test_service_emits_gpu_events_and_the_job_summary(tmp_path, make_wav, monkeypatch) -> None:
    """Everything after the NVML read, with real worker processes: their pids become worker ids in the events."""
    for k in [k for k in os.environ if k.startswith("FISH_")]:
        monkeypatch.delenv(k)
    voice = make_wav(str(tmp_path / "v.wav"), 1.0, 16000)
    job = {"speakers": {"a": {"reference_audio": voice, "reference_text": "hi"}},
           "segments": [{"id": f"s{i}", "speaker": "a", "text": f"Line {i}. @@slow=0.1@@"} for i in range(8)]}
    events: list[dict] = []
    lock = threading.Lock()
    with fishmp.Pool(engine="synthetic", cpu_workers=2, multiprocess_mode="true", devices="cpu",
                     cache_dir=str(tmp_path / "cache")) as pool:
        workers = pool._workers
        used = iter([10.0, 30.0, 20.0] + [20.0] * 1000)

        def read() -> list[GpuSample]:  # real figures, the real workers' pids
            pids = [h.pid for h in list(workers.handles.values()) if h.pid]
            return [s(0, next(used), 90.0, {p: 3.0 for p in pids} | {424242: 1.5})]

        pool._service = Service(workers)
        pool._service.telemetry = PoolTelemetry(workers, read, 0.1)

        def on_event(ev: dict) -> None:
            with lock:
                events.append(ev)

        res = pool.generate(job, output_dir=str(tmp_path / "out"), on_event=on_event)
    assert res.ok
    gpu = [e for e in events if e["event"] == "gpu"]
    assert len(gpu) >= 2
    first = gpu[0]["gpus"][0]
    assert first["used_gib"] == 10.0 and first["util_pct"] == 90.0 and first["others_gib"] == 1.5
    assert set(first["workers_gib"]) <= {"w0", "w1"} and first["workers_gib"]
    summary = events[-1]["gpus"]["0"]
    assert events[-1]["event"] == "finished" and summary["samples"] == len(gpu)
    assert summary["used_gib_peak"] == 30.0 and summary["util_pct_mean"] == 90.0
    assert set(summary["workers_gib_peak"]) <= {"w0", "w1"} and summary["workers_gib_peak"]["w0"] == 3.0
    with open(tmp_path / "out" / "manifest.json") as f:
        assert json.load(f)["summary"]["gpus"] == events[-1]["gpus"]  # the manifest's summary says the same
