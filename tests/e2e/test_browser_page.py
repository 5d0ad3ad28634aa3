"""The browser page in a real browser: Debian's chromium driven by Playwright, a fake camera."""

from __future__ import annotations

import os
import shutil
import time

import pytest

CHROMIUM = next((path for path in ("/usr/lib/chromium/chromium", shutil.which("chromium") or "")
                 if path and os.path.exists(path)), None)

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test-deps)")]

CHROMIUM_ARGS = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", "--disable-quic"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def test_webcam_page_round_trips_frames(browser, start_daemon):
    daemon = start_daemon(params={"engine": "preview", "width": 256, "height": 256})
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{daemon.port}/")
        page.click("#start")
        page.wait_for_function("Number(document.getElementById('output').dataset.frames || 0) >= 3",
                               timeout=30_000)
        # The page's prompt box sets the parameter over the same WebSocket.
        page.fill("#prompt", "a test from the browser")
        page.dispatch_event("#prompt", "change")
        deadline = time.monotonic() + 10
        while daemon.store.get("prompt") != "a test from the browser" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert daemon.store.get("prompt") == "a test from the browser"
        stats = daemon.collect_stats()
        assert stats["frames_out"] >= 3
    finally:
        page.close()
