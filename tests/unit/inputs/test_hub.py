"""The input hub on a real session registry: frames land in the session's slots as a WebSocket sender's would."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest

from sdbridge.bridge import codec
from sdbridge.bridge.protocol import PixelFormat
from sdbridge.bridge.session import SessionRegistry
from sdbridge.inputs import hub as hub_module
from sdbridge.inputs.base import InputError
from sdbridge.inputs.hub import InputHub, input_frame
from sdbridge.inputs.shm import ShmWriter
from tests.clients import wait_for


def image_folder(folder: Path, count: int = 4) -> list[np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    images = [np.random.default_rng(i).integers(0, 255, (24, 40, 3), np.uint8) for i in range(count)]
    for i, image in enumerate(images):
        cv2.imwrite(str(folder / f"{i:03d}.png"), cv2.cvtColor(image, cv2.COLOR_RGB2BGR))
    return images


def test_an_input_frame_is_a_raw_v1_frame_the_worker_decodes() -> None:
    rgba = np.random.default_rng(0).integers(0, 255, (6, 5, 4), np.uint8)
    frame = input_frame(rgba[::-1], 7, 3, PixelFormat.PNG)  # a flipped view: copied top row first
    assert frame.header.pixel_format == PixelFormat.RGBA8 and frame.header.channel == 3
    assert frame.header.frame_id == 7 and frame.header.reply_format == PixelFormat.PNG and not frame.header.bottom_up
    assert np.array_equal(codec.decode_frame(frame.header, frame.payload), rgba[::-1, :, :3])
    with pytest.raises(InputError, match="9000x2"):
        input_frame(np.zeros((2, 9000, 3), np.uint8), 1, 0, PixelFormat.JPEG)


def test_a_folder_feeds_its_session_in_order_and_an_untaken_frame_counts_as_dropped(tmp_path: Path) -> None:
    images = image_folder(tmp_path / "frames")
    registry = SessionRegistry()
    hub = InputHub([f"file:{tmp_path / 'frames'}?fps=50@stage"])
    hub.start(registry)
    try:
        session = registry.get("stage")
        assert session is not None and session.senders == 1
        taken = []
        while len(taken) < 8:  # a worker that takes every frame: two laps of the folder, in order
            assert registry.wake.wait(10)
            registry.wake.clear()
            frame = session.input.take()
            if frame is not None:
                taken.append(frame)
        ids = [frame.frame_id for frame in taken]
        assert ids == list(range(ids[0], ids[0] + 8))
        for frame in taken:
            assert np.array_equal(codec.decode_frame(frame.header, frame.payload), images[(frame.frame_id - 1) % 4])
        before = session.input.dropped
        time.sleep(0.3)  # nobody takes: the slot keeps the newest, each one it replaced is a drop
        assert session.input.dropped - before >= 5
        assert hub.stats()[0]["state"] == "running" and hub.stats()[0]["size"] == [40, 24]
    finally:
        hub.stop()
        hub.release()
    assert registry.get("stage") is None  # nobody else used it: closed with the input
    assert hub.stats()[0]["state"] == "stopped"


def test_a_channel_feeds_the_sessions_condition_slot(tmp_path: Path) -> None:
    image_folder(tmp_path / "depth", 2)
    registry = SessionRegistry()
    hub = InputHub([f"file:{tmp_path / 'depth'}?fps=50@cam#2"])
    hub.start(registry)
    try:
        session = registry.get("cam")
        assert wait_for(lambda: 2 in session.conditions and session.conditions[2].accepted >= 2)
        assert session.input.accepted == 0  # the image slot is not fed
        assert session.conditions[2].take().header.channel == 2
    finally:
        hub.stop()
        hub.release()


def test_two_inputs_in_one_slot_and_a_missing_file_stop_the_start(tmp_path: Path) -> None:
    image_folder(tmp_path / "a", 1)
    with pytest.raises(InputError, match="both feed session 's1' channel 0") as error:
        InputHub([f"file:{tmp_path / 'a'}@s1", "shm:x@s1"])
    assert error.value.code == "bad_input"
    InputHub([f"file:{tmp_path / 'a'}@s1", "shm:x@s1#1"])  # another channel is fine
    with pytest.raises(InputError, match="does not exist"):
        InputHub([f"file:{tmp_path / 'missing.mp4'}"])


def test_a_failing_input_is_reported_and_retried_until_its_writer_comes(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hub_module, "RETRY_S", 0.2)  # the pause between tries; 5 s in the daemon
    name = f"sdb-hub-{uuid.uuid4().hex[:8]}"
    events: list[dict] = []
    registry = SessionRegistry()
    hub = InputHub([f"shm:{name}"], notify=events.append)
    hub.start(registry)
    try:
        assert wait_for(lambda: hub.stats()[0]["failures"] >= 2)  # tried again, not given up
        stats = hub.stats()[0]
        assert stats["state"] == "retrying" and "is the writer running" in stats["last_error"]
        assert events[0]["type"] == "error" and events[0]["code"] == "input_unavailable"
        assert f"input shm:{name}@shm failed" in events[0]["message"]
        with ShmWriter(name, 8, 8) as writer:
            session = registry.get("shm")

            def fed() -> bool:
                writer.write(np.full((8, 8, 3), 77, np.uint8))
                return session.input.accepted > 0
            assert wait_for(fed, timeout=10)
            assert hub.stats()[0]["state"] == "running"
            frame = session.input.take()
            assert int(codec.decode_frame(frame.header, frame.payload)[0, 0, 0]) == 77
    finally:
        hub.stop()
        hub.release()
