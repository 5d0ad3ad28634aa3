"""The WebRTC page (/webrtc) in Debian's chromium: the fake camera through WHIP, the output through WHEP, and what
the page says when the camera is refused or out of reach, or when nothing feeds the session it watches."""

from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from tests.e2e.test_browser_page import CHROMIUM, CHROMIUM_ARGS

pytest.importorskip("aiortc", reason="WebRTC tests need aiortc (pip install \"sdbridge[webrtc]\")")

from tests.clients import wait_for  # noqa: E402
from tests.integration.test_webrtc_daemon import RED, needs_interface, publish, stats  # noqa: E402

pytestmark = [pytest.mark.e2e, needs_interface,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test-deps)")]

SIZE = 128
# Chromium hides a page's local addresses behind mDNS names (.local) unless it holds a camera permission; aiortc
# would resolve them by multicast, which tests never send. With this flag the viewer's offer carries its address.
ARGS = [*CHROMIUM_ARGS, "--disable-features=WebRtcHideLocalIpsWithMdns"]


# A name that reaches the daemon on loopback but is not localhost: over plain http the page is no secure context there.
OTHER_HOST = "sdbridge.test"


@pytest.fixture(scope="module")
def browser(playwright):
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


@pytest.fixture
def rig(browser, start_daemon):
    """A daemon on the identity engine, a chromium page (its script errors kept), and an asyncio loop with an HTTP
    client for aiortc peers beside the page; the peers published through :func:`send_red` are closed after."""
    import httpx

    daemon = start_daemon(params={"engine": "identity", "width": SIZE, "height": SIZE})
    base = f"http://127.0.0.1:{daemon.port}"
    loop = LoopThread()
    rig = SimpleNamespace(daemon=daemon, base=base, loop=loop, page=browser.new_page(), errors=[], senders=[],
                          http=httpx.AsyncClient(base_url=base, timeout=30))
    rig.page.on("pageerror", lambda error: rig.errors.append(str(error)))
    try:
        yield rig
    finally:
        rig.page.close()
        for sender in rig.senders:
            loop.run(sender.close())
        loop.run(rig.http.aclose())
        loop.close()


def send_red(rig, session: str) -> None:
    """An aiortc WHIP sender of solid RED frames into ``session``."""
    sender, posted = rig.loop.run(publish(rig.http, session, RED))
    rig.senders.append(sender)
    assert posted.status_code == 201, posted.text


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


def shown(page) -> dict[str, Any]:
    """The page's status line, and its hint and error boxes (None while hidden)."""
    return page.evaluate("""() => {
        const box = id => { const e = document.getElementById(id); return !e || e.hidden ? null : e.textContent; };
        return {status: document.getElementById('status').textContent, hint: box('hint'), error: box('error')};
    }""")


def test_the_page_watches_a_session_through_whep_and_sends_its_camera_through_whip(rig) -> None:
    page, daemon, base = rig.page, rig.daemon, rig.base
    # 1. A solid colour from aiortc comes back into chromium's <video> through WHEP.
    send_red(rig, "red")
    page.goto(f"{base}/webrtc?session=red")
    page.click("#watch")
    page.wait_for_function("Number(document.getElementById('output').dataset.frames || 0) >= 5", timeout=30_000)
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
    page.wait_for_function("Number(document.getElementById('output').dataset.frames || 0) >= 3", timeout=30_000)
    mean, size = shown_mean(page)
    assert size == [SIZE, SIZE] and max(mean) > 20  # fitted to the engine, and not a black frame
    live = stats(daemon)["webrtc"]
    assert (live["whip"], live["whep"]) == (2, 1) and live["frames_out"] > 0

    # 3. Stop DELETEs both of the page's resources; the session is released.
    page.click("#stop")
    assert wait_for(lambda: daemon.registry.get("cam") is None, 10)
    assert [c["session"] for c in stats(daemon)["webrtc"]["connections"]] == ["red"]
    assert rig.errors == []


def test_the_page_says_why_the_camera_cannot_be_had(playwright, start_daemon) -> None:
    # No fake-UI flag: chromium asks for the camera, and this flag answers no, as a user who clicked "Block".
    args = [arg for arg in ARGS if arg != "--use-fake-ui-for-media-stream"]
    args += ["--deny-permission-prompts", f"--host-resolver-rules=MAP {OTHER_HOST} 127.0.0.1"]
    daemon = start_daemon(params={"engine": "identity", "width": SIZE, "height": SIZE}, allowed_hosts=[OTHER_HOST])
    browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=args)
    try:
        # 1. Refused: the page says so and where to allow it (it said only "Permission denied", status "idle").
        page = browser.new_page()
        page.goto(f"http://127.0.0.1:{daemon.port}/webrtc?session=refused")
        page.click("#send")
        page.wait_for_function("!document.getElementById('error').hidden", timeout=10_000)
        state = shown(page)
        assert state["status"] == "error", state
        assert "the camera was refused" in state["error"] and "site permissions" in state["error"], state
        assert stats(daemon)["webrtc"]["whip"] == 0

        # 2. Plain http on a host other than localhost: no navigator.mediaDevices at all. The page names the cause.
        page = browser.new_page()
        page.goto(f"http://{OTHER_HOST}:{daemon.port}/webrtc?session=far")
        assert page.evaluate("navigator.mediaDevices === undefined")  # what a LAN address gives, for real
        page.click("#send")
        page.wait_for_function("!document.getElementById('error').hidden", timeout=10_000)
        state = shown(page)
        assert state["status"] == "error", state
        assert "over plain http" in state["error"] and f"on {OTHER_HOST}" in state["error"], state
        assert f"http://localhost:{daemon.port}/webrtc" in state["error"], state
    finally:
        browser.close()


