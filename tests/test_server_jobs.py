"""`fishmp serve`'s job API end to end (issue 23): a job with a stored voice and a data-URL voice, its event stream
read as an SSE client reads it (late, and resumed with Last-Event-ID), its wavs, manifest and archive, cancel, paths
only inside --root, a single line next to a long job on one worker, restart and resume, SIGTERM with a line in
flight and no process left, and the refusals at start. Real server processes (synthetic engine)."""

from __future__ import annotations

import io
import json
import signal
import threading
import time
import zipfile

import pytest
import requests
from serve_helpers import Server, b64, data_url, free_port, synthetic_env, wav_bytes

pytestmark = pytest.mark.timeout(300)
VOICE = wav_bytes(1.0, 150.0, seed=2)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-jobs")
    (tmp / "root" / "refs").mkdir(parents=True)
    (tmp / "root" / "refs" / "bob.wav").write_bytes(wav_bytes(1.0, 210.0, seed=3))
    srv = Server(tmp, synthetic_env(tmp, FISH_CPU_WORKERS="1", FISH_BATCH_SIZE="2", FISH_SHUTDOWN_GRACE_S="1"),
                 "--root", str(tmp / "root")).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def read_sse(response: requests.Response) -> list[tuple[int, str, dict]]:
    """(id, event, data) for each event, as an EventSource reads the stream: fields per line, a blank line ends one."""
    out, fields = [], {}
    for raw in response.iter_lines(decode_unicode=True):
        if raw == "":
            if "data" in fields:
                out.append((int(fields["id"]), fields["event"], json.loads(fields["data"])))
            fields = {}
        elif not raw.startswith(":"):
            name, _, value = raw.partition(":")
            fields[name] = value.removeprefix(" ")
    return out


def job_body(n: int = 4, slow: float = 0.0, **extra) -> dict:
    marker = f" @@slow={slow}@@" if slow else ""
    return {"speakers": {"alice": {"reference_audio": data_url(VOICE), "reference_text": "I am Alice."}},
            "segments": [{"id": f"a{i}", "speaker": "alice", "text": f"Line {i} of the job.{marker}"} for i in range(n)],
            **extra}


