"""Through the real daemon: a --input file and a --input shm feed a session; a WebSocket viewer of that
session and a recording output get the generated frames, in order, matching the source's frames."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import cv2
import numpy as np

from sdbridge.bridge.protocol import FrameHeader, PixelFormat
from tests.clients import make_image, recv_frame, wait_for, ws_connect

ROOT = Path(__file__).resolve().parents[2]
IDENTITY = {"engine": "identity", "width": 64, "height": 64}
CLIP_FRAMES = 6


def write_clip(path: Path) -> list[np.ndarray]:
    """A 6-frame MJPEG clip at 20 fps, and its frames as OpenCV decodes them (what the input will read)."""
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 20.0, (64, 64))
    for seed in range(CLIP_FRAMES):
        writer.write(cv2.cvtColor(make_image(64, 64, seed=seed * 5), cv2.COLOR_RGB2BGR))
    writer.release()
    capture = cv2.VideoCapture(str(path))
    frames = []
    while (read := capture.read())[0]:
        frames.append(cv2.cvtColor(read[1], cv2.COLOR_BGR2RGB))
    capture.release()
    assert len(frames) == CLIP_FRAMES
    return frames


def raw_reply(message: bytes) -> tuple[FrameHeader, np.ndarray]:
    header, payload = FrameHeader.parse(message)
    assert header.pixel_format == PixelFormat.RGB8
    return header, np.frombuffer(payload, np.uint8).reshape(header.height, header.width, 3)


def test_a_file_input_reaches_a_websocket_viewer_and_an_output_in_order(start_daemon, tmp_path: Path) -> None:
    clip = write_clip(tmp_path / "clip.avi")
    record = tmp_path / "record"
    # Options after the session, as outputs write them: the same input as file:…?reply=rgb8@s1.
    daemon = start_daemon(params=IDENTITY, inputs=[f"file:{tmp_path / 'clip.avi'}@s1?reply=rgb8"],
                          outputs=[f"record:{record}@s1"])
    replies = []
    with ws_connect(daemon, "?session=s1") as ws:
        while len(replies) < 2 * CLIP_FRAMES:  # more than one lap of the clip
            replies.append(raw_reply(recv_frame(ws)))
    ids = [header.frame_id for header, _ in replies]
    assert ids == sorted(set(ids)), ids  # in order; a frame the worker had no time for is dropped, never repeated
    for header, image in replies:
        # The input numbers its frames 1, 2, ... in the order read: frame id n is the clip's frame (n-1) mod 6.
        assert np.array_equal(image, clip[(header.frame_id - 1) % CLIP_FRAMES]), header.frame_id
    stats = daemon.collect_stats()
    (input_stats,) = stats["inputs"]
    assert input_stats["state"] == "running" and input_stats["session"] == "s1" and input_stats["size"] == [64, 64]
    assert input_stats["input"] == f"file:{tmp_path / 'clip.avi'}?reply=rgb8@s1"  # its options shown, as outputs'
    assert input_stats["frames"] >= ids[-1] and stats["frames_received"] >= ids[-1]
    session = next(s for s in stats["sessions"] if s["id"] == "s1")
    assert session["frames_in"] >= ids[-1] and session["senders"] == 1
    assert wait_for(lambda: len(list(record.glob("*.png"))) >= 3)
    for path in sorted(record.glob("*.png"))[:3]:  # the outputs get the input's frames too
        recorded = cv2.cvtColor(cv2.imread(str(path)), cv2.COLOR_BGR2RGB)
        assert any(np.array_equal(recorded, frame) for frame in clip)


def load_example():
    spec = importlib.util.spec_from_file_location("shm_sender", ROOT / "examples" / "shm_sender.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_shm_input_fed_by_the_example_sender_reaches_a_viewer_in_order(start_daemon) -> None:
    name = f"sdb-it-{uuid.uuid4().hex[:8]}"
    sender = subprocess.Popen([sys.executable, str(ROOT / "examples" / "shm_sender.py"), "--name", name,
                               "--size", "64x64", "--fps", "30"], stdout=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert "writing 64x64 frames" in sender.stdout.readline()
        daemon = start_daemon(params=IDENTITY, inputs=[f"shm:{name}?reply=rgb8@s2"])
        pattern = load_example().pattern
        numbers = []  # each reply's frame number in the sender's pattern, modulo its period of 256 frames
        with ws_connect(daemon, "?session=s2") as ws:
            while len(numbers) < 15:
                _, image = raw_reply(recv_frame(ws))
                n = next((n for n in range(256) if np.array_equal(image, pattern(n, 64, 64))), None)
                assert n is not None, "every reply is one frame of the sender's pattern, whole, never torn"
                numbers.append(n)
        # In order, none twice: each step forward, and all of them less than one period (15 replies at up to
        # 30 fps take about half a second; the pattern repeats after 256 frames, 8.5 s).
        steps = [(b - a) % 256 for a, b in zip(numbers, numbers[1:])]
        assert all(step > 0 for step in steps) and sum(steps) < 256, numbers
        assert daemon.collect_stats()["inputs"][0]["state"] == "running"
    finally:
        sender.send_signal(signal.SIGTERM)  # as a process manager stops it: it removes its segment on the way out
        assert sender.wait(timeout=30) == 0


def test_serve_refuses_a_malformed_input_in_one_line(tmp_path: Path) -> None:
    def serve(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "sdbridge.cli", "serve", "--port", "0", "--osc-port", "0",
                               "--feedback", "127.0.0.1:0", *args], capture_output=True, text=True, timeout=60,
                              cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(ROOT)})

    result = serve("--input", "file:clip.mp4?fps=fast@s1")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == ("sdbridge: input 'file:clip.mp4?fps=fast@s1': fps 'fast' "
                                                      "is not a number in (0, 1000]")
    (tmp_path / "sdbridge.toml").write_text('inputs = ["file:missing.mp4@s1"]\n')  # the config file's key
    result = serve()
    assert result.returncode == 2 and "input 'file:missing.mp4@s1': missing.mp4 does not exist" in result.stderr
    result = serve("--input", "shm:bad/name@s1")  # a name no segment can have: refused now, not retried forever
    assert result.returncode == 2 and "shared memory name 'bad/name' is not a name" in result.stderr
    assert "Traceback" not in result.stderr