def test_watching_a_session_nobody_feeds_hints_why_and_a_success_clears_an_error(rig) -> None:
    page = rig.page
    # 1. An error: a session name the daemon refuses.
    page.goto(f"{rig.base}/webrtc?session=a%20b")
    page.click("#watch")
    page.wait_for_function("!document.getElementById('error').hidden", timeout=10_000)
    state = shown(page)
    assert state["status"] == "error" and "WHEP 400" in state["error"], state

    # 2. Then a success on a session that has no sender: the old error goes, and after a few seconds
    # without a frame a hint says what may be missing.
    page.fill("#session", "empty")
    page.click("#watch")
    page.wait_for_function("document.getElementById('status').textContent === 'watching'", timeout=10_000)
    assert shown(page)["error"] is None
    page.wait_for_function("!document.getElementById('hint').hidden", timeout=10_000)
    state = shown(page)
    assert 'session "empty"' in state["hint"] and "/stats" in state["hint"] and frames_shown(page) == 0, state

    # 3. A sender arrives: frames are shown and the hint goes.
    send_red(rig, "empty")
    page.wait_for_function("Number(document.getElementById('output').dataset.frames || 0) >= 1", timeout=30_000)
    assert shown(page) == {"status": "watching", "hint": None, "error": None}
    assert rig.errors == []


def test_the_page_notices_a_lost_connection_and_connects_again(browser) -> None:
    from sdbridge.bridge.server import DaemonThread
    from sdbridge.config import Settings

    def daemon_on(port: int) -> tuple[DaemonThread, Any]:
        settings = Settings(port=port, osc_port=0, oscquery_port=0, feedback_port=0, telemetry_hz=10.0)
        settings.params = {"engine": "identity", "width": SIZE, "height": SIZE}
        thread = DaemonThread(settings)
        return thread, thread.start()

    first, daemon = daemon_on(0)
    port = daemon.port
    second = None
    page = browser.new_page()
    errors: list[str] = []
    deletes: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    page.on("request", lambda request: deletes.append(request.url) if request.method == "DELETE" else None)
    enabled = "() => ['send', 'watch', 'stop'].map(id => !document.getElementById(id).disabled)"
    try:
        page.goto(f"http://127.0.0.1:{port}/webrtc?session=cam")
        assert page.evaluate(enabled) == [True, True, False]  # nothing to stop yet
        # 1. Sending and watching: each button is disabled while its peer lives, so a second press opens no second peer.
        page.click("#send")
        page.wait_for_function("document.getElementById('status').textContent === 'sending'", timeout=30_000)
        page.click("#watch")
        page.wait_for_function("Number(document.getElementById('output').dataset.frames || 0) >= 3", timeout=30_000)
        assert page.evaluate(enabled) == [False, False, True]
        assert shown(page)["status"] == "sending, watching"  # both, not only the last action
        page.evaluate("() => { document.getElementById('send').click(); document.getElementById('watch').click(); }")
        live = stats(daemon)["webrtc"]
        assert (live["whip"], live["whep"]) == (1, 1), live

        # 2. The daemon goes away: both peers are noticed as lost (chromium: "disconnected" after some seconds), the
        # status says so, and send and watch work again; the lost peers are no longer DELETEd later.
        first.stop()
        page.wait_for_function("document.getElementById('status').textContent.startsWith('connection lost') && "
                               "resources.length === 0", timeout=90_000)
        assert page.evaluate(enabled) == [True, True, False]
        told = shown(page)["status"]  # both, not only the last one lost (QA 11); the camera released with its peer
        assert "(WHIP)" in told and "(WHEP)" in told, told
        assert page.evaluate("document.getElementById('camera').srcObject === null")

        # 3. The daemon is back on its port: watch and send again connect, with no DELETE of the lost peers.
        second, daemon = daemon_on(port)
        page.click("#send")
        page.wait_for_function("document.getElementById('status').textContent.startsWith('sending; connection lost "
                               "(WHEP)')", timeout=30_000)  # what is still lost is still told
        before = frames_shown(page)
        page.click("#watch")
        page.wait_for_function(f"Number(document.getElementById('output').dataset.frames || 0) >= {before + 3}",
                               timeout=30_000)
        live = stats(daemon)["webrtc"]
        assert (live["whip"], live["whep"]) == (1, 1), live
        assert deletes == []
        page.click("#stop")  # DELETEs the two live peers, one after the other
        page.wait_for_function("document.getElementById('status').textContent === 'stopped'", timeout=10_000)
        assert wait_for(lambda: stats(daemon)["webrtc"]["whip"] + stats(daemon)["webrtc"]["whep"] == 0, 10)
        assert len(deletes) == 2 and errors == [], deletes
    finally:
        page.close()
        first.stop()
        if second is not None:
            second.stop()
