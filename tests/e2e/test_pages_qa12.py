"""Small things a QA pass found on the pages: errors that outlived what they were about, the seed field left empty,
slider keyboard steps too fine to use live, and the stats under the pictures at 1024x700."""

from __future__ import annotations

import pytest

from tests.e2e.test_browser_page import CHROMIUM, CHROMIUM_ARGS, open_sections, wait_until

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test-deps)")]

ERROR = "(() => { const e = document.getElementById('error'); return e.hidden ? null : e.textContent; })()"


@pytest.fixture(scope="module")
def browser(playwright):
    args = [*CHROMIUM_ARGS, "--disable-features=WebRtcHideLocalIpsWithMdns"]
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
    yield browser
    browser.close()


def test_webrtc_a_watch_that_works_keeps_the_send_error_until_send_works(browser, start_daemon) -> None:
    """QA 11 #5: a watch that succeeded erased why send had failed; each action's error now stays until it works."""
    pytest.importorskip("aiortc", reason="WebRTC needs aiortc (pip install 'sdbridge[webrtc]')")
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64})
    page = browser.new_page()
    try:
        page.goto(f"http://127.0.0.1:{daemon.port}/webrtc?session=a%20b")  # a name the daemon refuses
        page.click("#send")
        page.wait_for_function(f"({ERROR} || '').includes('WHIP 400')", timeout=15_000)
        assert page.evaluate("document.getElementById('camera').srcObject") is None  # the camera is not left on
        page.fill("#session", "stage")
        page.click("#watch")
        page.wait_for_function("document.getElementById('status').textContent === 'watching'", timeout=15_000)
        error = page.evaluate(ERROR)
        assert error is not None and error.startswith("send: WHIP 400"), error
        # send works now: its error goes, and nothing else was failing.
        page.click("#send")
        page.wait_for_function("document.getElementById('status').textContent === 'sending, watching'",
                               timeout=15_000)
        assert page.evaluate(ERROR) is None
    finally:
        page.close()
