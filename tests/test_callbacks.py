"""`on_event` callbacks run off the job loop (fishmp/running/delivery.py): one that raises, sleeps, waits, re-enters the
pool or closes it costs only its own job. Real worker processes (synthetic engine) through fishmp.Pool."""

from __future__ import annotations

import json
import os
import threading
import time

import pytest

import fishmp
from fishmp.api import PoolError

pytestmark = pytest.mark.timeout(180)


@pytest.fixture
def voice(tmp_path, make_wav) -> str:
    return make_wav(str(tmp_path / "v.wav"), 1.0, 16000)


def job_dict(voice: str, prefix: str, n: int, slow: float = 0.0) -> dict:
    marker = f" @@slow={slow}@@" if slow else ""
    return {"speakers": {f"{prefix}s": {"reference_audio": voice, "reference_text": "hi"}},
            "segments": [{"id": f"{prefix}{i}", "speaker": f"{prefix}s", "text": f"Line {i}.{marker}"}
                         for i in range(n)]}


def synthetic_pool(tmp_path, workers: int = 2, **kw) -> fishmp.Pool:
    return fishmp.Pool(engine="synthetic", cpu_workers=workers, multiprocess_mode="true", devices="cpu",
                       cache_dir=str(tmp_path / "cache"), **kw)


def statuses(out) -> dict[str, str]:
    with open(os.path.join(str(out), "manifest.json")) as f:
        return {sid: r["status"] for sid, r in json.load(f)["segments"].items()}


def assert_gone(pids: list[int], within_s: float = 10.0) -> None:
    deadline = time.monotonic() + within_s
    while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [p for p in pids if os.path.exists(f"/proc/{p}")]


@pytest.mark.parametrize("kind", ["plan", "segment_done", "finished"])
def test_a_raising_callback_costs_only_itself(kind, tmp_path, voice, clean_env) -> None:
    """Issue 25 item 1: the other job, the pool and the raising job's own work carry on; the error is reported."""
    def bad(ev: dict) -> None:
        if ev["event"] == kind:
            raise RuntimeError("the backend's bug")

    good: list[dict] = []
    with synthetic_pool(tmp_path) as pool:
        h_bad = pool.submit(job_dict(voice, "a-", 6, slow=0.1), output_dir=str(tmp_path / "a"), on_event=bad)
        h_good = pool.submit(job_dict(voice, "b-", 6, slow=0.1), output_dir=str(tmp_path / "b"), on_event=good.append)
        r_bad, r_good = h_bad.result(timeout=60), h_good.result(timeout=60)
        assert r_bad.exit_code == 0 and r_bad.count("done") == 6
        assert r_bad.callback_error and "RuntimeError: the backend's bug" in r_bad.callback_error
        assert f"at a {kind} event" in r_bad.callback_error
        assert r_good.exit_code == 0 and r_good.callback_error is None
        assert good[0]["event"] == "plan" and good[-1]["event"] == "finished" and good[-1]["done"] == 6
        assert set(statuses(tmp_path / "a").values()) == set(statuses(tmp_path / "b").values()) == {"done"}
        later = pool.generate(job_dict(voice, "c-", 2), output_dir=str(tmp_path / "c"))  # the pool is not closed
        assert later.exit_code == 0 and later.count("done") == 2


def test_a_slow_callback_does_not_stall_the_deadlines(tmp_path, voice, clean_env) -> None:
    """Issue 25 item 2: a callback sleeping past FISH_SEGMENT_TIMEOUT_S must not get healthy workers killed."""
    events: list[dict] = []

    def slow(ev: dict) -> None:
        events.append(ev)
        if ev["event"] == "segment_done" and sum(e["event"] == "segment_done" for e in events) == 1:
            time.sleep(5.0)

    with synthetic_pool(tmp_path, segment_timeout_s=3.0, segment_timeout_per_char_s=0.0,
                        segment_timeout_per_frame_s=0.0) as pool:
        result = pool.generate(job_dict(voice, "a-", 6, slow=0.6), output_dir=str(tmp_path / "a"), on_event=slow)
    assert result.exit_code == 0 and result.count("done") == 6
    assert not [e for e in events if e["event"] in ("worker_died", "segment_requeued")]
    assert {r.attempts for r in result.records.values()} == {1}
    assert events[-1]["event"] == "finished"  # delivered before generate returned


