"""FISH_BACKEND=ray: the same jobs through the same job loop, with each worker a Ray actor.

One real local Ray cluster of two nodes (two raylets on this machine, 1 CPU each, RAY_AUTH_MODE=disabled) serves every
test of this module and is shut down after it; FISH_CPU_WORKERS=1 is then one worker per node.
Jobs run through fishmp.Pool, whose worker pool is a RayWorkerPool (FISH_BACKEND=ray once wired into the api; until
then the api's pool class is swapped for the Ray one), against the local backend on the same job.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import soundfile as sf

import fishmp
from fishmp.backends import make_worker_pool
from fishmp.backends.ray_placement import NodeInventory, cluster_slots, gpu_fraction
from fishmp.config import ConfigError, Settings
from fishmp.planning.gpus import GPU
from fishmp.planning.plan import make_plan

ray = pytest.importorskip("ray", reason="the Ray backend's tests need `pip install 'fishmp[ray]'`")

SYNTH = {"engine": "synthetic", "cpu_workers": 1, "multiprocess_mode": "true", "devices": "cpu"}  # per Ray node
LOCAL = {**SYNTH, "cpu_workers": 2}  # the same 2 workers on the local backend


# ---- placement: pure, no Ray ------------------------------------------------------------------------------------
def _gpu_node(name: str, *sizes: float, cpus: float = 16) -> NodeInventory:
    gpus = tuple(GPU(i, "RTX 4090", s, s, f"GPU-{name}-{i}") for i, s in enumerate(sizes))
    return NodeInventory(f"id-{name}", name, cpus, float(len(sizes)), gpus)


def test_each_node_gets_the_single_machine_plan_and_fractions_of_its_gpus() -> None:
    nodes = [_gpu_node("10.0.0.1", 24, 24), _gpu_node("10.0.0.2", 80), NodeInventory("id-head", "10.0.0.9", 8, 0)]
    slots, plans = cluster_slots(nodes, Settings(model_memory_gb=6.0))
    by_gpu: dict[str | None, list] = {}
    for s in slots:
        by_gpu.setdefault(s.pin, []).append(s)
    assert {pin: len(v) for pin, v in by_gpu.items()} == {"GPU-10.0.0.1-0": 3, "GPU-10.0.0.1-1": 3, "GPU-10.0.0.2-0": 12}
    assert plans[0].gpus == make_plan(list(nodes[0].gpus), Settings(model_memory_gb=6.0, multiprocess_mode="true")).gpus
    assert {s.num_gpus for s in by_gpu["GPU-10.0.0.1-0"]} == {0.3333} and by_gpu["GPU-10.0.0.2-0"][0].num_gpus == 0.0833
    assert all(s.node_id != "id-head" for s in slots)  # a CPU head node of a GPU cluster runs no model
    assert slots[0].device == "10.0.0.1/cuda:0" and slots[1].node_id == "id-10.0.0.2"  # nodes interleaved
    assert all(gpu_fraction(n) * n <= 1.0 for n in range(1, 300))


def test_placement_timeout_is_a_setting() -> None:
    assert Settings().ray_placement_timeout_s == 120.0
    assert Settings.from_env({"FISH_RAY_PLACEMENT_TIMEOUT_S": "7.5"}).ray_placement_timeout_s == 7.5
    for bad in ("0", "-1", "abc", "inf"):
        with pytest.raises(ConfigError, match=f"FISH_RAY_PLACEMENT_TIMEOUT_S='{bad}' is not valid: seconds Ray"):
            Settings.from_env({"FISH_RAY_PLACEMENT_TIMEOUT_S": bad})


def test_cluster_caps_are_dealt_across_nodes_and_cpu_clusters_use_cpu_workers() -> None:
    nodes = [_gpu_node("a", 24, 24), _gpu_node("b", 24, 24)]
    slots, _ = cluster_slots(nodes, Settings(model_memory_gb=8.0, max_workers=3))
    assert [(s.address, s.pin) for s in slots] == [("a", "GPU-a-0"), ("b", "GPU-b-0"), ("a", "GPU-a-1")]
    slots, _ = cluster_slots(nodes, Settings(), n_segments=1)
    assert len(slots) == 1
    cpu_nodes = [NodeInventory("x", "x", 8, 0), NodeInventory("y", "y", 2, 0)]
    slots, _ = cluster_slots(cpu_nodes, Settings(cpu_workers=2))
    assert [(s.address, s.cpu_threads, s.num_gpus) for s in slots] == [("x", 4, 0.0), ("y", 1, 0.0), ("x", 4, 0.0),
                                                                       ("y", 1, 0.0)]
    slots, _ = cluster_slots(nodes, Settings(devices="cpu", cpu_workers=1))
    assert [s.device for s in slots] == ["a/cpu", "b/cpu"]


def test_unknown_backend_is_a_one_line_config_error() -> None:
    settings = Settings()
    object.__setattr__(settings, "backend", "yarn")  # past config.py's own check: the selector must check too
    with pytest.raises(ConfigError, match=r"^FISH_BACKEND='yarn' is not valid: local .* or ray"):
        make_worker_pool(make_plan([], settings), settings)


def test_a_bad_ray_address_is_a_one_line_config_error() -> None:
    """Runs before the module's cluster starts (this pool would otherwise join that cluster and not connect)."""
    from fishmp.backends.ray_pool import RayWorkerPool

    assert not ray.is_initialized()
    with pytest.raises(ConfigError, match=r"^FISH_RAY_ADDRESS='nonsense' is not valid: a running Ray cluster.*"
                                          r"\(Invalid address format: nonsense\)$"):
        RayWorkerPool(None, Settings(), address="nonsense")
    assert not ray.is_initialized()