def wait_status(server: Server, job_id: str, want: tuple[str, ...], timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        view = server.get(f"/v1/jobs/{job_id}").json()
        if view["status"] in want:
            return view
        assert time.monotonic() < deadline, view
        time.sleep(0.2)


def test_a_job_end_to_end(server) -> None:
    server.post("/v1/references/add", data={"id": "bob", "text": "I am Bob."}, files={"audio": ("b.wav", VOICE)})
    body = job_body(3)
    body["speakers"]["bob"] = {"reference_id": "bob"}  # its transcript comes from the store
    body["speakers"]["carol"] = {"reference_audio": "refs/bob.wav", "reference_text": "Carol."}  # inside --root
    body["segments"] += [{"id": "b0", "speaker": "bob", "text": "Bob speaks.", "output": "bob/b0.wav"},
                         {"id": "c0", "speaker": "carol", "text": "Carol speaks.", "params": {"seed": 4}}]
    created = server.post("/v1/jobs", json=body)
    assert created.status_code == 202, created.text
    job_id = created.json()["id"]
    assert created.json()["status"] == "queued" and [s["id"] for s in created.json()["segments"]] == \
        ["a0", "a1", "a2", "b0", "c0"]
    with server.get(f"/v1/jobs/{job_id}/events", stream=True) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = read_sse(r)  # ends by itself after `finished`
    kinds = [e for _, e, _ in events]
    assert kinds[0] == "plan" and kinds[-1] == "finished" and kinds.count("segment_done") == 5
    assert [i for i, _, _ in events] == list(range(len(events)))
    assert events[-1][2]["done"] == 5 and events[-1][2]["exit_code"] == 0
    late = read_sse(server.get(f"/v1/jobs/{job_id}/events", stream=True))  # a late reader gets them from the first
    assert late == events
    resumed = read_sse(server.get(f"/v1/jobs/{job_id}/events", stream=True, headers={"Last-Event-ID": "2"}))
    assert resumed == events[3:]
    view = server.get(f"/v1/jobs/{job_id}").json()
    assert view["status"] == "done" and view["exit_code"] == 0
    assert view["counts"] == {"done": 5, "failed": 0, "pending": 0, "suspect": 0}
    seg = {s["id"]: s for s in view["segments"]}
    assert seg["b0"]["speaker"] == "bob" and seg["b0"]["text"] == "Bob speaks." and seg["b0"]["audio_seconds"] > 0
    assert "takes" in seg["a0"] and seg["a0"]["suspect"] is False
    wav = server.get(f"/v1/jobs/{job_id}/segments/b0")
    assert wav.status_code == 200 and wav.headers["content-type"] == "audio/wav" and wav.content[:4] == b"RIFF"
    manifest = server.get(f"/v1/jobs/{job_id}/manifest").json()
    assert manifest["counts"]["done"] == 5
    with zipfile.ZipFile(io.BytesIO(server.get(f"/v1/jobs/{job_id}/archive").content)) as z:
        assert sorted(z.namelist()) == ["a0.wav", "a1.wav", "a2.wav", "bob/b0.wav", "c0.wav", "manifest.json"]
        assert z.read("bob/b0.wav") == wav.content
    listed = server.get("/v1/jobs").json()["jobs"]
    assert {"id": job_id, "status": "done"}.items() <= next(j for j in listed if j["id"] == job_id).items()
    assert server.get(f"/v1/jobs/{job_id}/segments/zz").status_code == 404
    assert server.delete(f"/v1/jobs/{job_id}").status_code == 409  # over: nothing to cancel


def test_bad_jobs_are_400_listing_every_problem(server) -> None:
    bad = job_body(2)
    bad["segments"].append({"id": "x", "speaker": "nobody", "text": ""})
    bad["speakers"]["d"] = {"reference_id": "../etc"}
    problems = server.post("/v1/jobs", json=bad).json()
    assert problems["error"] == "invalid job" and len(problems["detail"]) == 3, problems
    assert server.post("/v1/jobs", json=job_body(1, output_dir="/tmp/x")).status_code == 400
    outside = job_body(1)
    outside["speakers"]["alice"] = {"reference_audio": "../../etc/hostname", "reference_text": "t"}
    assert server.post("/v1/jobs", json=outside).json()["error"] == "path outside the root"
    unknown = job_body(1)
    unknown["speakers"]["alice"] = {"reference_id": "ghost"}
    assert "not a stored voice" in server.post("/v1/jobs", json=unknown).json()["detail"][0]
    assert server.get("/v1/jobs/nope").status_code == 404


def test_cancel_ends_the_stream_with_a_cancelled_finished(server) -> None:
    job_id = server.post("/v1/jobs", json=job_body(20, slow=0.3)).json()["id"]
    events: list = []
    reader = threading.Thread(target=lambda: events.extend(read_sse(server.get(f"/v1/jobs/{job_id}/events",
                                                                               stream=True))))
    reader.start()
    wait_status(server, job_id, ("running",))
    assert server.delete(f"/v1/jobs/{job_id}").json() == {"id": job_id, "status": "cancelling"}
    reader.join(60)
    assert not reader.is_alive() and events[-1][1] == "finished" and events[-1][2]["cancelled"] is True
    view = wait_status(server, job_id, ("cancelled",))
    assert view["counts"]["pending"] > 0


def test_a_line_does_not_wait_behind_a_long_job_on_one_worker(server) -> None:
    def line() -> float:
        t0 = time.monotonic()
        r = server.post("/v1/tts", json={"text": "Quick line.", "references": [{"audio": b64(VOICE), "text": "Hi."}]})
        assert r.status_code == 200, r.text
        return time.monotonic() - t0

    idle = min(line() for _ in range(2))
    film = server.post("/v1/jobs", json=job_body(40, slow=0.3)).json()["id"]  # ~6 s on 1 worker x 2 lanes
    wait_status(server, film, ("running",))
    time.sleep(0.5)
    busy = line()
    view = server.get(f"/v1/jobs/{film}").json()
    print(f"a line: {idle:.2f}s idle, {busy:.2f}s next to a 40-segment job")
    assert view["counts"]["pending"] > 10  # the film was far from done...
    assert busy < idle + 3.0  # ...and the line waited for the rows running, not for the film
    server.delete(f"/v1/jobs/{film}")
    wait_status(server, film, ("cancelled",))


def test_restart_resumes_and_sigterm_leaves_nothing(tmp_path) -> None:
    env = synthetic_env(tmp_path, FISH_CPU_WORKERS="1", FISH_SHUTDOWN_GRACE_S="3")
    first = Server(tmp_path, env).wait_ready()
    job_id = first.post("/v1/jobs", json=job_body(12, slow=0.4)).json()["id"]
    deadline = time.monotonic() + 60
    while first.get(f"/v1/jobs/{job_id}").json()["counts"]["done"] < 3:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    answer: dict = {}

    def line() -> None:  # in flight when SIGTERM comes: it is answered (done in the grace period, or 503)
        r = first.post("/v1/tts", json={"text": "In flight. @@slow=0.5@@",
                                        "references": [{"audio": b64(VOICE), "text": "Hi."}]})
        answer["status"] = r.status_code

    t = threading.Thread(target=line)
    t.start()
    time.sleep(0.3)
    assert first.stop(signal.SIGTERM) == 0, first.log()  # no process left: checked by stop()
    t.join(30)
    assert answer.get("status") in (200, 503), answer
    done_before = first_view = None
    second = Server(tmp_path, env, data_dir=first.data_dir).wait_ready()
    first_view = second.get(f"/v1/jobs/{job_id}").json()
    assert first_view["status"] in ("queued", "running", "done")
    with second.get(f"/v1/jobs/{job_id}/events", stream=True) as r:
        events = read_sse(r)
    finished = [e for _, e, d in events if e == "finished"]
    assert len(finished) == 2 and events[-1][2]["exit_code"] == 0  # the interrupted run, then the resumed one
    done_before = next(d for _, e, d in events if e == "finished")["done"]
    second_plan = [d for _, e, d in events if e == "plan"][1]
    assert second_plan["skipped"] == done_before > 0  # resumed: what was done is not redone
    assert second.get(f"/v1/jobs/{job_id}").json()["counts"]["done"] == 12
    assert second.stop() == 0


def test_start_refusals(tmp_path) -> None:
    from conftest import run_fishmp

    r = run_fishmp(["serve", "--host", "0.0.0.0", "--data-dir", str(tmp_path / "d")], str(tmp_path),
                   synthetic_env(tmp_path), timeout=60)
    assert r.returncode == 2 and "without an API key" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    port = free_port()
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", port))
        busy.listen()
        r = run_fishmp(["serve", "--port", str(port), "--data-dir", str(tmp_path / "d")], str(tmp_path),
                       synthetic_env(tmp_path), timeout=60)
    assert r.returncode == 2 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
    r = run_fishmp(["serve", "--data-dir", str(tmp_path / "d")], str(tmp_path),
                   synthetic_env(tmp_path, FISH_SERVE_PORT="http"), timeout=60)
    assert r.returncode == 2 and "FISH_SERVE_PORT='http'" in r.stderr
