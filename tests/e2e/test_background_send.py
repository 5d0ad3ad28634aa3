"""The / page keeps sending camera frames while its tab is hidden (an artist who switches to TouchDesigner or another
tab must not stop the stream on stage).

Chromium is driven here over its DevTools protocol directly, not through Playwright: Playwright emulates focus on
every page it drives, which keeps a page "visible" in a background tab, and launches chromium with the flags that
turn off background throttling. Launched plainly, headless chromium hides a tab another tab has replaced: rAF stops
there and the page's timers run once a second, as in a desktop browser.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_browser_page import CHROMIUM

pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (make test-deps)")]

ARGS = ["--headless", "--no-sandbox", "--remote-debugging-port=0", "--use-fake-ui-for-media-stream",
        "--use-fake-device-for-media-stream", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run", "--disable-quic", "--no-default-browser-check"]


class Chromium:
    """Headless chromium and one DevTools connection to it: open tabs, bring one to the front, evaluate in one."""

    def __init__(self, profile: Path) -> None:
        from websockets.sync.client import connect

        self.process = subprocess.Popen([CHROMIUM, *ARGS, f"--user-data-dir={profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        active = profile / "DevToolsActivePort"  # chromium writes its port and path there once it listens
        deadline = time.monotonic() + 30
        while not (active.exists() and len(active.read_text().split()) == 2):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port")
            time.sleep(0.05)
        port, path = active.read_text().split()
        self.socket = connect(f"ws://127.0.0.1:{port}{path}", max_size=None, open_timeout=10)
        self.ids = itertools.count(1)

    def call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> dict[str, Any]:
        request_id = next(self.ids)
        message: dict[str, Any] = {"id": request_id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.socket.send(json.dumps(message))
        while True:  # events in between are not needed here
            reply = json.loads(self.socket.recv(timeout=30))
            if reply.get("id") == request_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def open(self, url: str) -> tuple[str, str]:
        """A new foreground tab: its target id and a session to evaluate in (no focus emulation, unlike Playwright)."""
        target = self.call("Target.createTarget", {"url": url})["targetId"]
        session = self.call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        return target, session

    def evaluate(self, session: str, expression: str) -> Any:
        result = self.call("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True},
                           session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, session: str, expression: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.evaluate(session, expression):
            if time.monotonic() > deadline:
                raise AssertionError(f"not true after {timeout} s: {expression}")
            time.sleep(0.1)

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def frames_in(port: int) -> int:
    """Frames the daemon took in from the page's session (the only one that sends)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/stats", timeout=10) as answer:
        stats = json.load(answer)
    senders = [session for session in stats["sessions"] if session["senders"] > 0]
    assert len(senders) == 1, stats["sessions"]
    return senders[0]["frames_in"]


def test_the_page_keeps_sending_frames_while_its_tab_is_hidden(start_daemon, tmp_path) -> None:
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64})
    chromium = Chromium(tmp_path / "profile")
    try:
        target, page = chromium.open(f"http://127.0.0.1:{daemon.port}/")
        chromium.wait_for(page, "typeof isOpen === 'function' && isOpen() && !!document.getElementById('start')")
        chromium.evaluate(page, "document.getElementById('start').click()")
        chromium.wait_for(page, "Number(document.getElementById('output').dataset.frames || 0) >= 3")

        # Another tab in front: the page is hidden, as behind TouchDesigner. rAF no longer runs there.
        other, _ = chromium.open("about:blank")
        chromium.call("Target.activateTarget", {"targetId": other})
        chromium.wait_for(page, "document.visibilityState === 'hidden'", timeout=10)
        raf = chromium.evaluate(page, "new Promise(r => { let n = 0; const f = () => { n += 1; "
                                      "requestAnimationFrame(f); }; requestAnimationFrame(f); "
                                      "setTimeout(() => r(n), 1500); })")
        assert raf <= 2, f"rAF ran {raf} times in 1.5 s: the tab is not really in the background"

        # Frames keep reaching the daemon, new ones (the camera plays on in a hidden tab), at a usable rate: the fake
        # camera gives 30 frames/s and the identity engine keeps up; 3 frames/s is 10x below.
        first, played = frames_in(daemon.port), chromium.evaluate(page, "document.getElementById('camera').currentTime")
        time.sleep(3.0)
        last, playing = frames_in(daemon.port), chromium.evaluate(page, "document.getElementById('camera').currentTime")
        assert chromium.evaluate(page, "document.visibilityState") == "hidden"
        assert (last - first) / 3.0 >= 3.0, f"{last - first} frames in 3 s while hidden"
        assert playing - played >= 2.0, (played, playing)
        # The page's own counter of replies agrees: its display needs no rAF either.
        assert chromium.evaluate(page, "Number(document.getElementById('output').dataset.frames)") >= 3 + 9

        # Back in front, it goes on; stopping the camera still stops the sending.
        chromium.call("Target.activateTarget", {"targetId": target})
        chromium.wait_for(page, "document.visibilityState === 'visible'", timeout=10)
        chromium.evaluate(page, "document.getElementById('start').click()")
        time.sleep(0.5)
        stopped = frames_in(daemon.port)
        time.sleep(0.5)
        assert frames_in(daemon.port) == stopped
    finally:
        chromium.close()