# ---- one Ray cluster for this module ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster():
    from ray.cluster_utils import Cluster

    os.environ["RAY_AUTH_MODE"] = "disabled"
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    for s, h in handlers.items():  # ray.init installs its own: keep pytest's
        signal.signal(s, h)
    yield ray
    ray.shutdown()
    cluster.shutdown()


@pytest.fixture
def ray_pool(ray_cluster):
    """ray_pool(**settings) -> fishmp.Pool whose workers are Ray actors, through FISH_BACKEND=ray (a test's own
    placement timeout is the setting ray_placement_timeout_s)."""

    def make(**settings: object) -> fishmp.Pool:
        return fishmp.Pool(backend="ray", **settings)

    return make


def _job(tmp_path, make_wav, n: int = 4, fault: str = "", max_new_tokens: int = 1024) -> str:
    """Synthetic takes of these lines are ~30 frames: 1024 keeps the take check from retrying them (max_tokens)."""
    speakers = {}
    for name, seconds in (("alice", 1.0), ("bob", 1.5)):
        make_wav(str(tmp_path / f"{name}.wav"), seconds, 16000)
        speakers[name] = {"reference_audio": f"{name}.wav", "reference_text": f"I am {name}."}
    segments = [{"id": f"{name}-{i}", "speaker": name, "text": f"Line {i} of {name}, said clearly." + fault * (i == 1)}
                for name in speakers for i in range(n)]
    path = tmp_path / "job.json"
    params = {"max_new_tokens": max_new_tokens, "seed": 3}
    path.write_text(json.dumps({"speakers": speakers, "segments": segments, "params": params}))
    return str(path)


def _statuses(result) -> dict[str, str]:
    return {sid: rec.status for sid, rec in result.records.items()}


def _audio(directory, sid: str) -> np.ndarray:
    return sf.read(os.path.join(directory, f"{sid}.wav"))[0]


