"""The review page (issue 26) in a real headless browser (Debian's chromium through Selenium; page_helpers.py): the
key asked once, the jobs page's live progress and cancel, the job page's suspect filter, a player that really loads
a take's wav, retake (a second take, in the page and in the manifest), accept (the flag cleared, the decision
recorded), the GPU charts from a job's telemetry events, and the phone-sized layout. One server process (synthetic
engine, its bad-take markers) and one browser for the module. With FISHMP_SCREENSHOTS=docs/ it saves the README's
screenshots."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from page_helpers import (
    browser_problem,
    click,
    emulate,
    js,
    screenshot,
    script_errors,
    start_browser,
    stop_browser,
    text,
    wait,
)
from serve_helpers import Server, data_url, synthetic_env, wav_bytes

from fishmp.engines.audio import speech_like
from fishmp.running.progress import make_event
from fishmp.running.telemetry import GpuSample, sample_fields

PROBLEM = browser_problem()
pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))]
KEY = "page-key-26"
GPU_JOB = "recorded-on-gpus"
DAMAGED_JOB = "edited-by-hand"
GPU_SAMPLES = 96
DIALOGUE = [  # (id, speaker, text): the synthetic engine's markers make the bad takes
    ("s1", "alice", "Where were you last night? @@silent:3@@"),  # silent until seed 3: suspect, a retake fixes it
    ("s2", "bob", "I told you, I was at home. @@clipped@@"),  # clipped whatever the seed: suspect, accepted
    ("s3", "alice", "Then why is your coat still wet? @@runaway:1@@"),  # the first take runs away, its retry passes
    ("s4", "bob", "It rained on the way back from the shop."),
    ("s5", "alice", "The shop closes at six, and you know that as well as I do. @@short:2@@"),  # too short twice
    ("s6", "bob", "Fine. I went out. Happy now?"),
]


def recorded_gpu_job(data_dir: Path) -> None:
    """A finished job as a server on a two-GPU machine leaves it in its data dir (this machine has no GPU): the job's
    files, its wavs, and an event log of fishmp's own events, the `gpu` ones made by the telemetry's own code from
    figures chosen for the test (workers loading, then decoding)."""
    d = data_dir / "jobs" / GPU_JOB
    (d / "out").mkdir(parents=True)
    (d / "voice.wav").write_bytes(wav_bytes(1.0, 150.0))
    lines = ["Chapter one.", "The rain had not stopped for three days.", "Nobody in the village remembered such a "
             "spring.", "And then, on the fourth morning, the river rose."]
    segs = [{"id": f"{i + 1:04d}", "speaker": "narrator", "text": t} for i, t in enumerate(lines)]
    t0 = time.time() - 3600
    (d / "meta.json").write_text(json.dumps({"id": GPU_JOB, "created_at": t0}))
    (d / "job.json").write_text(json.dumps({"speakers": {"narrator": {"reference_audio": str(d / "voice.wav"),
                                                                      "reference_text": "I read."}}, "segments": segs}))
    rng = np.random.default_rng(26)
    events = [{**make_event("plan", segments=len(segs), skipped=0, speakers=1, workers=4, mode="gpu"), "time": t0}]
    for k in range(GPU_SAMPLES):
        loaded = min(1.0, k / 8)
        samples = []
        for i in (0, 1):  # two workers per GPU
            used = 0.6 + loaded * (14.2 + 1.6 * i + rng.uniform(0, 1.2))
            util = None if k < 2 else round(float(np.clip((88 - 9 * i) * loaded + rng.uniform(-12, 12), 0, 100)), 1)
            samples.append(GpuSample(i, "NVIDIA H100 80GB HBM3", used, 79.647 - used, 79.647, util,
                                     {1000 + 2 * i: 7.1 * loaded, 1001 + 2 * i: 7.0 * loaded}))
        events.append({**make_event("gpu", gpus=sample_fields(samples, {1000: "w0", 1001: "w1", 1002: "w2",
                                                                        1003: "w3"})), "time": t0 + 5 * k})
        if k % 20 == 19 and k // 20 < len(segs):
            seg = segs[k // 20]
            path = d / "out" / f"{seg['id']}.wav"
            seconds = 0.065 * len(seg["text"]) + 0.4
            sf.write(path, speech_like(seconds, 44100, 120.0, seed=k), 44100)
            events.append({**make_event("segment_done", id=seg["id"], path=str(path), audio_seconds=round(seconds, 3),
                                        synthesis_seconds=4.1, tokens=round(seconds * 21.53), worker=f"w{k % 4}",
                                        attempts=1, suspect=False), "time": t0 + 5 * k})
    events.append({**make_event("finished", done=len(segs), failed=0, pending=0, suspect=0, exit_code=0,
                                cancelled=False, interrupted=None), "time": t0 + 5 * GPU_SAMPLES})
    (d / "events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve-page")
    recorded_gpu_job(tmp / "data")
    damaged = tmp / "data" / "jobs" / DAMAGED_JOB  # its meta.json is not fishmp's: listed as damaged, at the bottom
    damaged.mkdir()
    (damaged / "meta.json").write_text("[]")
    os.utime(damaged, (time.time() - 86400, time.time() - 86400))
    srv = Server(tmp, synthetic_env(tmp, FISH_CPU_WORKERS="1", FISH_BATCH_SIZE="2", FISH_SHUTDOWN_GRACE_S="1"),
                 api_key=KEY)
    yield srv.wait_ready()
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def review_job(server) -> str:
    """A finished dialogue with two suspect lines."""
    body = {"speakers": {"alice": {"reference_audio": data_url(wav_bytes(1.0, 150.0, seed=2)), "reference_text": "Hi."},
                         "bob": {"reference_audio": data_url(wav_bytes(1.0, 210.0, seed=3)), "reference_text": "Hey."}},
            "segments": [{"id": sid, "speaker": sp, "text": t} for sid, sp, t in DIALOGUE]}
    job_id = server.post("/v1/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 120
    while server.get(f"/v1/jobs/{job_id}").json()["status"] != "done":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    return job_id


@pytest.fixture(scope="module")
def browser(server):
    driver = start_browser()
    yield driver
    stop_browser(driver)


@pytest.fixture(autouse=True)
def no_script_errors(browser):
    script_errors(browser)
    yield
    assert script_errors(browser) == []


def open_page(driver, server: Server, path: str) -> None:
    """Load a page; type the key the first time the page asks for it (it stays in the tab's sessionStorage)."""
    driver.get(server.url(path))
    state = wait(driver, lambda d: js(d, "return document.getElementById('key-overlay') ? 'key' : "
                                         "document.body.dataset.ready || ''"), f"{path} to load or ask for the key")
    if state == "key":
        driver.find_element("id", "api-key").send_keys(KEY)
        driver.find_element("id", "api-key-submit").click()
        wait(driver, lambda d: js(d, "return document.body.dataset.ready"), f"{path} to load with the key")


def seg(sid: str, inner: str = "") -> str:
    return f'.seg[data-segment-id="{sid}"] {inner}'.strip()


def visible_segments(driver) -> list[str]:
    return js(driver, "return [...document.querySelectorAll('.seg')].filter(n => !n.hidden)"
                      ".map(n => n.dataset.segmentId)")


def audio_state(driver, selector: str) -> dict:
    return js(driver, "const a = document.querySelector(arguments[0]);"
                      "return a && {ready: a.readyState, duration: a.duration, take: a.dataset.take || null,"
                      "             blob: a.src.startsWith('blob:')}", selector)


def test_the_jobs_page_shows_progress_advancing_and_cancels(browser, server, review_job) -> None:
    film = {"speakers": {"narrator": {"reference_audio": data_url(wav_bytes(1.0, 120.0, seed=5)),
                                      "reference_text": "I read."}},
            "segments": [{"id": f"{i:04d}", "speaker": "narrator", "text": f"Line {i} of the film. @@slow=0.4@@"}
                         for i in range(60)]}  # about 12 s on one worker's two lanes
    job_id = server.post("/v1/jobs", json=film).json()["id"]
    open_page(browser, server, "/")  # asks for the key: the server has one
    bar = f'.job[data-job-id="{job_id}"] .progress'

    def progress() -> tuple[int, int]:
        now, most = js(browser, "const b = document.querySelector(arguments[0]);"
                                "return b ? [Number(b.getAttribute('aria-valuenow')), "
                                "Number(b.getAttribute('aria-valuemax'))] : [0, 0]", bar)
        return now, most

    first = wait(browser, lambda d: (p := progress())[0] > 0 and p[0] < p[1] and p, "the film's first segments")
    wait(browser, lambda d: progress()[0] > first[0], f"the progress to advance past {first[0]} of {first[1]}")
    rates = wait(browser, lambda d: js(d, "const r = document.querySelector(arguments[0]);"
                                          "const f = r.querySelector('[data-field=fps]').textContent,"
                                          "      e = r.querySelector('[data-field=eta]').textContent;"
                                          "return f.endsWith('frames/s') && e.startsWith('ETA') && [f, e]",
                                       f'.job[data-job-id="{job_id}"]'), "frames/s and an ETA")
    assert float(rates[0].split()[0]) > 0, rates
    listed = js(browser, "return [...document.querySelectorAll('.job')].map(n => [n.dataset.jobId, n.dataset.status])")
    assert dict(listed)[review_job] == "done" and dict(listed)[GPU_JOB] == "done" and listed[0][0] == job_id
    assert listed[-1] == [DAMAGED_JOB, "damaged"]  # issue 31: a damaged job is listed, and the server started
    counts = js(browser, "return Object.fromEntries([...document.querySelectorAll(arguments[0] + ' .count')]"
                         ".map(c => [c.dataset.count, Number(c.querySelector('b').textContent)]))",
                f'.job[data-job-id="{review_job}"]')
    assert counts == {"done": 6, "failed": 0, "pending": 0, "suspect": 2}
    screenshot(browser, "review-jobs", 1100)
    cancel = f'.job[data-job-id="{job_id}"] [data-action=cancel]'
    click(browser, cancel)
    assert text(browser, cancel) == "Confirm cancel"  # a second click confirms: no stray cancel on a phone
    click(browser, cancel)
    wait(browser, lambda d: js(d, "return document.querySelector(arguments[0]).dataset.status",
                               f'.job[data-job-id="{job_id}"]') == "cancelled", "the film to be cancelled")
    assert server.get(f"/v1/jobs/{job_id}").json()["status"] == "cancelled"


def test_the_job_page_lists_the_suspect_segments_and_plays_them(browser, server, review_job) -> None:
    open_page(browser, server, f"/jobs/{review_job}")
    assert len(visible_segments(browser)) == 6
    click(browser, "[data-filter=suspect]")
    wait(browser, lambda d: visible_segments(d) == ["s1", "s2"], "the suspect filter")
    assert "silent" in text(browser, seg("s1", ".take.kept")) and text(browser, seg("s2", "[data-action=accept]"))
    seconds = {s["id"]: s["audio_seconds"] for s in server.get(f"/v1/jobs/{review_job}").json()["segments"]}
    audio = wait(browser, lambda d: (a := audio_state(d, '.seg[data-segment-id="s1"] .seg-side audio'))["ready"] >= 1
                 and a, "s1's audio to load")  # HAVE_METADATA: the wav came and was parsed
    assert audio["blob"] and audio["take"] == "1" and abs(audio["duration"] - seconds["s1"]) < 0.05, audio
    click(browser, "[data-filter=failed]")
    wait(browser, lambda d: visible_segments(d) == [], "the failed filter")
    assert browser.find_element("id", "segments-empty").is_displayed()
    click(browser, "[data-filter=all]")
    wait(browser, lambda d: len(visible_segments(d)) == 6, "all segments again")


def test_retake_makes_a_second_take(browser, server, review_job) -> None:
    open_page(browser, server, f"/jobs/{review_job}")
    click(browser, seg("s1", "[data-action=retake]"))
    wait(browser, lambda d: js(d, "const r = document.querySelector('.seg[data-segment-id=\"s1\"]');"
                                  "return r.dataset.takes === '2' && r.dataset.suspect === 'false' && "
                                  "!r.querySelector('.pill.retaking')"), "s1's second take")
    audio = wait(browser, lambda d: (a := audio_state(d, '.seg[data-segment-id="s1"] .seg-side audio'))["take"] == "2"
                 and a["ready"] >= 1 and a, "the new take in s1's player")
    assert text(browser, seg("s1", "details.history summary")) == "Take history (2 written)"
    click(browser, seg("s1", "details.history summary"))
    old = wait(browser, lambda d: (a := audio_state(d, '.seg[data-segment-id="s1"] .hist audio[data-take="1"]'))
               and a["ready"] >= 1 and a, "the replaced take's player")
    s1 = next(s for s in server.get(f"/v1/jobs/{review_job}").json()["segments"] if s["id"] == "s1")
    assert abs(old["duration"] - s1["history"][0]["audio_seconds"]) < 0.05
    assert abs(audio["duration"] - s1["audio_seconds"]) < 0.05
    manifest = server.get(f"/v1/jobs/{review_job}/manifest").json()["segments"]["s1"]
    assert manifest["suspect"] is False and manifest["seed"] == 3 and len(manifest["history"]) == 1
    assert (server.data_dir / "jobs" / review_job / "out" / manifest["history"][0]["file"]).is_file()
    screenshot(browser, "review-job", 1100)


def test_accept_clears_the_flag(browser, server, review_job) -> None:
    open_page(browser, server, f"/jobs/{review_job}")
    browser.find_element("id", "reviewer").send_keys("Anna")
    click(browser, seg("s2", "[data-action=accept]"))
    wait(browser, lambda d: js(d, "const r = document.querySelector('.seg[data-segment-id=\"s2\"]');"
                                  "return r.dataset.suspect === 'false' && !!r.querySelector('.pill.accepted')"),
         "s2 accepted")
    assert text(browser, seg("s2", "[data-field=review]")).startswith("Accepted by Anna")
    assert text(browser, seg("s2", "[data-action=accept]")) is None
    wait(browser, lambda d: js(d, "return document.querySelector('#summary [data-count=suspect] b').textContent")
         == "0", "the job's suspect count to drop to 0")
    review = server.get(f"/v1/jobs/{review_job}/manifest").json()["segments"]["s2"]["review"]
    assert review["decision"] == "accepted" and review["by"] == "Anna" and review["reasons"] == ["clipped"]
    open_page(browser, server, f"/jobs/{review_job}")  # a reload shows the decision from the server
    wait(browser, lambda d: text(d, seg("s2", ".pill.accepted")), "the decision after a reload")


def test_gpu_charts_from_the_jobs_telemetry_events(browser, server) -> None:
    open_page(browser, server, f"/jobs/{GPU_JOB}")
    charts = wait(browser, lambda d: js(d, "return [...document.querySelectorAll('figure.gpu')].map(f => "
                                           "[f.dataset.gpu, Number(f.dataset.samples), "
                                           "f.querySelector('polyline.mem').getAttribute('points').split(' ').length, "
                                           "!!f.querySelector('polyline.util'), f.querySelector('.legend').textContent])"),
                  "the GPU charts")
    assert [c[:4] for c in charts] == [["0", GPU_SAMPLES, GPU_SAMPLES, True], ["1", GPU_SAMPLES, GPU_SAMPLES, True]]
    assert "of 80 GiB" in charts[0][4] and "peak" in charts[0][4] and "mean" in charts[0][4]
    screenshot(browser, "review-gpus", 1100, element=browser.find_element("id", "gpus-card"))


def test_a_phone_sized_screen_gets_one_column_and_no_sideways_scroll(browser, server, review_job) -> None:
    emulate(browser, 390, 844, mobile=True)
    try:
        open_page(browser, server, f"/jobs/{review_job}")
        layout = js(browser, "const s = getComputedStyle(document.querySelector('.seg'));"
                             "return [s.gridTemplateColumns.split(' ').length, document.documentElement.scrollWidth, "
                             "window.innerWidth]")
        assert layout[0] == 1 and layout[1] <= layout[2], layout
        screenshot(browser, "review-job-phone", 390, mobile=True, height=844)
    finally:
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})