def test_a_blocked_callback_delays_only_its_own_job(tmp_path, voice, clean_env) -> None:
    release = threading.Event()
    mine: list[dict] = []

    def stuck(ev: dict) -> None:
        mine.append(ev)
        if ev["event"] == "segment_done":
            release.wait(60)

    with synthetic_pool(tmp_path) as pool:
        held = pool.submit(job_dict(voice, "a-", 4), output_dir=str(tmp_path / "a"), on_event=stuck)
        other_events: list[dict] = []
        other = pool.submit(job_dict(voice, "b-", 4), output_dir=str(tmp_path / "b"), on_event=other_events.append)
        assert other.result(timeout=60).exit_code == 0  # while the first job's callback is still blocked
        assert other_events[-1]["event"] == "finished" and not held.done()
        # its work goes on; only its events wait (the manifest is saved at most once a second while the job runs,
        # and b may finish before a's last rows do, so wait for it rather than read it once)
        deadline = time.monotonic() + 30
        while set(statuses(tmp_path / "a").values()) != {"done"} and time.monotonic() < deadline:
            time.sleep(0.1)
        assert set(statuses(tmp_path / "a").values()) == {"done"} and not held.done()
        release.set()
        result = held.result(timeout=60)
    assert result.exit_code == 0
    kinds = [e["event"] for e in mine]
    assert kinds[0] == "plan" and kinds[-1] == "finished" and kinds.count("segment_done") == 4
    assert [e["time"] for e in mine] == sorted(e["time"] for e in mine)  # in order


def test_generate_from_a_callback_raises_and_submit_works(tmp_path, voice, clean_env) -> None:
    seen: dict[str, object] = {}

    def reenter(ev: dict) -> None:
        if ev["event"] != "plan":
            return
        try:
            pool.generate(job_dict(voice, "x-", 1), output_dir=str(tmp_path / "x"))
        except PoolError as exc:
            seen["error"] = exc
        seen["handle"] = pool.submit(job_dict(voice, "y-", 2), output_dir=str(tmp_path / "y"))

    with synthetic_pool(tmp_path) as pool:
        outer = pool.submit(job_dict(voice, "a-", 2), output_dir=str(tmp_path / "a"), on_event=reenter)
        assert outer.result(timeout=60).exit_code == 0
        assert isinstance(seen.get("error"), PoolError) and "on_event callback" in str(seen["error"])
        assert "submit" in str(seen["error"])
        assert seen["handle"].result(timeout=60).count("done") == 2
        assert not os.path.exists(tmp_path / "x" / "manifest.json")


def test_result_of_its_own_job_from_its_callback_raises(tmp_path, voice, clean_env) -> None:
    seen: list[BaseException] = []
    box: dict[str, fishmp.JobHandle] = {}
    ready = threading.Event()

    def wait_on_myself(ev: dict) -> None:
        if ev["event"] == "segment_done" and not seen:
            ready.wait(30)
            try:
                box["h"].result(timeout=5)
            except PoolError as exc:
                seen.append(exc)

    with synthetic_pool(tmp_path, workers=1) as pool:
        box["h"] = pool.submit(job_dict(voice, "a-", 2), output_dir=str(tmp_path / "a"), on_event=wait_on_myself)
        ready.set()
        assert box["h"].result(timeout=60).exit_code == 0
    assert seen and "own on_event callback" in str(seen[0])


def test_close_from_a_callback_returns_and_ends_the_jobs(tmp_path, voice, clean_env) -> None:
    """README: close() ends running jobs at once as interrupted, manifests written, workers gone."""
    pids: list[int] = []
    closed: list[str] = []

    def closer(ev: dict) -> None:
        if ev["event"] == "worker_ready":
            pids.append(ev["pid"])
        if ev["event"] == "segment_done" and not closed:
            try:
                pool.close()
                closed.append("returned")
            except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
                closed.append(repr(exc))

    pool = synthetic_pool(tmp_path)
    result = pool.generate(job_dict(voice, "a-", 12, slow=0.3), output_dir=str(tmp_path / "a"), on_event=closer)
    assert closed == ["returned"]
    assert result.exit_code == 143 and not result.cancelled
    on_disk = statuses(tmp_path / "a")
    assert "done" in on_disk.values() and "pending" in on_disk.values() and "failed" not in on_disk.values()
    assert on_disk == {sid: r.status for sid, r in result.records.items()}
    with pytest.raises(PoolError, match="closed"):
        pool.submit(job_dict(voice, "b-", 1), output_dir=str(tmp_path / "b"))
    assert_gone(pids)