# ---- the real loop on Ray --------------------------------------------------------------------------------------------
def test_synthetic_job_on_ray_matches_the_local_backend(tmp_path, make_wav, ray_pool, monkeypatch) -> None:
    monkeypatch.setenv("FISH_SYNTHETIC_LOAD_S", "0.1")
    job = _job(tmp_path, make_wav)
    with fishmp.Pool(cache_dir=str(tmp_path / "c1"), **LOCAL) as pool:
        local = pool.generate(job, output_dir=str(tmp_path / "local"))
    events: list[dict] = []
    with ray_pool(cache_dir=str(tmp_path / "c2"), **SYNTH) as pool:
        remote = pool.generate(job, output_dir=str(tmp_path / "ray"), on_event=events.append)
    assert remote.exit_code == 0 and _statuses(remote) == _statuses(local) == dict.fromkeys(_statuses(local), "done")
    for sid in local.records:  # the same samples, written here from bytes the actors sent back
        assert np.array_equal(_audio(tmp_path / "local", sid), _audio(tmp_path / "ray", sid))
    manifest = json.loads((tmp_path / "ray" / "manifest.json").read_text())
    assert {s["status"] for s in manifest["segments"].values()} == {"done"}
    ready = [e for e in events if e["event"] == "worker_ready"]
    assert len(ready) == 2 and all(e["device"].endswith("/cpu") for e in ready)
    assert len({e["device"] for e in ready}) == 2  # one worker on each node ("IP#node-id/cpu": both are this host)
    assert {e["worker"] for e in events if e["event"] == "segment_done"} == {"w0", "w1"}
    assert os.getpid() not in {e["pid"] for e in ready}  # actors, not this process
    assert [e for e in events if e["event"] == "plan"][0]["mode"] == "ray"
    assert not [p for p in os.listdir(tmp_path / "ray") if p.startswith(".fishmp-tmp")]


def test_killed_actor_mid_job_loses_nothing(tmp_path, make_wav, ray_pool, monkeypatch, capfd) -> None:
    """SIGKILL an actor's process while it runs a segment: the segment is requeued, the actor replaced, all done.
    Ray's own note about the dead worker goes to the log, not to stdout (which carries fishmp's machine output)."""
    monkeypatch.setenv("FISH_SYNTHETIC_LOAD_S", "0.1")
    monkeypatch.setenv("FISH_SYNTHETIC_SECONDS_PER_CHAR", "0.01")  # ~0.3 s per segment: time to kill one mid-way
    job = _job(tmp_path, make_wav, n=5)
    events: list[dict] = []
    killed: list[int] = []

    def on_event(ev: dict) -> None:
        events.append(ev)
        if ev["event"] == "segment_done" and not killed and ev.get("worker") == "w0":
            killed.append(ev["pid"])
            os.kill(ev["pid"], signal.SIGKILL)  # w0 has its next segment running or queued now

    with ray_pool(cache_dir=str(tmp_path / "c"), **SYNTH) as pool:
        result = pool.generate(job, output_dir=str(tmp_path / "out"), on_event=on_event)
        restarts = list(pool._workers.restarts)
    assert result.exit_code == 0 and result.count("done") == 10
    died = [e for e in events if e["event"] == "worker_died"]
    assert len(died) == 1 and died[0]["worker"] == "w0" and died[0]["pid"] == killed[0]
    assert "its Ray actor on" in died[0]["reason"] and "died" in died[0]["reason"], died
    # One replacement was started for w0's slot; under load the job can end (w1 doing the requeued work) before
    # the replacement actor is ready, so count the restart, not a worker_ready event.
    assert restarts == [1, 0]
    replacements = {e["worker"] for e in events if e["event"] == "worker_ready"} - {"w0", "w1"}
    assert len(replacements) <= 1
    assert [e for e in events if e["event"] == "segment_requeued"]
    done_ids = [e["id"] for e in events if e["event"] == "segment_done"]
    assert sorted(done_ids) == sorted(result.records)  # each exactly once
    for sid in done_ids:
        assert sf.info(str(tmp_path / "out" / f"{sid}.wav")).frames > 0
    time.sleep(1.0)  # Ray's error listener is a background thread
    assert "raylet" not in capfd.readouterr().out
    import glob
    import tempfile

    pids = {e["pid"] for e in events if e["event"] == "worker_ready"}
    if not replacements:  # the job ended before the replacement was ready: nobody on that node has swept yet
        pids.discard(killed[0])
    # The killed actor's temp dir was swept by its replacement; the others removed theirs when the pool closed.
    assert not [p for pid in pids for p in glob.glob(os.path.join(tempfile.gettempdir(), f"fishmp-ray-out-{pid}-*"))]


