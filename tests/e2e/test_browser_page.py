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


def frames_shown(page) -> int:
    return int(page.evaluate("Number(document.getElementById('output').dataset.frames || 0)"))


def wait_for_more_frames(page, count: int = 3) -> None:
    page.wait_for_function(f"Number(document.getElementById('output').dataset.frames || 0) >= "
                           f"{frames_shown(page) + count}", timeout=30_000)


def test_webcam_page_round_trips_frames_and_controls_reach_the_daemon(browser, start_daemon):
    # engine "auto" with no model serves the preview engine; a model a client names makes it try to load one.
    daemon = start_daemon(params={"engine": "auto", "width": 256, "height": 256, "effect": "grade",
                                  "strength": 0.0})
    page = browser.new_page()
    console: list[str] = []
    failed: list[str] = []
    page.on("console", lambda message: console.append(f"{message.type}: {message.text}"))
    page.on("pageerror", lambda error: console.append(f"pageerror: {error}"))
    page.on("response", lambda response: failed.append(f"{response.status} {response.url}")
            if response.status >= 400 else None)
    try:
        page.goto(f"http://127.0.0.1:{daemon.port}/")
        page.wait_for_selector("#param-strength")  # controls generated from the schema
        assert page.get_attribute("#webrtc-link", "href") == "/webrtc"  # the WebRTC page is one click away
        assert page.locator("#param-plugin-flow_warp-enabled").count() == 1  # plugins' too
        # Stats before any frame: no latency yet reads "-", never "null".
        page.wait_for_function("document.getElementById('status').textContent.includes('fps')", timeout=10_000)
        assert "null" not in page.inner_text("#status") and "latency p50 -" in page.inner_text("#status")
        page.click("#start")
        page.wait_for_function("Number(document.getElementById('output').dataset.frames || 0) >= 3",
                               timeout=30_000)
        before = output_image(page)

        # A slider reaches the daemon and changes the output (strength 0 -> 1 of the colour grade).
        page.locator("#param-strength").fill("1")
        assert wait_until(lambda: daemon.store.get("strength") == 1.0)
        wait_for_more_frames(page)
        after = output_image(page)
        assert np.abs(after.astype(int) - before.astype(int)).mean() > 3

        # A text field.
        page.fill("#param-prompt", "a test from the browser")
        page.dispatch_event("#param-prompt", "change")
        assert wait_until(lambda: daemon.store.get("prompt") == "a test from the browser")

        # The seed (int, 0..2**32-1) is a number field, not a slider; Enter commits it.
        assert page.get_attribute("#param-seed", "type") == "number"
        page.fill("#param-seed", "12345")
        page.press("#param-seed", "Enter")
        assert wait_until(lambda: daemon.store.get("seed") == 12345)

        # A field being typed in is not overwritten by a change from elsewhere (OSC, another client)...
        page.fill("#param-negative_prompt", "half-typed")
        daemon.store.update({"negative_prompt": "from elsewhere"})
        page.wait_for_timeout(500)
        assert page.input_value("#param-negative_prompt") == "half-typed"

        # ...but once committed, the daemon's answer shows even with the focus still there: a model that
        # fails to load goes back to the one serving ("" here), and the error stays readable while stats
        # refresh #status (10 Hz in tests).
        page.fill("#param-model", "nope-model")
        page.press("#param-model", "Enter")
        page.wait_for_function("document.getElementById('error').textContent.includes('model_not_found')",
                               timeout=30_000)
        assert "nope-model" in page.inner_text("#error")
        page.wait_for_function("document.getElementById('param-model').value === ''", timeout=10_000)
        assert page.evaluate("document.activeElement.id") == "param-model"
        page.wait_for_timeout(1500)
        assert page.is_visible("#error") and "model_not_found" in page.inner_text("#error")
        assert "fps" in page.inner_text("#status")

        # The connection drops: a click meanwhile sends nothing (no console error, nothing queued) and says
        # so; a value changed meanwhile shows once the page has reconnected, and frames flow again.
        status = page.evaluate("""() => {
            ws.close();
            document.querySelector('button[data-preset=neon]').click();
            return document.getElementById('status').textContent;
        }""")
        assert "not connected" in status
        daemon.store.update({"strength": 0.5})
        page.wait_for_function("Number(document.getElementById('param-strength').value) === 0.5", timeout=15_000)
        page.wait_for_function("document.getElementById('status').textContent.includes('fps')", timeout=10_000)
        wait_for_more_frames(page)
        assert daemon.store.get("effect") == "grade"  # the preset clicked while disconnected was not queued

        # A preset button, connected again.
        page.click("button[data-preset=neon]")
        assert wait_until(lambda: daemon.store.get("effect") == "edges", timeout=15)
        page.wait_for_function("document.getElementById('param-effect').value === 'edges'", timeout=10_000)
        assert "fps" in page.inner_text("#status")
        # No console errors: neither "WebSocket is already in CLOSING or CLOSED state" nor the 404 of a
        # /favicon.ico request (chromium reports that one here, not as a page response), and no failed response.
        assert not [line for line in console if line.startswith(("error", "pageerror"))], console
        assert not failed, failed
    finally:
        page.close()
