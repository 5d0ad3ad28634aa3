"""The worker thread on its own: real sessions, parameter store, engine host and codec pool; the
replies go to a callback standing where the event loop would."""

import threading
import time

import cv2
import numpy as np
import pytest

from sdbridge.bridge.engine_host import EngineHost
from sdbridge.bridge.protocol import FrameHeader, PixelFormat, pack_frame
from sdbridge.bridge.session import SessionRegistry
from sdbridge.bridge.websocket import parse_frame
from sdbridge.bridge.worker import Worker
from sdbridge.config import Settings
from sdbridge.params import ParamStore, Schema
from tests.clients import wait_for


def frame(frame_id: int, size: int = 64) -> bytes:
    image = np.full((size, size, 3), frame_id * 10 % 256, np.uint8)
    ok, jpeg = cv2.imencode(".jpg", image)
    assert ok
    header = FrameHeader(version=1, pixel_format=PixelFormat.JPEG, flags=0, channel=0,
                         reply_format=PixelFormat.JPEG, frame_id=frame_id, client_ts_us=0, width=size,
                         height=size, payload_length=len(jpeg))
    return pack_frame(header, jpeg.tobytes())


def wait_until(condition, timeout: float = 20.0) -> bool:
    return wait_for(condition, timeout=timeout, interval=0.005)


class Replies:
    """Where the event loop would be: records each reply's frame id; can hold the codec thread that
    delivers, as a loop that does not keep up would."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.gate = threading.Event()
        self.gate.set()
        self.waiting = threading.Event()

    def deliver(self, session, message: bytes) -> None:
        if not self.gate.is_set():
            self.waiting.set()
            self.gate.wait(30)
        self.ids.append(FrameHeader.parse(message)[0].frame_id)


@pytest.fixture
def worker():
    replies = Replies()
    store = ParamStore(Schema(), initial={"engine": "preview", "width": 64, "height": 64})
    registry = SessionRegistry()
    engines = EngineHost(Settings(engine="preview", device="cpu"))
    worker = Worker(registry, store, engines, replies.deliver, lambda session, message: None)
    worker.start()
    session = registry.open("stage")

    def serving() -> bool:  # frames pass through until the engine has loaded
        if engines.active_engine() is None:
            put(session, 0)
            return False
        return True

    assert wait_until(serving)
    put(session, 0)
    assert wait_until(lambda: replies.ids[-1:] == [0] and not session.input.pending and worker.last_step_ms > 0)
    replies.ids.clear()
    yield worker, session, replies
    replies.gate.set()
    worker.stop()
    worker.join(10)


def put(session, frame_id: int) -> None:
    session.put_frame(parse_frame(frame(frame_id)))


def test_a_reply_encodes_while_the_next_frame_runs(worker):
    worker, session, replies = worker
    replies.gate.clear()                 # the loop stops taking replies
    put(session, 1)
    assert replies.waiting.wait(20)      # frame 1 is out of the engine, its reply held
    steps = worker.turns
    worker.last_step_ms = -1.0
    put(session, 2)
    # Frame 2 is decoded and run by the engine while frame 1's reply is still held.
    assert wait_until(lambda: worker.last_step_ms >= 0)
    assert worker.turns == steps + 1 and not session.input.pending
    # At most one turn's replies wait: frame 3 is not taken until frame 1's reply is out.
    put(session, 3)
    time.sleep(0.3)
    assert worker.turns == steps + 1 and session.input.pending
    replies.gate.set()
    assert wait_until(lambda: len(replies.ids) == 3)
    assert replies.ids == [1, 2, 3]      # in order, none lost


def test_a_flood_is_decoded_ahead_and_answered_in_order(worker):
    """A source that sends without waiting: frames that come in while the engine runs are taken and
    decoded for the next turn (where they run: one that comes after waits in its slot), and every frame is
    either answered once, in order, or counted as dropped."""
    worker, session, replies = worker
    out_before, dropped_before = session.frames_out, session.input.dropped
    sent = 300
    for frame_id in range(1, sent + 1):
        put(session, frame_id)
        time.sleep(0.0005)
    assert wait_until(lambda: not session.input.pending and replies.ids[-1:] == [sent])
    assert replies.ids == sorted(replies.ids) and len(set(replies.ids)) == len(replies.ids)
    assert session.frames_out - out_before == len(replies.ids)
    assert len(replies.ids) + session.input.dropped - dropped_before == sent
    assert worker.decoded_ahead > 0