def test_hung_segment_past_its_deadline_kills_the_actor_and_is_redone(tmp_path, make_wav, ray_pool, monkeypatch) -> None:
    monkeypatch.setenv("FISH_SYNTHETIC_LOAD_S", "0.1")
    monkeypatch.setenv("FISH_SYNTHETIC_STATE_DIR", str(tmp_path / "state"))
    job = _job(tmp_path, make_wav, n=2, fault=" @@hang-once@@")
    events: list[dict] = []
    with ray_pool(cache_dir=str(tmp_path / "c"), segment_timeout_s=2.0, segment_timeout_per_char_s=0.0,
                  segment_timeout_per_frame_s=0.0, **SYNTH) as pool:
        result = pool.generate(job, output_dir=str(tmp_path / "out"), on_event=events.append)
    assert result.exit_code == 0 and result.count("done") == 4, result.error
    died = [e for e in events if e["event"] == "worker_died"]
    assert died and all("deadline" in e["reason"] for e in died)


def test_stop_request_interrupts_the_job_and_frees_the_cluster(tmp_path, make_wav, ray_pool, monkeypatch) -> None:
    """SIGTERM's path (pool.request_stop): dispatch stops, the manifest is written, exit 143; close frees every CPU."""
    monkeypatch.setenv("FISH_SYNTHETIC_LOAD_S", "0.1")
    monkeypatch.setenv("FISH_SYNTHETIC_SECONDS_PER_CHAR", "0.01")
    job = _job(tmp_path, make_wav, n=8)
    with ray_pool(cache_dir=str(tmp_path / "c"), shutdown_grace_s=5.0, **SYNTH) as pool:
        def on_event(ev: dict) -> None:
            if ev["event"] == "segment_done":
                pool.request_stop(signal.SIGTERM)

        result = pool.generate(job, output_dir=str(tmp_path / "out"), on_event=on_event)
    assert result.exit_code == 143 and 0 < result.count("done") < 16 and result.count("pending") > 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert sorted(manifest["segments"]) == sorted(result.records)
    deadline = time.monotonic() + 10
    while ray.available_resources().get("CPU", 0) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert ray.available_resources().get("CPU", 0) == 2  # every actor is gone


def test_an_actor_ray_cannot_place_is_reported_and_its_slot_dropped(tmp_path, make_wav, ray_pool, monkeypatch) -> None:
    """Two CPU workers per node on 1-CPU nodes: the second on each never gets its CPU; both are reported after the
    placement timeout, their slots are not retried, and the job goes on with one worker per node."""
    monkeypatch.setenv("FISH_SYNTHETIC_LOAD_S", "0.1")
    # One 14 s segment: the job outlasts the placement timeout, which leaves the placeable actors time to start even
    # on a loaded machine (an actor counts as placed once its process has started and imported fishmp).
    job = _job(tmp_path, make_wav, n=2, fault=" @@slow=14@@")
    events: list[dict] = []
    t0 = time.monotonic()
    with ray_pool(ray_placement_timeout_s=10.0, cache_dir=str(tmp_path / "c"), **{**SYNTH, "cpu_workers": 2}) as pool:
        result = pool.generate(job, output_dir=str(tmp_path / "out"), on_event=events.append)
    assert result.exit_code == 0 and result.count("done") == 4
    died = [e for e in events if e["event"] == "worker_died"]
    assert sorted(e["worker"] for e in died) == ["w2", "w3"], died  # slots interleave nodes: w0 a, w1 b, w2 a, w3 b
    assert all("could not place it" in e["reason"] and "ray status" in e["reason"] for e in died)
    assert {e["worker"] for e in events if e["event"] == "worker_ready"} == {"w0", "w1"}  # not retried
    assert time.monotonic() - t0 < 40


def test_the_selector_gives_the_ray_pool_for_fish_backend_ray(ray_cluster) -> None:
    from fishmp.backends.ray_pool import RayWorkerPool

    settings = Settings(engine="synthetic", cpu_workers=2, backend="ray", ray_placement_timeout_s=30.0,
                        load_timeout_s=5.0)
    pool = make_worker_pool(make_plan([], settings), settings, n_segments=1)
    try:
        assert isinstance(pool, RayWorkerPool) and len(pool.ray_slots) == 1 and len(pool.handles) == 1  # job-sized
        assert pool.placement_timeout_s == 5.0  # placement never waits longer than a load may take
    finally:
        pool.close()


