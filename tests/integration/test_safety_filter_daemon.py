"""The safety filter in the running daemon (identity engine: the output is the input): a tiny real safety checker in
the models dir blacks out the frame it flags and lets the other through, its action changes live; with no checker
folder the plugin is turned off for the session with the path in the message, and the stream goes on."""

from __future__ import annotations

import json
import time

import numpy as np

from sdbridge.bridge import codec
from tests.clients import ws_connect
from tests.unit.plugins.test_safety_filter import build_checker, flagged_and_safe_frames


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


def test_without_the_checker_folder_the_plugin_goes_off_and_the_stream_goes_on(start_daemon, tmp_path, monkeypatch):
    monkeypatch.setenv("SDBRIDGE_MODELS_DIR", str(tmp_path))
    _, image = flagged_and_safe_frames()  # smooth: JPEG keeps it close (the noise frame it would not)
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64,
                                  "plugin.safety_filter.enabled": True})
    messages: list = []
    with ws_connect(daemon, "?session=lobby") as ws:
        outs = [reply(ws, image, messages) for _ in range(3)]
    assert all(close(out, image) for out in outs)
    failures = [m for m in messages if m.get("code") == "plugin_failed"]
    assert len(failures) == 1 and failures[0]["plugin"] == "safety_filter"
    assert f"{tmp_path / 'safety_checker'} does not exist" in failures[0]["message"]
    assert daemon.plugins.failures == 1
