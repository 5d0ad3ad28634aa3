"""The WebRTC page (/webrtc) in Debian's chromium: the fake camera through WHIP, the output through WHEP."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import numpy as np
import pytest

from tests.e2e.test_browser_page import CHROMIUM, CHROMIUM_ARGS

pytest.importorskip("aiortc", reason="WebRTC tests need aiortc (pip install 'sdbridge[webrtc]')")

from tests.clients import wait_for  # noqa: E402
from tests.integration.test_webrtc_daemon import RED, needs_interface, publish, stats  # noqa: E402

pytestmark = [pytest.mark.e2e, needs_interface,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test-deps)")]

SIZE = 128
# Chromium hides a page's local addresses behind mDNS names (.local) unless it holds a camera permission; aiortc
# would resolve them by multicast, which tests never send. With this flag the viewer's offer carries its address.
ARGS = [*CHROMIUM_ARGS, "--disable-features=WebRtcHideLocalIpsWithMdns"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


class LoopThread:
    """An asyncio loop in a thread, for an aiortc peer beside Playwright's synchronous API."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result(timeout=30)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def frames_shown(page) -> int:
    return int(page.evaluate("Number(document.getElementById('output').dataset.frames || 0)"))


def shown_mean(page) -> tuple[list[float], list[int]]:
    """The WHEP video's current frame drawn to a canvas: its mean RGB and its size."""
    return page.evaluate("""() => {
        const video = document.getElementById('output');
        const canvas = document.createElement('canvas');
        canvas.width = video.videoWidth; canvas.height = video.videoHeight;
        const context = canvas.getContext('2d');
        context.drawImage(video, 0, 0);
        const data = context.getImageData(0, 0, canvas.width, canvas.height).data;
        const sum = [0, 0, 0];
        for (let i = 0; i < data.length; i += 4) { sum[0] += data[i]; sum[1] += data[i + 1]; sum[2] += data[i + 2]; }
        const n = data.length / 4;
        return [sum.map(v => v / n), [canvas.width, canvas.height]];
    }""")


def session_stats(daemon, name: str) -> dict[str, Any] | None:
    return next((s for s in stats(daemon)["sessions"] if s["id"] == name), None)


def test_the_page_watches_a_session_through_whep_and_sends_its_camera_through_whip(browser, start_daemon) -> None:
    import httpx

    daemon = start_daemon(params={"engine": "identity", "width": SIZE, "height": SIZE})
    base = f"http://127.0.0.1:{daemon.port}"
    peer_loop = LoopThread()
    http = httpx.AsyncClient(base_url=base, timeout=30)
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    sender = None
    try:
        # 1. A solid colour from aiortc comes back into chromium's <video> through WHEP.
        sender, posted = peer_loop.run(publish(http, "red", RED))
        assert posted.status_code == 201, posted.text
        page.goto(f"{base}/webrtc?session=red")
        page.click("#watch")
        page.wait_for_function("Number(document.getElementById('output').dataset.frames || 0) >= 5",
                               timeout=30_000)
        mean, size = shown_mean(page)
        assert size == [SIZE, SIZE]  # WHEP sends the engine's frames, at its resolution (the sender's is 64)
        assert np.abs(np.array(mean) - RED).max() < 10, mean
        assert stats(daemon)["webrtc"]["whep"] == 1

        # 2. Chromium's fake camera (640x480) feeds another session through WHIP; the page watches it too.
        page.goto(f"{base}/webrtc?session=cam")  # pagehide DELETEs the first page's viewer
        assert wait_for(lambda: stats(daemon)["webrtc"]["whep"] == 0, 10)
        page.click("#send")
        assert wait_for(lambda: (session_stats(daemon, "cam") or {}).get("frames_in", 0) >= 3, 30)
        page.click("#watch")
        page.wait_for_function("Number(document.getElementById('output').dataset.frames || 0) >= 3",
                               timeout=30_000)
        mean, size = shown_mean(page)
        assert size == [SIZE, SIZE] and max(mean) > 20  # fitted to the engine, and not a black frame
        live = stats(daemon)["webrtc"]
        assert (live["whip"], live["whep"]) == (2, 1) and live["frames_out"] > 0

        # 3. Stop DELETEs both of the page's resources; the session is released.
        page.click("#stop")
        assert wait_for(lambda: daemon.registry.get("cam") is None, 10)
        assert [c["session"] for c in stats(daemon)["webrtc"]["connections"]] == ["red"]
        assert errors == []
    finally:
        page.close()
        if sender is not None:
            peer_loop.run(sender.close())
        peer_loop.run(http.aclose())
        peer_loop.close()