def test_gpu_actors_ask_ray_for_their_fraction_and_are_reported_when_it_has_none(ray_cluster) -> None:
    """A (simulated) 24 GB GPU on this CPU-only node: two actors ask for 0.5 GPU each; Ray has none to give, so both
    are reported as unplaceable at once (Ray knows this node can never fit them) instead of waiting forever."""
    from fishmp.backends.ray_pool import RayWorkerPool

    node = next(n for n in ray.nodes() if n["Alive"])
    sim = NodeInventory(node["NodeID"], node["NodeManagerAddress"], 2, 1, (GPU(0, "Simulated", 24, 24, "GPU-sim-0"),))
    pool = RayWorkerPool(None, Settings(engine="synthetic", model_memory_gb=8.0, ray_placement_timeout_s=1.0),
                         nodes=[sim])
    try:
        assert [s.num_gpus for s in pool.ray_slots] == [0.5, 0.5] and pool.plan.mode == "ray"
        exits, t0 = [], time.monotonic()
        while len(exits) < 2 and time.monotonic() - t0 < 20:
            exits += [(h, code) for kind, h, code in pool.poll(1.0) if kind == "exit"]
        assert len(exits) == 2 and time.monotonic() - t0 < 10
        assert all("could not place it" in h.kill_reason and "asks for 0.5 GPU" in h.kill_reason for h, _ in exits), exits
        assert pool.dropped == {0, 1} and pool.respawn(0) is None
    finally:
        pool.close()


def test_references_travel_with_the_work(tmp_path, make_wav, ray_pool, monkeypatch) -> None:
    """No shared disk assumed: the actor reads a node-local, content-named copy of the reference, not the main path."""
    import tempfile

    monkeypatch.setenv("FISH_SYNTHETIC_LOAD_S", "0.1")
    job = _job(tmp_path, make_wav, n=1)
    with ray_pool(cache_dir=str(tmp_path / "c"), **SYNTH) as pool:
        result = pool.generate(job, output_dir=str(tmp_path / "out"))
    assert result.exit_code == 0
    import hashlib

    for name in ("alice", "bob"):
        digest = hashlib.sha256((tmp_path / f"{name}.wav").read_bytes()).hexdigest()
        assert os.path.isfile(os.path.join(tempfile.gettempdir(), "fishmp-ray-refs", digest + ".wav"))
        # encoded from the copy: the cache is keyed by content, so the main node's entry would match it
        assert any(f.startswith(digest) for f in os.listdir(tmp_path / "c"))


def test_legacy_encode_on_ray_writes_the_npy_here(tmp_path, make_wav, ray_pool, monkeypatch) -> None:
    from fishmp.job import load_encode_config

    monkeypatch.setenv("FISH_SYNTHETIC_LOAD_S", "0.1")
    make_wav(str(tmp_path / "s3.wav"), 1.0, 16000)
    config = {"mode": "encode", "checkpoint_dir": "unused", "output_dir": str(tmp_path / "npy"), "speakers": [
        {"speaker_id": 3, "reference_audio": str(tmp_path / "s3.wav"), "reference_text": "hi",
         "output_npy": str(tmp_path / "npy" / "speaker_3.npy")}]}
    (tmp_path / "enc.json").write_text(json.dumps(config))
    job = load_encode_config(str(tmp_path / "enc.json"))
    with ray_pool(cache_dir=str(tmp_path / "c"), **SYNTH) as pool:
        errors = pool.encode(job)
    assert errors == {}
    tokens = np.load(tmp_path / "npy" / "speaker_3.npy")
    assert tokens.shape == (10, round(1.0 * 21.53))


