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
    pytest.importorskip("aiortc", reason="WebRTC needs aiortc (pip install \"sdbridge[webrtc]\")")
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


def open_page(browser, daemon, **options):
    page = browser.new_page(**options)
    page.goto(f"http://127.0.0.1:{daemon.port}/")
    page.wait_for_selector("#param-seed")
    page.wait_for_function("isOpen()", timeout=10_000)  # the controls come from /params, before the WebSocket
    return page


def test_an_emptied_number_goes_back_to_the_daemons_value_and_errors_go_once_a_later_value_is_taken(
        browser, start_daemon) -> None:
    daemon = start_daemon(params={"engine": "identity", "seed": 42})
    page = open_page(browser, daemon)
    try:
        # 1. The seed emptied and left (QA 11 #6): nothing is sent, and the field shows the daemon's value again, the
        # latest one (43, set elsewhere meanwhile), not an empty field nor one the daemon does not have.
        daemon.store.update({"seed": 43})
        page.wait_for_function("document.getElementById('param-seed').value === '43'", timeout=10_000)
        page.fill("#param-seed", "")
        page.press("#param-seed", "Tab")
        page.wait_for_function(f"({ERROR} || '').includes('not a number')", timeout=10_000)
        assert page.input_value("#param-seed") == "43" and daemon.store.get("seed") == 43
        # ...and its error goes once a seed is taken.
        page.fill("#param-seed", "7")
        page.press("#param-seed", "Enter")
        page.wait_for_function(f"{ERROR} === null", timeout=10_000)
        assert daemon.store.get("seed") == 7

        # 2. A value not sent while disconnected (QA 11 #9): its error stays through the reconnection and other
        # parameters' values, and goes once a later value of that parameter is acknowledged.
        page.evaluate("() => { ws.close(); send({prompt: 'lost'}); }")
        page.wait_for_function(f"({ERROR} || '').includes('prompt not sent')", timeout=10_000)
        page.wait_for_function("isOpen()", timeout=15_000)
        page.evaluate("send({strength: 0.25})")
        assert wait_until(lambda: daemon.store.get("strength") == 0.25)
        page.wait_for_timeout(500)
        assert "prompt not sent" in (page.evaluate(ERROR) or "")
        page.fill("#param-prompt", "found")
        page.dispatch_event("#param-prompt", "change")
        page.wait_for_function(f"{ERROR} === null", timeout=10_000)
        assert daemon.store.get("prompt") == "found"

        # 3. A value the daemon refused: its error goes once a good value of that parameter is taken.
        page.fill("#param-seed", "99999999999")
        page.press("#param-seed", "Enter")
        page.wait_for_function(f"({ERROR} || '').includes('bad_param')", timeout=10_000)
        page.fill("#param-seed", "8")
        page.press("#param-seed", "Enter")
        page.wait_for_function(f"{ERROR} === null", timeout=10_000)
    finally:
        page.close()


def test_arrow_keys_move_a_slider_by_a_hundredth_of_its_range(browser, start_daemon) -> None:
    """QA 11 #8: two ArrowRight presses moved strength from 0.3 to 0.302 (its mouse step, 0.001)."""
    daemon = start_daemon(params={"engine": "identity", "strength": 0.3})
    page = open_page(browser, daemon)
    try:
        open_sections(page)
        steps = page.evaluate("""[...document.querySelectorAll('#controls input[type=range]')].map(i =>
            [i.id, Number(i.min), Number(i.max), Number(i.step), Number(i.dataset.keyStep)])""")
        assert len(steps) > 20
        for name, low, high, step, key in steps:
            multiple = key / step
            assert key >= step and abs(multiple - round(multiple)) < 1e-6, (name, step, key)
            assert key == step or 10 <= (high - low) / key <= 1000, (name, low, high, key)  # about a hundredth
        assert page.get_attribute("#param-strength", "step") == "0.001"  # the mouse still drags finely
        assert page.get_attribute("#param-strength", "data-key-step") == "0.01"

        page.focus("#param-strength")
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowRight")
        assert wait_until(lambda: abs(daemon.store.get("strength") - 0.32) < 1e-6), daemon.store.get("strength")
        page.keyboard.press("ArrowDown")
        assert wait_until(lambda: abs(daemon.store.get("strength") - 0.31) < 1e-6), daemon.store.get("strength")
        assert page.input_value("#param-strength") == "0.31"
        assert page.evaluate("document.getElementById('param-strength').nextElementSibling.textContent") == "0.31"
        # Off the grid (set by the mouse or elsewhere), a press goes to the next round value; the range's ends hold.
        daemon.store.update({"strength": 0.996})
        page.wait_for_function("document.getElementById('param-strength').value === '0.996'", timeout=10_000)
        page.keyboard.press("ArrowRight")
        assert wait_until(lambda: daemon.store.get("strength") == 1.0)
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowLeft")
        assert wait_until(lambda: abs(daemon.store.get("strength") - 0.99) < 1e-6), daemon.store.get("strength")
    finally:
        page.close()


def test_at_1024x700_the_pictures_stats_and_links_fit_the_window(browser, start_daemon) -> None:
    """QA 11 #7: the pictures' column was taller than the window; its stats and links were cut off at the bottom."""
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64})
    for width, height in ((1024, 700), (1440, 900)):
        page = open_page(browser, daemon, viewport={"width": width, "height": height})
        try:
            page.click("#start")
            page.wait_for_function("Number(document.getElementById('output').dataset.frames || 0) >= 3",
                                   timeout=30_000)
            page.wait_for_function("document.getElementById('status').textContent.includes('frames')",
                                   timeout=10_000)
            for scroll in (0, 600):  # at the top of the page, and with the controls scrolled
                page.evaluate(f"window.scrollTo(0, {scroll})")
                media = page.evaluate("""(() => { const m = document.getElementById('media');
                    return {inner: m.scrollHeight - m.clientHeight,
                            links: document.getElementById('links').getBoundingClientRect().bottom,
                            status: document.getElementById('status').getBoundingClientRect().bottom}; })()""")
                assert media["inner"] <= 1 and media["links"] <= height and media["status"] <= height, (width, media)
            assert page.evaluate("document.getElementById('output').parentElement.getBoundingClientRect().width") > 200
        finally:
            page.close()
