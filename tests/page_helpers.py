"""The review page's tests' browser: Debian's headless chromium driven by Selenium through Debian's chromedriver
(scripts/setup.sh installs both with apt-get). Nothing is downloaded: the binaries are named explicitly, so Selenium
Manager never runs. Without them the tests skip and say what is missing. Not a test module."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import pytest

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
SCREENSHOTS = os.environ.get("FISHMP_SCREENSHOTS")  # a directory: the tests save the README's screenshots there
WAIT_S = 90.0  # explicit waits, generous: the machine may be loaded


def browser_problem() -> str | None:
    """Why the browser tests cannot run here (the skip reason), or None."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "no browser driver library: selenium is not installed (pip install -e '.[dev]')"
    missing = [name for name, found in (("chromium", any(map(shutil.which, BROWSERS))),
                                        ("chromedriver", shutil.which("chromedriver"))) if not found]
    if missing:
        return (f"no headless browser: {' and '.join(missing)} not found on PATH (scripts/setup.sh installs Debian's "
                "chromium and chromium-driver with apt-get where it can: apt-get install chromium chromium-driver)")
    return None


def find_browser() -> tuple[str, str]:
    """(browser, driver) paths, or a skip that names what is missing and how to get it."""
    problem = browser_problem()
    if problem:
        pytest.skip(problem)
    browser = next(p for p in map(shutil.which, BROWSERS) if p)
    return browser, str(shutil.which("chromedriver"))


def start_browser() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = find_browser()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1280,900",
                "--hide-scrollbars", "--autoplay-policy=no-user-gesture-required", "--lang=en-GB",
                "--disable-extensions", "--no-first-run", "--disable-background-networking"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})  # the page's console, for script_errors()
    return webdriver.Chrome(service=Service(driver), options=options)


def script_errors(driver: Any) -> list[str]:
    """The page's uncaught errors and console.error lines since the last call (an answer of 4xx on the network is
    logged too: those the tests cause on purpose, such as the first 401 that asks for the key, are left out)."""
    return [e["message"] for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "Failed to load resource" not in e["message"]]


def stop_browser(driver: Any) -> None:
    """Quit, and check that chromedriver (and with it the browser) is gone."""
    process = driver.service.process
    driver.quit()
    if process is not None:
        process.wait(30)
        assert process.poll() is not None, "chromedriver outlived the test"


def wait(driver: Any, condition: Callable[[Any], Any], what: str, timeout: float = WAIT_S) -> Any:
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.1).until(condition, f"timed out waiting for {what}")


def js(driver: Any, script: str, *args: Any) -> Any:
    return driver.execute_script(script, *args)


def click(driver: Any, css: str, what: str | None = None) -> None:
    """Click the element `css` selects once it is there; the page re-renders a segment's row on each of its events,
    so an element found a moment ago may be gone (stale): found again until the click lands."""
    from selenium.common.exceptions import ElementNotInteractableException, StaleElementReferenceException

    def attempt(d: Any) -> bool:
        try:
            found = d.find_elements("css selector", css)
            if not found:
                return False
            found[0].click()
            return True
        except (StaleElementReferenceException, ElementNotInteractableException):
            return False

    wait(driver, attempt, what or f"{css} to click")


def text(driver: Any, css: str) -> str | None:
    """The text of the element `css` selects, read in one step (no stale element), or None."""
    return js(driver, "const n = document.querySelector(arguments[0]); return n && n.textContent", css)


def emulate(driver: Any, width: int, height: int, mobile: bool = False) -> None:
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile})


def screenshot(driver: Any, name: str, width: int = 1280, mobile: bool = False, element: Any = None,
               height: int | None = None) -> None:
    """With FISHMP_SCREENSHOTS=DIR: DIR/NAME.png of the whole page at `width` CSS pixels (or of one element; or of
    the top `height` pixels, as a screen that size shows it)."""
    if not SCREENSHOTS:
        return
    os.makedirs(SCREENSHOTS, exist_ok=True)
    path = os.path.join(SCREENSHOTS, f"{name}.png")
    try:
        emulate(driver, width, height or 600, mobile)
        if height is None:
            height = js(driver, "return Math.ceil(document.querySelector('main').getBoundingClientRect().bottom + scrollY)")
            emulate(driver, width, min(int(height), 4000), mobile)
        js(driver, "window.scrollTo(0, 0)")
        wait(driver, lambda d: js(d, "return [...document.querySelectorAll('.seg:not([hidden]) .seg-side audio')]"
                                     ".every(a => a.hidden || a.readyState >= 1 || "
                                     "a.getBoundingClientRect().top > innerHeight)"), "the players on screen to load")
        if element is not None:
            element.screenshot(path)
        else:
            driver.save_screenshot(path)
    finally:
        driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
