"""Through the real daemon: a recording output gets the frames sent back, and an engine swap dissolves."""

from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np

from sdbridge.bridge.protocol import FrameHeader, PixelFormat
from tests.clients import header_frame, make_image, recv_frame, ws_connect, wait_for


def raw_round_trip(ws, image: np.ndarray, frame_id: int) -> np.ndarray:
    height, width = image.shape[:2]
    ws.send(header_frame(image.tobytes(), PixelFormat.RGB8, width, height, frame_id=frame_id, reply=PixelFormat.RGB8))
    header, payload = FrameHeader.parse(recv_frame(ws))
    return np.frombuffer(payload, np.uint8).reshape(header.height, header.width, 3)


def test_a_recording_output_holds_the_frames_the_client_got(start_daemon, tmp_path: Path) -> None:
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64}, outputs=[f"record:{tmp_path}"])
    images = [make_image(64, 64, seed=seed) for seed in range(3)]
    with ws_connect(daemon) as ws:
        replies = [raw_round_trip(ws, image, i + 1) for i, image in enumerate(images)]

    def all_published() -> bool:
        stats = daemon.outputs.stats()[0]
        return stats["published"] == 3 and stats["sent"] + stats["dropped"] == 3

    assert wait_for(all_published)
    recorded = [cv2.cvtColor(cv2.imread(str(p)), cv2.COLOR_BGR2RGB) for p in sorted(tmp_path.glob("*.png"))]
    # Every recorded frame is one the client got (the slot may drop some under load, never alter them).
    for frame in recorded:
        assert any(np.array_equal(frame, reply) for reply in replies)
    assert np.array_equal(recorded[-1], replies[-1])  # the newest frame is never the one dropped


def blend_fit(out: np.ndarray, start: np.ndarray, end: np.ndarray) -> tuple[float, float]:
    """The alpha that best explains ``out`` as a mix of start and end, and the worst pixel left over."""
    a, b, o = (x.astype(np.float64) for x in (start, end, out))
    alpha = float(((o - a) * (b - a)).sum() / max(((b - a) ** 2).sum(), 1e-9))
    residual = float(np.abs(a * (1 - alpha) + b * alpha - o).max())
    return alpha, residual


def swap_outputs(daemon, crossfade_s: float, seconds: float) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    image = make_image(96, 96, seed=7)
    with ws_connect(daemon) as ws:
        before = raw_round_trip(ws, image, 1)
        ws.send(json.dumps({"type": "set", "params": {"engine": "preview", "crossfade_s": crossfade_s}}))
        outputs, frame_id, until = [], 2, time.monotonic() + seconds
        while time.monotonic() < until:
            outputs.append(raw_round_trip(ws, image, frame_id))
            frame_id += 1
            time.sleep(0.02)
    return before, outputs, outputs[-1]


def test_an_engine_swap_dissolves_over_crossfade_s(start_daemon) -> None:
    daemon = start_daemon(params={"engine": "identity", "width": 96, "height": 96, "effect": "cartoon",
                                  "strength": 1.0})
    before, outputs, after = swap_outputs(daemon, crossfade_s=1.5, seconds=3.5)
    assert np.abs(after.astype(int) - before.astype(int)).max() > 60  # the preview engine does change the image
    fades = [blend_fit(out, before, after) for out in outputs
             if not np.array_equal(out, before) and not np.array_equal(out, after)]
    assert len(fades) >= 3, "frames between the two engines"
    alphas = [alpha for alpha, _ in fades]
    assert all(0.0 < alpha < 1.0 for alpha in alphas)
    # Each one a mix of the two frames: within a few levels (the preview engine's output wobbles by a
    # few levels from frame to frame), where the two frames differ by more than 60 somewhere.
    assert all(residual <= 8.0 for _, residual in fades), [f for f in fades if f[1] > 8]
    assert alphas == sorted(alphas)                           # and it moves one way


def test_crossfade_zero_cuts(start_daemon) -> None:
    daemon = start_daemon(params={"engine": "identity", "width": 96, "height": 96, "effect": "cartoon",
                                  "strength": 1.0})
    before, outputs, after = swap_outputs(daemon, crossfade_s=0.0, seconds=1.5)
    assert all(np.array_equal(out, before) or np.array_equal(out, after) for out in outputs)