def test_a_segment_id_is_one_url_piece(browser, server) -> None:
    """Issue 31: an id is a name, put into one URL piece by the page (a "/" travels as %2F, decoded by the server
    back into the id), so Accept reaches this job's segment. (Ids with "." / ".." pieces, which the page used to let
    a browser resolve into another job's URL, are refused by the server: tests/test_server_hardening.py.)"""
    body = {"speakers": {"a": {"reference_audio": data_url(wav_bytes(1.0, 150.0, seed=4)), "reference_text": "Hi."}},
            "segments": [{"id": "ch1/0001", "speaker": "a", "text": "A clipped line. @@clipped@@", "output": "c1.wav"}]}
    job_id = server.post("/v1/jobs", json=body).json()["id"]
    deadline = time.monotonic() + 120
    while server.get(f"/v1/jobs/{job_id}").json()["status"] != "done":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    open_page(browser, server, f"/jobs/{job_id}")
    click(browser, seg("ch1/0001", "[data-action=accept]"))
    wait(browser, lambda d: js(d, "return document.querySelector('.seg[data-segment-id=\"ch1/0001\"]')"
                                  ".dataset.suspect === 'false'"), "the accepted segment")
    (segment,) = server.get(f"/v1/jobs/{job_id}").json()["segments"]
    assert segment["id"] == "ch1/0001" and segment["suspect"] is False and segment["review"]["decision"] == "accepted"
