"""The job page shows the fit (the speed a line took to fit its slot, or its overrun) and plays a fitted line's raw
take, in a real headless browser (Debian's chromium through Selenium; page_helpers.py) against a real server."""

from __future__ import annotations

import time

import pytest
from page_helpers import browser_problem, click, js, script_errors, start_browser, stop_browser, wait
from serve_helpers import Server, data_url, synthetic_env, wav_bytes

PROBLEM = browser_problem()
pytestmark = [pytest.mark.timeout(300), pytest.mark.skipif(PROBLEM is not None, reason=str(PROBLEM))]
LINE = "Hello there, my friend."  # 1.38 s of synthetic tone


def test_the_job_page_shows_the_fit_and_plays_the_raw_take(tmp_path) -> None:
    srv = Server(tmp_path, synthetic_env(tmp_path, FISH_CPU_WORKERS="1")).wait_ready()
    driver = None
    try:
        body = {"speakers": {"a": {"reference_audio": data_url(wav_bytes(1.0, 150.0, seed=2)), "reference_text": "Hi."}},
                "segments": [{"id": "fits", "speaker": "a", "text": LINE, "start": 0.0, "end": 1.2},
                             {"id": "over", "speaker": "a", "text": LINE, "start": 2.0, "end": 2.69}]}  # needs 2x
        job_id = srv.post("/v1/jobs", json=body).json()["id"]
        deadline = time.monotonic() + 120
        while srv.get(f"/v1/jobs/{job_id}").json()["status"] != "done":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        driver = start_browser()
        driver.get(srv.url(f"/jobs/{job_id}"))
        wait(driver, lambda d: js(d, "return document.body.dataset.ready"), "the job page")

        def fact(sid: str) -> str | None:
            return js(driver, "const n = document.querySelector(arguments[0]); return n && n.textContent",
                      f'.seg[data-segment-id="{sid}"] [data-field=fit]')

        wait(driver, lambda d: fact("fits") and fact("over"), "the fit facts")
        assert fact("fits").startswith("fitted ×1.15 to 1.2") and "raw take" in fact("fits")
        assert fact("over").startswith("overrun: needs ×2") and "(×1.25 applied)" in fact("over")
        click(driver, '.seg[data-segment-id="fits"] [data-action=raw]')
        duration = wait(driver, lambda d: js(d, "const a = document.querySelector(arguments[0]);"
                                                "return a && a.readyState >= 1 && a.duration",
                                             '.seg[data-segment-id="fits"] [data-field=fit] audio'), "the raw take")
        assert abs(duration - 1.38) < 0.05  # the take before the fit
        assert script_errors(driver) == []
    finally:
        if driver is not None:
            stop_browser(driver)
        assert srv.stop() == 0, srv.log()
