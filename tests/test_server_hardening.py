"""A server safe to leave running on a dubbing desktop (issue 31): each probe of the hostile round, against one real
`fishmp serve` process (synthetic engine, --root, a data dir that starts with damaged jobs in it) through a real
HTTP client or a raw socket on loopback. Clients that send no Origin keep working throughout (requests sends none)."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import soundfile as sf
from serve_helpers import Server, b64, data_url, free_port, synthetic_env, wav_bytes

pytestmark = pytest.mark.timeout(300)
VOICE = wav_bytes(1.0, 150.0, seed=5)
EVIL = "http://evil.example"
DAMAGED = {  # job dir -> (meta.json, job.json): each one alone used to stop the server from starting
    "badmeta0000000001": ("[]", None), "badmeta0000000002": ('{"id": "x", "created_at": "abc"}', None),
    "badjob00000000001": (None, "[]"), "badjob00000000002": (None, '{"segments": 5}'),
}
GOOD_JOB = {"speakers": {"a": {"reference_audio": "/nowhere.wav", "reference_text": "A."}},
            "segments": [{"id": "0001", "speaker": "a", "text": "Hi."}]}
BAD_EVENTS = ['null', '[]', '5', '{"event": "segment_done", "id": {}}', '{"event": "plan"}',
              '{"event": "finished", "exit_code": 0, "done": 0, "failed": 0, "pending": 0}']


def _damaged_data_dir(data: Path) -> None:
    for job_id, (meta, job) in {**DAMAGED, "oddevents00000001": (None, None)}.items():
        d = data / "jobs" / job_id
        d.mkdir(parents=True)
        (d / "meta.json").write_text(meta or json.dumps({"id": job_id, "created_at": 1.0}))
        (d / "job.json").write_text(job or json.dumps(GOOD_JOB))
        (d / "events.jsonl").write_text("\n".join(BAD_EVENTS) + "\n")


ORPHAN, KEPT, YOUNG = ("a" * 64 + ".wav"), ("b" * 64 + ".wav"), ("c" * 64 + ".wav")


def _voices_to_sweep(data: Path) -> None:
    """An unused voice of long ago (swept at start), a stored voice's file of long ago and an unused one of now
    (both kept)."""
    (data / "voices").mkdir(parents=True)
    (data / "references").mkdir(parents=True)
    for name in (ORPHAN, KEPT, YOUNG):
        (data / "voices" / name).write_bytes(VOICE)
    (data / "references" / "kept.json").write_text(json.dumps({"id": "kept", "audio": KEPT, "text": "K."}))
    old = time.time() - 3 * 3600
    for name in (ORPHAN, KEPT):
        os.utime(data / "voices" / name, (old, old))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-hardening")
    root = tmp / "root"
    root.mkdir()
    (root / "voice.wav").write_bytes(VOICE)
    (root / "adir").mkdir()
    os.mkfifo(root / "fifo.wav")
    np.save(root / "spk.npy", np.random.default_rng(0).integers(0, 1000, size=(10, 20)).astype(np.int64))
    (tmp / "outside.npy").write_bytes((root / "spk.npy").read_bytes())
    _damaged_data_dir(tmp / "data")
    _voices_to_sweep(tmp / "data")
    env = synthetic_env(tmp, FISH_CPU_WORKERS="1", FISH_BATCH_SIZE="2", FISH_SHUTDOWN_GRACE_S="1",
                        FISH_SERVE_HEADER_TIMEOUT_S="2", FISH_SERVE_BODY_TIMEOUT_S="3",
                        FISH_SERVE_MAX_CONNECTIONS="40", FISH_SERVE_MAX_QUEUED="200000",
                        FISH_SERVE_MAX_REFERENCE_S="30")
    srv = Server(tmp, env, "--root", str(root)).wait_ready()
    srv.root = root
    yield srv
    assert srv.stop() == 0, srv.log()


def _voice(server: Server, ref_id: str) -> None:
    r = server.post("/v1/references/add", data={"id": ref_id, "text": "A voice."}, files={"audio": ("v.wav", VOICE)})
    assert r.status_code == 200, r.text


def _job_dirs(server: Server) -> set[str]:
    return set(os.listdir(server.data_dir / "jobs"))


def _wait_done(server: Server, job_id: str, timeout: float = 120) -> dict:
    deadline = time.monotonic() + timeout
    while (view := server.get(f"/v1/jobs/{job_id}").json())["status"] not in ("done", "failed"):
        assert time.monotonic() < deadline, view
        time.sleep(0.2)
    return view


def _job(n: int = 1, **seg: object) -> dict:
    return {"speakers": {"a": {"reference_audio": data_url(VOICE), "reference_text": "A voice."}},
            "segments": [{"id": f"s{i}", "speaker": "a", "text": f"Line {i}.", **seg} for i in range(n)]}


# -- 1-3: what a web page may do --------------------------------------------------------------------------------------

def test_cross_origin_browser_requests_are_refused(server) -> None:
    _voice(server, "keepme")
    forged = [("post", "/v1/references/delete", {"data": {"reference_id": "keepme"}}),  # a form: no preflight
              ("post", "/v1/references/add", {"files": {"audio": ("v.wav", VOICE)}, "data": {"id": "x", "text": "t"}}),
              ("post", "/v1/references/update", {"data": {"old_reference_id": "keepme", "new_reference_id": "y"}}),
              ("post", "/v1/tts", {"data": {"text": "hi", "reference_id": "keepme"}}),
              ("post", "/v1/jobs/0123456789abcdef/segments/0001/accept", {"data": b"",
                                                                          "headers": {"Content-Type": "text/plain"}})]
    for method, path, kw in forged:
        headers = {"Origin": EVIL, **kw.pop("headers", {})}
        r = getattr(server.session, method)(server.url(path), headers=headers, timeout=30, **kw)
        assert r.status_code == 403, (path, r.status_code, r.text)
        assert r.json()["error"] == "cross-origin request refused" and "FISH_SERVE_ALLOWED_ORIGINS" in r.json()["detail"]
    for headers in ({"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}, {"Origin": f"http://127.0.0.1:{free_port()}"}):
        r = server.post("/v1/references/delete", data={"reference_id": "keepme"}, headers=headers)
        assert r.status_code == 403, (headers, r.text)
    assert "keepme" in server.get("/v1/references/list").json()["reference_ids"]
    # the review page's own requests (same origin) and clients that send no Origin go through
    own = server.post("/v1/references/delete", data={"reference_id": "keepme"},
                      headers={"Origin": f"http://127.0.0.1:{server.port}", "Sec-Fetch-Site": "same-origin"})
    assert own.status_code == 200, own.text
    assert server.get("/v1/references/list", headers={"Origin": EVIL}).status_code == 200  # reads: CORS keeps them


def test_foreign_host_header_is_refused(server) -> None:
    for host in (f"evil.example:{server.port}", "evil.example", f"127.0.0.1.nip.io:{server.port}"):
        r = server.get("/v1/jobs", headers={"Host": host})
        assert r.status_code == 400, (host, r.text)
        assert "jobs" not in r.text
    for host in (f"localhost:{server.port}", f"127.0.0.1:{server.port}", f"[::1]:{server.port}"):
        assert server.get("/v1/jobs", headers={"Host": host}).status_code == 200, host


def test_every_answer_says_nosniff_and_no_framing(server) -> None:
    for path in ("/", "/jobs/abc", "/static/job.js", "/v1/health", "/v1/jobs", "/v1/nothing"):
        r = server.get(path)
        assert r.headers["X-Content-Type-Options"] == "nosniff", path
        assert r.headers["X-Frame-Options"] == "DENY", path
        assert "frame-ancestors 'none'" in r.headers["Content-Security-Policy"], path


# -- 4-5: paths and ids ------------------------------------------------------------------------------------------------

def test_every_path_a_job_names_is_confined(server) -> None:
    before = _job_dirs(server)
    for tokens in ("data:/../../../../tmp/x.npy", "data:/../../outside.npy", "../outside.npy", "/etc/passwd"):
        body = {"speakers": {"a": {"prompt_tokens": tokens, "reference_text": "A."}},
                "segments": [{"speaker": "a", "text": "Hi."}]}
        r = server.post("/v1/jobs", json=body)
        assert r.status_code == 400 and r.json()["error"] == "path outside the root", (tokens, r.text)
        assert "exist" not in r.text and "readable" not in r.text and str(server.tmp) not in r.text
    legacy = {"tasks": [{"segment_index": 0, "speaker_id": 1, "target_text": "Hi.", "npy_file": str(server.tmp /
                                                                                                    "outside.npy"),
                         "reference_text": "A.", "output_file": "0.wav"}]}
    r = server.post("/v1/jobs", json=legacy)
    assert r.status_code == 400 and r.json()["error"] == "path outside the root", r.text
    r = server.post("/v1/jobs", json={**legacy, "checkpoint_dir": "/"})
    assert r.status_code == 400 and "checkpoint_dir" in r.text
    assert _job_dirs(server) == before


def test_a_legacy_body_runs_and_a_bad_one_leaves_nothing(server) -> None:
    before = _job_dirs(server)
    task = {"segment_index": 3, "speaker_id": 1, "target_text": "Hi there.", "npy_file": "spk.npy",
            "reference_text": "A.", "output_file": "three.wav"}
    r = server.post("/v1/jobs", json={"tasks": [{**task, "target_text": " "}]})
    assert r.status_code == 400, r.text
    assert _job_dirs(server) == before
    r = server.post("/v1/jobs", json={"tasks": [task]})
    assert r.status_code == 202, r.text
    view = _wait_done(server, r.json()["id"])
    assert view["status"] == "done" and [s["id"] for s in view["segments"]] == ["3"], view
    assert server.get(f"/v1/jobs/{view['id']}/segments/3").content[:4] == b"RIFF"


def test_segment_ids_are_names(server) -> None:
    before = _job_dirs(server)
    for sid in ("../../0123456789abcdef/segments/0001", "..", "a/./b"):
        r = server.post("/v1/jobs", json=_job(1, id=sid, output="x.wav"))  # its wav is inside: the id alone
        assert r.status_code == 400 and "is a name" in r.text, (sid, r.text)
    assert _job_dirs(server) == before
    assert "encodeURIComponent(sid)" in server.get("/static/job.js").text  # the page puts an id in one URL piece


# -- 11-13, 16: no 500s, nothing half-written -------------------------------------------------------------------------

def test_lone_surrogates_are_400_and_leave_nothing(server) -> None:
    before = _job_dirs(server)
    raw = json.dumps(_job(1)).replace("Line 0.", "Hi \\ud800")
    r = server.post("/v1/jobs", data=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "\\ud800" in r.json()["detail"], r.text
    assert _job_dirs(server) == before
    job = server.post("/v1/jobs", json=_job(1))
    assert job.status_code == 202, job.text
    job_id = job.json()["id"]
    _wait_done(server, job_id)
    for action in ("retake", "accept"):
        r = server.post(f"/v1/jobs/{job_id}/segments/s0/{action}", data='{"by": "x \\udc00"}',
                        headers={"Content-Type": "application/json"})
        assert r.status_code == 400, (action, r.text)
    assert not (server.data_dir / "jobs" / job_id / "retakes").exists() or \
        not os.listdir(server.data_dir / "jobs" / job_id / "retakes")
    with server.get(f"/v1/jobs/{job_id}/events", stream=True, timeout=30) as r:
        assert b"finished" in r.content  # the stream still reads and ends


def test_nesting_and_keep_alive(server) -> None:
    with requests.Session() as s:
        r = s.post(server.url("/v1/jobs"), data="[" * 100000, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code == 400 and r.json()["detail"] == "nested too deeply", r.text
        assert "close" not in r.headers.get("Connection", "")
        assert s.get(server.url("/v1/health"), timeout=30).status_code == 200  # the same connection goes on
    assert server.log().count("Traceback") == 0


def test_a_damaged_data_dir_still_starts(server) -> None:
    jobs = {j["id"]: j for j in server.get("/v1/jobs").json()["jobs"]}
    for job_id in DAMAGED:
        assert jobs[job_id]["status"] == "damaged", jobs.get(job_id)
        view = server.get(f"/v1/jobs/{job_id}").json()
        assert "cannot be read" in view["error"] and str(server.data_dir) not in view["error"]
        assert server.delete(f"/v1/jobs/{job_id}").status_code == 409
    assert jobs["oddevents00000001"]["status"] == "done"  # its bad event lines skipped, the rest applied


def test_a_second_server_on_the_data_dir_refuses_to_start(server) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
    env.update(synthetic_env(server.tmp))
    second = subprocess.run([sys.executable, "-m", "fishmp", "serve", "--port", str(free_port()), "--data-dir",
                             str(server.data_dir)], env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 2, second.stderr
    lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and f"pid {server.proc.pid}" in lines[0] and "in use by another fishmp serve" in lines[0]
    assert server.get("/v1/health").status_code == 200


def test_a_short_key_cannot_guard_a_remote_server(tmp_path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FISH_")}
    env.update(synthetic_env(tmp_path))
    r = subprocess.run([sys.executable, "-m", "fishmp", "serve", "--host", "0.0.0.0", "--api-key", "k", "--port",
                        str(free_port()), "--data-dir", str(tmp_path / "d")], env=env, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2 and "at least 16" in r.stderr, r.stderr


# -- 6: audio bomb ------------------------------------------------------------------------------------------------------

def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) / 1024


def _silence_flac(path: Path, seconds: float, rate: int, channels: int) -> bytes:
    with sf.SoundFile(path, "w", rate, channels, format="FLAC", subtype="PCM_16") as f:
        block = np.full((rate, channels), 300, dtype=np.int16)  # constant: FLAC keeps a second in a few bytes
        for _ in range(int(seconds)):
            f.write(block)
    return path.read_bytes()


def test_an_audio_bomb_is_refused_from_its_header(server) -> None:
    bomb = _silence_flac(server.tmp / "bomb.flac", 60, 192000, 8)  # 60 s, 8 channels, 192 kHz: ~368 MB decoded
    long = _silence_flac(server.tmp / "long.flac", 40, 48000, 1)  # over FISH_SERVE_MAX_REFERENCE_S=30
    assert len(bomb) < 2 * 2**20
    before = _peak_rss_mib(server.proc.pid)
    r = server.post("/v1/references/add", data={"id": "bomb", "text": "t"}, files={"audio": ("b.flac", bomb)})
    assert r.status_code == 400 and "192000 Hz" in r.text, r.text
    r = server.post("/v1/tts", json={"text": "Hi.", "references": [{"audio": b64(bomb), "text": "t"}]})
    assert r.status_code == 400, r.text
    r = server.post("/v1/references/add", data={"id": "long", "text": "t"}, files={"audio": ("l.flac", long)})
    assert r.status_code == 400 and "at most 30 s" in r.text, r.text
    grown = _peak_rss_mib(server.proc.pid) - before
    assert grown < 80, f"the server's peak RSS grew by {grown:.0f} MiB"


# -- 7: slow clients --------------------------------------------------------------------------------------------------

def _closed_within(sock: socket.socket, seconds: float) -> bool:
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
        return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def test_slow_clients_are_cut_off(server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as silent, \
            socket.create_connection(("127.0.0.1", server.port)) as half, \
            socket.create_connection(("127.0.0.1", server.port)) as stalled:
        half.sendall(b"GET /v1/health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        stalled.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                        b"Content-Length: 1000\r\n\r\n{\"speakers\": ")
        t0 = time.monotonic()
        for sock in (silent, half, stalled):
            assert _closed_within(sock, 60), "a slow client's connection stayed open"
        assert time.monotonic() - t0 < 60
    log = server.log()
    assert "headers did not arrive within 2s" in log and "body did not arrive within 3s" in log
    socks = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(60)]  # past MAX_CONNECTIONS=40
    try:
        deadline = time.monotonic() + 30
        while "(FISH_SERVE_MAX_CONNECTIONS): closing a new one" not in server.log():
            assert time.monotonic() < deadline, "no connection was refused past FISH_SERVE_MAX_CONNECTIONS"
            time.sleep(0.1)
    finally:
        for s in socks:
            s.close()
    deadline = time.monotonic() + 30  # once the server has seen them close, it answers again
    while server.get("/v1/health").status_code != 200:
        assert time.monotonic() < deadline, "the server did not recover from too many connections"
        time.sleep(0.2)


# -- 8: big bodies beside the event loop ------------------------------------------------------------------------------

def test_a_huge_job_does_not_stall_other_clients(server) -> None:
    body = _job(40000)
    body["segments"][-1]["speaker"] = "nobody"  # checked to the end, then refused
    raw = json.dumps(body).encode()
    worst, done = [0.0], threading.Event()

    def probe() -> None:
        while not done.is_set():
            t0 = time.monotonic()
            requests.get(server.url("/v1/health"), timeout=60)
            worst[0] = max(worst[0], time.monotonic() - t0)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        r = server.post("/v1/jobs", data=raw, headers={"Content-Type": "application/json"}, timeout=300)
    finally:
        done.set()
        prober.join()
    assert r.status_code == 400 and "nobody" in r.text
    assert worst[0] < 4.0, f"a health check waited {worst[0]:.1f}s behind a big job's checks"  # before: ~8 s here
    t0 = time.monotonic()
    r = server.post("/v1/jobs", json={"speakers": {}, "segments": [{}] * 200001})  # the bound comes first
    assert r.status_code == 400 and "FISH_SERVE_MAX_QUEUED" in r.text and time.monotonic() - t0 < 30


# -- 9-10: metrics, logs, error bodies ---------------------------------------------------------------------------------

def test_metrics_labels_and_log_lines_stay_bounded(server) -> None:
    for method in ("FOOA", "FOOB"):
        server.session.request(method, server.url("/v1/health"), timeout=30)
    server.get("/x%0a[Serve] FORGED 200%1b[31m")
    metrics = server.get("/metrics").text
    assert 'method="other"' in metrics and "FOOA" not in metrics and "FOOB" not in metrics
    log = server.log()
    assert not any(line.startswith("[Serve] FORGED") or "FORGED" in line and "%0A" not in line
                   for line in log.splitlines())
    assert "\x1b" not in log


def test_error_bodies_show_no_server_paths(server) -> None:
    body = {"speakers": {"a": {"reference_audio": "missing.wav", "reference_text": "A."}},
            "segments": [{"speaker": "a", "text": "Hi."}]}
    r = server.post("/v1/jobs", json=body)
    assert r.status_code == 400 and str(server.root) not in r.text and "<root>" in r.text, r.text


# -- 15: files named by an OpenAI request ------------------------------------------------------------------------------

def test_audio_path_is_a_regular_file_or_400(server) -> None:
    for path, error in (("fifo.wav", "not a file"), ("adir", "not a file"), ("missing.wav", "file not readable"),
                        ("vo\0ice.wav", "invalid path")):
        r = server.post("/v1/audio/speech", json={"input": "Hi.", "response_format": "wav",
                                                  "references": [{"audio_path": path, "text": "A voice."}]})
        assert r.status_code == 400 and r.json()["error"] == error, (path, r.text)
    assert requests.get(server.url("/v1/health"), timeout=10).status_code == 200
    r = server.post("/v1/audio/speech", json={"input": "Hi.", "response_format": "wav",
                                              "references": [{"audio_path": "voice.wav", "text": "A voice."}]})
    assert r.status_code == 200 and r.content[:4] == b"RIFF", r.text


# -- 17: a stream that fails is cut, not a clean 200 -------------------------------------------------------------------

def test_a_failed_chunk_cuts_the_stream(server) -> None:
    text = "The first sentence of this line is fine to say. The second one @@toolong@@ cannot be said at all."
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        with server.post("/v1/tts", json={"text": text, "streaming": True, "chunk_length": 50,
                                          "references": [{"audio": b64(VOICE), "text": "A voice."}]},
                         stream=True) as r:
            assert r.status_code == 200, r.text
            b"".join(r.iter_content(4096))
    assert "streaming line ended early" in server.log()
    assert server.get("/v1/health").status_code == 200


# -- rough edges ------------------------------------------------------------------------------------------------------

def test_rough_edges(server) -> None:
    _voice(server, "same")
    r = server.post("/v1/references/update", json={"old_reference_id": "same", "new_reference_id": "same"})
    assert r.status_code == 200, r.text
    _voice(server, "gone")
    entry = json.loads((server.data_dir / "references" / "gone.json").read_text())
    os.unlink(server.data_dir / "voices" / entry["audio"])
    assert "gone" not in server.get("/v1/references/list").json()["reference_ids"]
    job = server.post("/v1/jobs", json=_job(1)).json()["id"]
    _wait_done(server, job)
    n = len(server.get(f"/v1/jobs/{job}/events", timeout=30).text.split("\n\nid: "))
    with server.get(f"/v1/jobs/{job}/events", headers={"Last-Event-ID": str(n + 50)}, timeout=30) as r:
        assert r.status_code == 200 and "event:" not in r.text  # ends at once, nothing to send


def test_unused_voices_are_swept(server) -> None:
    voices = set(os.listdir(server.data_dir / "voices"))
    assert ORPHAN not in voices and {KEPT, YOUNG} <= voices
    assert "kept" in server.get("/v1/references/list").json()["reference_ids"]


def test_the_same_new_reference_is_checked_once(server) -> None:
    """Issue 32, item 3: requests bringing the same new bytes at once share one check (and one refusal)."""
    fresh, silent = wav_bytes(1.2, 180.0, seed=77), wav_bytes(1.0, 100.0, seed=1)
    silent = silent[:44] + bytes(len(silent) - 44)  # the same header, all samples 0
    results: list[int] = []

    def add(i: int, audio: bytes, prefix: str) -> None:
        r = requests.post(server.url("/v1/references/add"), data={"id": f"{prefix}{i}", "text": "t"},
                          files={"audio": ("v.wav", audio)}, timeout=60)
        results.append(r.status_code)

    threads = [threading.Thread(target=add, args=(i, audio, prefix)) for i in range(5)
               for audio, prefix in ((fresh, "same"), (silent, "mute"))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [200] * 5 + [400] * 5
    import hashlib

    log = server.log()
    assert log.count(f"reference audio {hashlib.sha256(fresh).hexdigest()[:16]} ") == 1, log[-3000:]
    assert log.count(f"reference audio {hashlib.sha256(silent).hexdigest()[:16]} ") == 1


def test_a_damaged_manifest_is_409(server) -> None:
    job_id = server.post("/v1/jobs", json=_job(1)).json()["id"]
    _wait_done(server, job_id)
    (server.data_dir / "jobs" / job_id / "out" / "manifest.json").write_text("[1, 2")
    r = server.get(f"/v1/jobs/{job_id}/manifest")
    assert r.status_code == 409 and r.json()["error"] == "manifest damaged", r.text
    r = server.post(f"/v1/jobs/{job_id}/segments/s0/accept")
    assert r.status_code == 409, r.text


def test_a_worker_decodes_no_more_of_a_reference_than_it_keeps(tmp_path) -> None:
    """The engines' read_reference (what a worker runs to encode a reference) judges the header first: the bomb costs
    its process nothing, and a long honest file is refused from its header too."""
    bomb = tmp_path / "bomb.flac"
    _silence_flac(bomb, 60, 192000, 8)
    _silence_flac(tmp_path / "long.flac", 400, 16000, 1)
    code = ("import resource, sys\nfrom fishmp.engines.audio import read_reference\n"
            "from fishmp.engines.base import BadReferenceError\n"
            "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "for path in sys.argv[1:]:\n"
            "    try:\n        read_reference(path)\n    except BadReferenceError as exc:\n        print(exc)\n"
            "print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(bomb), str(tmp_path / "long.flac")], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    lines = out.stdout.strip().splitlines()
    assert out.returncode == 0 and len(lines) == 3, out.stdout + out.stderr
    assert "8 channel(s) at 192000 Hz" in lines[0] and "400.0 s long; at most 300 s" in lines[1]
    assert int(lines[2]) < 40, f"reading the references grew the process by {lines[2]} MiB"


def test_zz_a_stop_cuts_a_running_stream(server) -> None:
    """Last in this module: it stops the shared server. A stream that SIGTERM ends is cut, not a clean 200."""
    text = "The first sentence of this line is fine to say. The second one @@slow=30@@ takes far too long to say."
    with server.post("/v1/tts", json={"text": text, "streaming": True, "chunk_length": 50,
                                      "references": [{"audio": b64(VOICE), "text": "A voice."}]}, stream=True) as r:
        assert r.status_code == 200, r.text
        chunks = r.iter_content(4096)
        got = next(chunks)
        assert got[:4] == b"RIFF"
        server.proc.send_signal(signal.SIGTERM)
        with pytest.raises(requests.exceptions.ChunkedEncodingError):
            for _ in chunks:
                pass
    assert server.proc.wait(90) == 0, server.log()
    assert "streaming line ended early: shutting down" in server.log()
