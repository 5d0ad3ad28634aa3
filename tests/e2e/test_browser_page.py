"""The browser page in a real browser: Debian's chromium driven by Playwright, a fake camera."""

from __future__ import annotations

import os
import shutil
import time

import numpy as np
import pytest

from sdbridge.bridge import codec

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


def wait_until(predicate, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def output_image(page) -> np.ndarray:
    data = page.evaluate("""async () => {
        const blob = await (await fetch(document.getElementById('output').src)).blob();
        return Array.from(new Uint8Array(await blob.arrayBuffer()));
    }""")
    return codec.decode_image(bytes(data))


def test_webcam_page_round_trips_frames_and_controls_reach_the_daemon(browser, start_daemon):
    daemon = start_daemon(params={"engine": "preview", "width": 256, "height": 256, "effect": "grade",
                                  "strength": 0.0})
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{daemon.port}/")
        page.wait_for_selector("#param-strength")  # controls generated from the schema
        assert page.locator("#param-plugin-flow_warp-enabled").count() == 1  # plugins' too
        page.click("#start")
        page.wait_for_function("Number(document.getElementById('output').dataset.frames || 0) >= 3",
                               timeout=30_000)
        before = output_image(page)

        # A slider reaches the daemon and changes the output (strength 0 -> 1 of the colour grade).
        page.locator("#param-strength").fill("1")
        assert wait_until(lambda: daemon.store.get("strength") == 1.0)
        frames = int(page.evaluate("document.getElementById('output').dataset.frames"))
        page.wait_for_function(f"Number(document.getElementById('output').dataset.frames) >= {frames + 3}",
                               timeout=30_000)
        after = output_image(page)
        assert np.abs(after.astype(int) - before.astype(int)).mean() > 3

        # A text field and a preset button.
        page.fill("#param-prompt", "a test from the browser")
        page.dispatch_event("#param-prompt", "change")
        assert wait_until(lambda: daemon.store.get("prompt") == "a test from the browser")
        page.click("button[data-preset=neon]")
        assert wait_until(lambda: daemon.store.get("effect") == "edges", timeout=15)
        page.wait_for_function("document.getElementById('param-effect').value === 'edges'", timeout=10_000)
        assert "fps" in page.inner_text("#status")
    finally:
        page.close()
