"""The job API's review routes (issue 26) over real HTTP: a retake makes a new take with the next seed as a job of
its own on the shared pool and replaces the old take once written (kept, served as take 1, recorded in the
manifest's history), accept clears `suspect` as a recorded decision, both while the job runs and after, every
refusal as a 4xx JSON error, the event stream carrying each step, and a restarted server that keeps the reviews and
ends a retake its predecessor left running. Real server processes (synthetic engine and its bad-take markers)."""

from __future__ import annotations

import io
import json
import time
import zipfile

import numpy as np
import pytest
import soundfile as sf
from serve_helpers import Server, data_url, synthetic_env, wav_bytes
from test_server_jobs import read_sse

pytestmark = pytest.mark.timeout(300)
VOICE = wav_bytes(1.0, 150.0, seed=2)
RECOVERS = "Where were you last night? @@silent:3@@"  # seeds none, 1, 2 (the take and its retries) silent; 3 is fine
ALWAYS = "I told you, I was at home. @@clipped@@"  # every take clipped: stays suspect


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-review")
    srv = Server(tmp, synthetic_env(tmp, FISH_CPU_WORKERS="1", FISH_BATCH_SIZE="2", FISH_SHUTDOWN_GRACE_S="1"))
    yield srv.wait_ready()
    assert srv.stop() == 0, srv.log()


def job_body(segments: list[tuple[str, str]]) -> dict:
    return {"speakers": {"alice": {"reference_audio": data_url(VOICE), "reference_text": "I am Alice."}},
            "segments": [{"id": sid, "speaker": "alice", "text": text} for sid, text in segments]}


def segments(server: Server, job_id: str) -> dict[str, dict]:
    return {s["id"]: s for s in server.get(f"/v1/jobs/{job_id}").json()["segments"]}