@pytest.mark.slow
def test_tiny_fish_checkpoint_on_ray_matches_the_local_backend(tmp_path, make_wav, tiny_checkpoint, ray_pool) -> None:
    job = _job(tmp_path, make_wav, n=1, max_new_tokens=8)  # random weights never end a take: one take each
    fish = {"engine": "fish", "checkpoint_dir": tiny_checkpoint, "devices": "cpu", "cpu_workers": 1, "max_workers": 1,
            "multiprocess_mode": "true", "precision": "float32", "take_retries": 0}
    with fishmp.Pool(cache_dir=str(tmp_path / "c1"), **{**fish, "multiprocess_mode": "false"}) as pool:  # in-process
        local = pool.generate(job, output_dir=str(tmp_path / "local"))
    with ray_pool(cache_dir=str(tmp_path / "c2"), **fish) as pool:
        remote = pool.generate(job, output_dir=str(tmp_path / "ray"))
    assert local.exit_code == 0 and remote.exit_code == 0
    assert _statuses(remote) == _statuses(local)
    for sid in local.records:  # same seed, same model, same prompt: the same tokens
        assert remote.records[sid].tokens == local.records[sid].tokens
        assert sf.info(str(tmp_path / "ray" / f"{sid}.wav")).frames == sf.info(str(tmp_path / "local" / f"{sid}.wav")).frames


LOSE_THE_HEAD = """
import json, os, subprocess, sys, time
from ray.cluster_utils import Cluster

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
pids = [p.process.pid for n in cluster.list_all_nodes() for ps in n.all_processes.values() for p in ps]
env = dict(os.environ, FISH_RAY_ADDRESS=cluster.address, RAY_gcs_rpc_server_reconnect_timeout_s="16")
cli = subprocess.Popen([sys.executable, "-m", "fishmp", "generate", sys.argv[1], "-o", sys.argv[2], "--progress",
                        "jsonl"], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
for line in cli.stdout:
    if json.loads(line)["event"] == "segment_done":
        break
t0 = time.monotonic()
cluster.head_node.kill_all_processes(check_alive=False, allow_graceful=False)
out, err = cli.communicate(timeout=120)
took = time.monotonic() - t0
cluster.shutdown()
print(json.dumps({"rc": cli.returncode, "last": out.strip().splitlines()[-1], "stderr": err, "took": took,
                  "pids": pids}))
"""


def test_losing_the_head_node_ends_the_job_with_a_message_manifest_and_result(tmp_path, make_wav) -> None:
    """Issue 25: the driver ended with no fishmp message and no result line (Ray ends a driver that cannot reach its
    GCS). A cluster of its own, in a process of its own (this module's cluster is not touched)."""
    make_wav(str(tmp_path / "v.wav"), 1.0, 16000)
    job = str(tmp_path / "job.json")
    (tmp_path / "job.json").write_text(json.dumps({
        "speakers": {"v": {"reference_audio": "v.wav", "reference_text": "I am v."}},
        "segments": [{"id": f"s{i:02d}", "speaker": "v", "text": f"Line {i} @@slow=1.5@@."} for i in range(24)]}))
    (tmp_path / "lose.py").write_text(LOSE_THE_HEAD)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
    env.update(FISH_ENGINE="synthetic", FISH_BACKEND="ray", FISH_CPU_WORKERS="1", FISH_DEVICES="cpu",
               FISH_MULTIPROCESS_MODE="true", FISH_SYNTHETIC_LOAD_S="0.1", FISH_CACHE_DIR=str(tmp_path / "c"),
               RAY_AUTH_MODE="disabled")
    run = subprocess.run([sys.executable, str(tmp_path / "lose.py"), job, str(tmp_path / "out")], env=env,
                         capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["rc"] == 1, report["stderr"][-3000:]
    result = json.loads(report["last"])  # the result line is the last line, and says what happened
    assert result["done"] >= 1 and result["done"] + result["failed"] == 24 and result["exit_code"] == 1
    assert "lost the Ray cluster's head node" in report["stderr"] and "Traceback" not in report["stderr"]
    assert "The program will terminate" not in report["stderr"]  # fishmp ended it, not Ray
    segs = json.loads((tmp_path / "out" / "manifest.json").read_text())["segments"]
    assert {r["status"] for r in segs.values()} <= {"done", "failed"}
    assert all("head node" in r["error"] for r in segs.values() if r["status"] == "failed")
    assert sum(r["status"] == "done" for r in segs.values()) == result["done"]
    assert report["took"] < 60  # before Ray's own end of the driver
    deadline = time.monotonic() + 20
    while any(os.path.exists(f"/proc/{p}") for p in report["pids"]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in report["pids"] if os.path.exists(f"/proc/{p}")]
