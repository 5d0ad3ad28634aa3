"""Condition frames (channel > 0) over a real WebSocket: held within a byte budget per session (QA 9, finding 3)."""

from __future__ import annotations

import json

import numpy as np

from sdbridge.bridge import session as session_module
from sdbridge.bridge.protocol import FrameHeader
from tests.clients import make_image, recv_json, rgb_frame, ws_connect, wait_for

def frame_after(ws) -> tuple[bytes, list[dict]]:
    """The next binary message, and the JSON messages that came before it."""
    before = []
    while isinstance(message := ws.recv(timeout=30), str):
        before.append(json.loads(message))
    return message, before


BUDGET = 1024 * 1024  # the daemon's is 256 MiB: a small one here, so the test sends a few hundred kB


def test_a_condition_frame_past_the_session_s_budget_is_a_bad_frame_and_nothing_held_is_lost(start_daemon,
                                                                                                 monkeypatch):
    monkeypatch.setattr(session_module, "MAX_CONDITION_BYTES", BUDGET, raising=False)
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64})
    depth = make_image(256, 512, seed=1)  # 393,216 bytes raw: two fit in the budget, a third does not
    size = len(rgb_frame(depth))
    with ws_connect(daemon, "?session=stage") as ws:
        recv_json(ws, "hello")
        ws.send(rgb_frame(depth, channel=1, frame_id=1))
        ws.send(rgb_frame(depth, channel=2, frame_id=2))
        ws.send(rgb_frame(depth, channel=3, frame_id=3))
        error = recv_json(ws, "error")
        assert error["code"] == "bad_frame" and error["frame_id"] == 3, error
        assert f"condition frame of {size} bytes on channel 3" in error["message"]
        assert f"to {3 * size} bytes (at most {BUDGET}" in error["message"]
        # A newer pass on a channel already held replaces the older one: no error, the stream goes on.
        ws.send(rgb_frame(make_image(256, 512, seed=2), channel=1, frame_id=4))
        image = make_image(64, 64, seed=3)
        ws.send(rgb_frame(image, frame_id=5))
        reply, before = frame_after(ws)  # the same connection still serves frames
        assert not [message for message in before if message["type"] == "error"], before
        header, payload = FrameHeader.parse(reply)
        assert header.frame_id == 5
        assert np.array_equal(np.frombuffer(payload, np.uint8).reshape(64, 64, 3), image)  # identity engine
        [stage] = [s for s in daemon.collect_stats()["sessions"] if s["id"] == "stage"]
        assert set(stage["condition_frames"]) == {1, 2}
        assert stage["condition_frames"][1]["in"] == 2 and stage["condition_frames"][2]["in"] == 1
        assert stage["condition_bytes"] == 2 * size
        # A second session has a budget of its own.
        with ws_connect(daemon, "?session=other") as other:
            recv_json(other, "hello")
            other.send(rgb_frame(depth, channel=3, frame_id=6))
            other.send(rgb_frame(image, frame_id=7))
            reply, before = frame_after(other)
            assert FrameHeader.parse(reply)[0].frame_id == 7
            assert not [message for message in before if message["type"] == "error"], before
            assert wait_for(lambda: any(s["id"] == "other" and s["condition_bytes"] == size
                                        for s in daemon.collect_stats()["sessions"]))