def wait_for(what, timeout: float = 120.0, every: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


def finished_job(server: Server, segs: list[tuple[str, str]]) -> tuple[str, list]:
    job_id = server.post("/v1/jobs", json=job_body(segs)).json()["id"]
    with server.get(f"/v1/jobs/{job_id}/events", stream=True) as r:
        return job_id, read_sse(r)  # ends after `finished`


def rms(wav: bytes) -> float:
    samples, _ = sf.read(io.BytesIO(wav), dtype="float32")
    return float(np.sqrt(np.mean(samples**2)))


def test_retake_replaces_the_take_and_keeps_the_old_one(server) -> None:
    job_id, events = finished_job(server, [("s1", RECOVERS), ("s2", ALWAYS), ("ep/3", "A fine line.")])
    assert events[-1][2]["suspect"] == 2
    old = server.get(f"/v1/jobs/{job_id}/segments/s1").content
    assert rms(old) == 0.0  # the silent take that was kept
    started = server.post(f"/v1/jobs/{job_id}/segments/s1/retake", json={"by": "anna"})
    assert started.status_code == 202, started.text
    assert started.json() == {"id": job_id, "segment": "s1", "status": "retaking", "seed": 3, "take": 2}
    again = server.post(f"/v1/jobs/{job_id}/segments/s1/retake")
    assert again.status_code == 409 and again.json()["error"] == "retake running", again.text
    assert server.post(f"/v1/jobs/{job_id}/segments/s1/accept").status_code == 409
    with server.get(f"/v1/jobs/{job_id}/events", stream=True, timeout=30,
                    headers={"Last-Event-ID": str(events[-1][0])}) as r:
        review = read_sse(r)  # the job is over: the stream ends once no retake of it runs
    assert [e for _, e, _ in review] == ["retake_started", "segment_retaken"]
    assert review[0][2] == {**review[0][2], "id": "s1", "seed": 3, "take": 2, "by": "anna"}
    retaken = review[1][2]
    assert retaken["suspect"] is False and retaken["seed"] == 3 and len(retaken["history"]) == 1
    seg = segments(server, job_id)["s1"]
    assert seg["suspect"] is False and seg["seed"] == 3 and "retake" not in seg
    assert seg["takes"] == [{**seg["takes"][0], "passed": True, "seed": 3}]
    (first,) = seg["history"]
    assert first["suspect"] is True and [t["seed"] for t in first["takes"]] == [None, 1, 2]
    assert first["replaced_by"] == "anna" and first["file"] == ".takes/s1.1.wav"
    current = server.get(f"/v1/jobs/{job_id}/segments/s1").content
    assert rms(current) > 0.1 and server.get(f"/v1/jobs/{job_id}/segments/s1/takes/2").content == current
    assert server.get(f"/v1/jobs/{job_id}/segments/s1/takes/1").content == old  # the reviewer can go back
    for bad in (0, 3):
        r = server.get(f"/v1/jobs/{job_id}/segments/s1/takes/{bad}")
        assert r.status_code == 404 and r.json()["error"] == "no such take"
    manifest = server.get(f"/v1/jobs/{job_id}/manifest").json()
    assert manifest["counts"]["suspect"] == 1 and manifest["segments"]["s1"]["history"][0]["suspect"] is True
    with zipfile.ZipFile(io.BytesIO(server.get(f"/v1/jobs/{job_id}/archive").content)) as z:
        assert sorted(z.namelist()) == ["ep/3.wav", "manifest.json", "s1.wav", "s2.wav"]  # the current takes
        assert z.read("s1.wav") == current
    slash = server.post(f"/v1/jobs/{job_id}/segments/ep/3/retake")  # an id with a slash
    assert slash.status_code == 202 and slash.json()["seed"] == 1, slash.text
    done = wait_for(lambda: (s := segments(server, job_id)["ep/3"]).get("history") and "retake" not in s and s)
    assert done["seed"] == 1 and done["suspect"] is False


def test_accept_clears_suspect_as_a_recorded_decision(server) -> None:
    job_id, _ = finished_job(server, [("s2", ALWAYS), ("ok", "A fine line.")])
    r = server.post(f"/v1/jobs/{job_id}/segments/s2/accept", json={"by": "anna"})
    assert r.status_code == 200, r.text
    review = r.json()["review"]
    assert r.json()["suspect"] is False and review["decision"] == "accepted" and review["by"] == "anna"
    assert review["reasons"] == ["clipped"] and abs(review["at"] - time.time()) < 120
    manifest = server.get(f"/v1/jobs/{job_id}/manifest").json()
    assert manifest["segments"]["s2"]["review"] == review and manifest["segments"]["s2"]["suspect"] is False
    assert manifest["counts"]["suspect"] == 0
    view = server.get(f"/v1/jobs/{job_id}").json()
    assert view["counts"]["suspect"] == 0 and segments(server, job_id)["s2"]["review"] == review
    for sid, body, status, error in (
            ("s2", None, 409, "segment not suspect"),  # accepted already
            ("ok", None, 409, "segment not suspect"),  # its take passed
            ("zz", None, 404, "unknown segment"),
            ("s2", {"by": 5}, 400, "invalid body"),
            ("s2", {"who": "anna"}, 400, "invalid body")):
        r = server.post(f"/v1/jobs/{job_id}/segments/{sid}/accept", json=body)
        assert (r.status_code, r.json()["error"]) == (status, error), r.text
    r = server.post(f"/v1/jobs/{job_id}/segments/s2/accept", data="anna", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415
    assert server.post("/v1/jobs/nope/segments/s2/accept").status_code == 404
    assert server.post("/v1/jobs/nope/segments/s2/retake").json()["error"] == "unknown job"
    assert server.post(f"/v1/jobs/{job_id}/segments/zz/retake").json()["error"] == "unknown segment"


def test_reviews_while_the_job_runs(server) -> None:
    """Accept and retake a written segment while its job still runs (the edit goes through the job's own run, so
    its later saves keep it); a retake of a pending segment is refused."""
    segs = [("bad", "Clipped, and first in line. @@clipped@@")]
    segs += [(f"s{i}", f"Line {i}. @@slow=0.5@@") for i in range(20)]  # about 5 s on one worker's 2 lanes
    job_id = server.post("/v1/jobs", json=job_body(segs)).json()["id"]
    wait_for(lambda: segments(server, job_id)["bad"]["status"] == "done")
    pending = next(sid for sid, s in segments(server, job_id).items() if s["status"] == "pending")
    r = server.post(f"/v1/jobs/{job_id}/segments/{pending}/retake")
    assert r.status_code == 409 and r.json()["error"] == "segment not finished", r.text
    r = server.post(f"/v1/jobs/{job_id}/segments/bad/accept", json={"by": "bo"})
    assert r.status_code == 200, r.text
    on_disk = server.get(f"/v1/jobs/{job_id}/manifest").json()
    assert on_disk["segments"]["bad"]["review"]["by"] == "bo"  # saved at once, by the running job
    assert server.get(f"/v1/jobs/{job_id}").json()["status"] == "running", "the job ended too soon to test this"
    assert server.post(f"/v1/jobs/{job_id}/segments/bad/retake").status_code == 202
    wait_for(lambda: segments(server, job_id)["bad"].get("history"))
    assert server.get(f"/v1/jobs/{job_id}").json()["status"] == "running", "the job ended too soon to test this"
    wait_for(lambda: server.get(f"/v1/jobs/{job_id}").json()["status"] == "done", timeout=180)
    final = server.get(f"/v1/jobs/{job_id}/manifest").json()["segments"]["bad"]
    assert final["suspect"] is True and "review" not in final  # a new take: judged again, clipped again
    (old,) = final["history"]
    assert old["review"]["by"] == "bo" and old["suspect"] is False  # the accepted take, kept with its decision
    assert [t["seed"] for t in final["takes"]] == [3, 4, 5]


def test_a_restarted_server_keeps_reviews_and_ends_a_dangling_retake(tmp_path) -> None:
    env = synthetic_env(tmp_path, FISH_CPU_WORKERS="1")
    first = Server(tmp_path, env).wait_ready()
    job_id, _ = finished_job(first, [("s2", ALWAYS)])
    assert first.post(f"/v1/jobs/{job_id}/segments/s2/accept").status_code == 200
    assert first.stop() == 0
    job_dir = first.data_dir / "jobs" / job_id
    with open(job_dir / "events.jsonl", "a") as f:  # what a server killed during a retake leaves behind
        f.write(json.dumps({"event": "retake_started", "time": time.time(), "id": "s2", "seed": 7, "take": 2}) + "\n")
    (job_dir / "retakes" / "0123").mkdir(parents=True)
    second = Server(tmp_path, env, data_dir=first.data_dir).wait_ready()
    seg = segments(second, job_id)["s2"]
    assert seg["review"]["decision"] == "accepted" and seg["suspect"] is False
    assert seg["retake"]["status"] == "failed" and "server stopped" in seg["retake"]["error"]
    assert not (job_dir / "retakes").exists()
    with second.get(f"/v1/jobs/{job_id}/events", stream=True, timeout=30) as r:
        assert read_sse(r)[-1][1] == "retake_failed"  # the stream of the over job ends
    assert second.post(f"/v1/jobs/{job_id}/segments/s2/retake").json()["seed"] == 3
    wait_for(lambda: segments(second, job_id)["s2"].get("history"))
    assert second.stop() == 0
