"""The safety filter in the running daemon (identity engine: the output is the input): a tiny real safety checker in
the models dir blacks out the frame it flags and lets the other through, its action changes live; with no checker
folder the filter fails closed: every frame gets the action, and each session is told why, with the path."""

from __future__ import annotations

import json
import time

import numpy as np

from sdbridge.bridge import codec
from tests.clients import ws_connect
from tests.unit.plugins.test_safety_filter import build_checker


def reply(ws, image: np.ndarray, messages: list | None = None) -> np.ndarray:
    """Send a lossless frame; the reply decoded (a JPEG), the JSON messages on the way kept in ``messages``."""
    ws.send(codec.encode_png(image))
    while not isinstance(message := ws.recv(timeout=30), bytes):
        if messages is not None:
            messages.append(json.loads(message))
    return codec.decode_image(message)


def close(a: np.ndarray, b: np.ndarray) -> bool:
    return np.abs(a.astype(int) - b.astype(int)).mean() < 4  # JPEG's loss only


def test_a_flagged_frame_is_blacked_out_and_a_safe_one_passes(start_daemon, tmp_path, monkeypatch):
    flagged, safe = build_checker(tmp_path)
    monkeypatch.setenv("SDBRIDGE_MODELS_DIR", str(tmp_path))  # the identity engine has no models dir of its own
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64,
                                  "plugin.safety_filter.enabled": True, "plugin.safety_filter.action": "black"})
    with ws_connect(daemon, "?session=kiosk") as ws:
        outs = [reply(ws, safe)]
        deadline = time.monotonic() + 60
        while not outs[-1].any():  # black while the checker loads: nothing unchecked goes out
            assert time.monotonic() < deadline, "the safety checker did not load"
            outs.append(reply(ws, safe))
        assert close(outs[-1], safe)
        assert not reply(ws, flagged).any()
        assert close(reply(ws, safe), safe)
        ws.send(json.dumps({"type": "set", "params": {"plugin.safety_filter.action": "hold"}}))
        assert close(reply(ws, flagged), safe)  # the last safe frame held
    assert daemon.plugins.failures == 0


def test_without_the_checker_folder_every_frame_gets_the_action_and_the_client_is_told(start_daemon, tmp_path,
                                                                                        monkeypatch):
    """qa8 finding 1: a kiosk with no checker must not send its frames out unchecked (docs/plugins.md)."""
    monkeypatch.setenv("SDBRIDGE_MODELS_DIR", str(tmp_path))
    image = np.full((64, 64, 3), (250, 120, 250), np.uint8)  # the QA report's frame
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64,
                                  "plugin.safety_filter.enabled": True, "plugin.safety_filter.action": "black"})
    for session in ("lobby", "hall"):  # each new session is filtered and told too
        messages: list = []
        with ws_connect(daemon, f"?session={session}") as ws:
            outs = [reply(ws, image, messages) for _ in range(3)]
        assert all(not out.any() for out in outs), [out.mean() for out in outs]
        failures = [m for m in messages if m.get("code") == "plugin_failed"]
        assert len(failures) == 1 and failures[0]["plugin"] == "safety_filter"
        assert f"{tmp_path / 'safety_checker'} does not exist" in failures[0]["message"]
        assert "fails closed: every frame gets the action" in failures[0]["message"]
    assert daemon.plugins.failures == 2
