"""The worker thread on its own: real sessions, parameter store, engine host and codec pool; the
replies go to a callback standing where the event loop would."""

import dataclasses
import threading
import time

import cv2
import numpy as np
import pytest

from sdbridge.bridge.engine_host import EngineHost
from sdbridge.bridge.protocol import FrameHeader, PixelFormat, pack_frame
from sdbridge.bridge.session import SessionRegistry
from sdbridge.bridge.websocket import parse_frame
from sdbridge.bridge import worker as worker_module
from sdbridge.bridge.worker import Worker
from sdbridge.config import Settings
from sdbridge.engines.base import CONDITIONS, SLOT_IMAGES
from sdbridge.params import ParamStore, Schema
from tests.clients import wait_for


def frame(frame_id: int, size: int = 64, channel: int = 0) -> bytes:
    image = np.full((size, size, 3), frame_id * 10 % 256, np.uint8)
    ok, jpeg = cv2.imencode(".jpg", image)
    assert ok
    header = FrameHeader(version=1, pixel_format=PixelFormat.JPEG, flags=0, channel=channel,
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

    def quiet() -> bool:  # no frame 0 of the loop above still on its way: taken, decoded ahead or encoding
        return (replies.ids[-1:] == [0] and not session.input.pending and worker.last_step_ms > 0
                and not worker._ahead and all(future.done() for future, _ in worker._sending.values()))

    def settled() -> bool:  # quiet, and no turn ran meanwhile (one may have held a frame mid-step)
        turns, answered = worker.turns, len(replies.ids)
        time.sleep(0.1)
        return quiet() and worker.turns == turns and len(replies.ids) == answered

    assert wait_until(settled)
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


def test_the_last_session_s_reply_is_let_go_once_it_closes(worker):
    """No turn serves a frame after the last client leaves: its session (pictures, plugin state) was held until
    one did (QA 51 F2)."""
    worker, session, replies = worker
    put(session, 1)
    assert wait_until(lambda: replies.ids == [1])
    assert session in worker._sending
    assert session.state.data[worker_module.LAST_OUTPUT] is not None
    worker.registry.release(session)
    assert session.closed
    assert wait_until(lambda: session not in worker._sending, timeout=5)
    # Its pictures go with it: a reference cycle kept the session, and its last frame, until Python's rarest
    # collection (QA 64: RSS up 20-30 MB a minute while clients came and went).
    assert session.state.data == {}


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


def test_a_session_back_after_a_pause_starts_its_stream_afresh(worker, monkeypatch):
    """What the engine and plugins hold of a session's earlier frames (a stream batch's frames in flight) is
    dropped when its frames come back after a pause, and kept from one frame to the next; its condition
    frames are kept either way."""
    worker, session, replies = worker
    monkeypatch.setattr(worker_module, "PAUSE_S", 60.0)
    session.state.data.update({"compiled.stream": "frames in flight", SLOT_IMAGES: {0: "edges"}})
    depth = parse_frame(frame(50, channel=1))  # a condition frame: no slot reads it here
    session.put_frame(depth)
    put(session, 1)
    assert wait_until(lambda: replies.ids[-1:] == [1])
    assert session.state.data["compiled.stream"] == "frames in flight" and session.resumes == 0
    monkeypatch.setattr(worker_module, "PAUSE_S", 0.2)
    time.sleep(1.0)  # also far more than PAUSE_FRAMES of the preview engine's frame times
    put(session, 2)
    assert wait_until(lambda: replies.ids[-1:] == [2])
    assert "compiled.stream" not in session.state.data and session.state.data[SLOT_IMAGES] == {0: "edges"}
    assert session.condition_latest[1] is depth and session.state.data[CONDITIONS] == {}  # kept, still encoded
    assert session.resumes == 1 and session.stats()["resumes"] == 1


def test_a_slow_engine_s_pace_is_no_pause():
    """A gap is a pause only when it is longer than PAUSE_S and than PAUSE_FRAMES of the engine's frames: a
    real model on a CPU, seconds a frame, keeps its stream from frame to frame."""
    store = ParamStore(Schema(), initial={"engine": "preview"})
    registry = SessionRegistry()
    worker = Worker(registry, store, EngineHost(Settings(engine="preview", device="cpu")), lambda s, m: None,
                    lambda s, m: None)
    session = registry.open("slow")
    worker.last_step_ms = 2500.0
    times = [100.0, 102.5, 105.0, 119.0, 140.0, 142.5, 163.0]
    kept = []
    for now in times:
        session.state.data["compiled.stream"] = now
        worker._resume(session, now)
        kept.append("compiled.stream" in session.state.data)
    # Under 8 steps of 2.5 s (14 s too) is the engine's pace; 21 s and 20.5 s are pauses.
    assert kept == [True, True, True, True, False, True, False] and session.resumes == 2
    worker.last_step_ms = 5.0
    worker._resume(session, 164.4)  # 1.4 s: a pause for an engine of 5 ms a step
    assert session.resumes == 3
    worker.pool.shutdown()


def test_a_held_up_worker_is_no_pause_for_a_client_waiting_on_its_reply():
    """QA 12: a lock-step client (a frame, its reply, the next frame) was cut whenever a turn was held up (a swap,
    a request's step, a starved CPU) longer than PAUSE_S. The pause is the client's: from when the session was
    last served to when its frame arrived."""
    store = ParamStore(Schema(), initial={"engine": "preview"})
    registry = SessionRegistry()
    worker = Worker(registry, store, EngineHost(Settings(engine="preview", device="cpu")), lambda s, m: None,
                    lambda s, m: None)
    session = registry.open("lockstep")
    worker.last_step_ms = 20.0  # the engine is fast: the hold-up is the worker's, not the engine's pace

    def arriving(after_served_s: float):
        message = parse_frame(frame(1))
        return dataclasses.replace(message, received_ns=session.last_served_ns + int(after_served_s * 1e9))

    worker._resume(session, 100.0, parse_frame(frame(1)))
    session.state.data["compiled.stream"] = "frames in flight"
    session.last_served_ns += 3_000_000_000  # its reply went out 3 s after the take: the turn was held up
    worker._resume(session, 103.3, arriving(0.2))  # the client sent its next frame 0.2 s after that reply
    assert "compiled.stream" in session.state.data and session.resumes == 0
    worker._resume(session, 103.5, arriving(0.1))  # streaming on: 0.1 s after its last take
    assert session.resumes == 0
    worker._resume(session, 110.0, arriving(5.0))  # it stopped sending for 5 s: a pause, the stream starts afresh
    assert "compiled.stream" not in session.state.data and session.resumes == 1
    worker.pool.shutdown()


def test_a_session_s_slow_reply_never_holds_up_another_session():
    """QA 13 F5: the worker waited for every reply of the last turn before handing out the next, so one session's
    slow encode (a 7000² reply) held every other session's turns. Its replies now follow each other in the pool;
    the others' go on turn after turn, and its own stay in order."""
    store = ParamStore(Schema(), initial={"engine": "preview", "width": 64, "height": 64})
    registry = SessionRegistry()
    engines = EngineHost(Settings(engine="preview", device="cpu"))
    heavy_gate, heavy_waiting = threading.Event(), threading.Event()
    got: dict[str, list[int]] = {"stage": [], "heavy": []}

    def deliver(session, message: bytes) -> None:
        if session.id == "heavy" and not heavy_gate.is_set():  # its encode is slow: the codec thread is held
            heavy_waiting.set()
            heavy_gate.wait(60)
        got[session.id].append(FrameHeader.parse(message)[0].frame_id)

    worker = Worker(registry, store, engines, deliver, lambda session, message: None)
    worker.start()
    try:
        stage, heavy = registry.open("stage"), registry.open("heavy")

        def serving() -> bool:  # frames pass through until the engine has loaded
            put(stage, 0)
            return engines.active_engine() is not None

        assert wait_until(serving, timeout=60)
        put(heavy, 1)
        assert heavy_waiting.wait(20)  # heavy's first reply is encoding (held)
        put(heavy, 2)                  # its next frame runs; its reply follows the first in the pool
        answered = 0
        deadline = time.monotonic() + 30
        while answered < 8 and time.monotonic() < deadline:
            frame_id = 100 + answered
            put(stage, frame_id)
            if not wait_until(lambda: frame_id in got["stage"], timeout=10):
                break
            answered += 1
            put(heavy, 3 + answered)   # heavy keeps sending; at most two of its replies are in flight
        assert answered == 8, f"the stage session got {answered} replies while heavy's reply was held"
        assert got["heavy"] == [] and worker.late_encodes >= 1
        heavy_gate.set()
        assert wait_until(lambda: len(got["heavy"]) >= 3)
        assert got["heavy"] == sorted(got["heavy"]) and got["heavy"][:2] == [1, 2]  # in order, none before another
    finally:
        heavy_gate.set()
        worker.stop()
        worker.join(10)


def test_a_new_session_under_a_closed_one_s_name_starts_clean_in_the_plugins():
    """QA 13 F2: what a plugin keeps by session name outside the session's state (the feature bank's cached
    attention) reached a new client that took a closed session's name. Its first frame cuts it, as a pause does."""
    from sdbridge.plugins.base import Plugin
    from sdbridge.plugins.manager import PluginManager

    class Remembers(Plugin):
        name = "remembers"
        doc = "keeps something per session name, as the feature bank does"

        def __init__(self) -> None:
            self.held: dict[str, str] = {}

        def cut(self, session_id: str) -> None:
            self.held.pop(session_id, None)

    store = ParamStore(Schema(), initial={"engine": "preview"})
    registry = SessionRegistry()
    plugins = PluginManager(store, classes={"remembers": Remembers})
    worker = Worker(registry, store, EngineHost(Settings(engine="preview", device="cpu")), lambda s, m: None,
                    lambda s, m: None, plugins=plugins)
    plugin = plugins.plugins["remembers"]
    first = registry.open("stage")
    worker._resume(first, 100.0, parse_frame(frame(1)))
    plugin.held["stage"] = "the first client's features"
    worker._resume(first, 100.1, parse_frame(frame(2)))  # its next frame keeps them
    assert plugin.held == {"stage": "the first client's features"}
    registry.release(first)
    second = registry.open("stage")  # a new client, the same name
    worker._resume(second, 100.2, parse_frame(frame(1)))
    assert plugin.held == {} and second.resumes == 0  # clean, and not counted as a pause
    worker.pool.shutdown()


def test_a_session_s_slow_decode_never_holds_up_another_session(worker):
    """A client sending huge (legal) frames slows its own stream only: its frame, still decoding when the other
    sessions' frames are ready, joins a later turn (qa9 2: one 8000² PNG client cut another session to 1 reply/s)."""
    worker, session, replies = worker
    heavy = worker.registry.open("heavy")
    image = np.zeros((6000, 6000, 3), np.uint8)
    image[::7, ::5] = 255  # some texture, so that inflating it takes work
    ok, png = cv2.imencode(".png", image)
    assert ok
    header = FrameHeader(version=1, pixel_format=PixelFormat.PNG, flags=0, channel=0, reply_format=PixelFormat.JPEG,
                         frame_id=10_000, client_ts_us=0, width=6000, height=6000, payload_length=len(png))
    heavy.put_frame(parse_frame(pack_frame(header, png.tobytes())))
    good = 0
    deadline = time.monotonic() + 60
    while 10_000 not in replies.ids and time.monotonic() < deadline:
        good += 1
        put(session, good)
        assert wait_until(lambda: good in replies.ids or 10_000 in replies.ids)
    assert 10_000 in replies.ids and worker.late_decodes >= 1
    # While the heavy frame decoded, the stage's frames went on turn after turn (before: one turn, held).
    assert good >= 5, good


def slow_steps(worker, seconds: float) -> threading.Event:
    """The serving engine's step made to take ``seconds``; the event is set as each step starts."""
    engine = worker.engines.active_engine()
    stepping = threading.Event()
    real = engine.step

    def step(frames, states):
        stepping.set()
        time.sleep(seconds)
        return real(frames, states)

    engine.step = step
    return stepping


def test_a_frame_decoded_ahead_waits_out_its_session_s_slow_reply_and_is_answered(worker):
    """A session whose reply follows its previous one, still encoding, sends no frame into a turn; its frame decoded
    ahead was then counted dropped, as if its session had closed, and it was the newest: never answered (QA 61
    F3; a client's last frame of a burst, lost 2 to 3 times in 30 with PNG replies at 4096²)."""
    worker, session, replies = worker
    stepping = slow_steps(worker, 0.1)
    replies.gate.clear()                       # the loop stops taking replies: a slow encode
    stepping.clear()
    put(session, 1)
    assert stepping.wait(5) and replies.waiting.wait(20)
    stepping.clear()
    put(session, 2)
    assert stepping.wait(5)
    time.sleep(0.02)
    put(session, 3)                            # during frame 2's step: decoded ahead, frame 2's reply chained
    assert wait_until(lambda: worker.decoded_ahead >= 1 and worker.late_encodes >= 1)
    time.sleep(0.3)
    replies.gate.set()
    assert wait_until(lambda: replies.ids == [1, 2, 3]), replies.ids
    assert session.input.dropped == 0


def test_a_decode_that_fails_unforeseen_is_told_and_the_stream_goes_on(worker, monkeypatch):
    """A frame decoded ahead whose decode raised anything but an SdbridgeError (a MemoryError) left a failed future
    that every later turn met again: no frame was answered again (QA 61 F2)."""
    worker, session, replies = worker
    told = []
    worker.report = lambda where, message: told.append(message)
    real = worker_module.codec.decode_frame

    def decode(header, payload):
        if header is not None and header.frame_id == 13:
            raise MemoryError("no room for the pixels")
        return real(header, payload)

    monkeypatch.setattr(worker_module.codec, "decode_frame", decode)
    stepping = slow_steps(worker, 0.1)
    stepping.clear()
    put(session, 12)
    assert stepping.wait(5)
    put(session, 13)                           # during frame 12's step: decoded ahead, and it fails
    assert wait_until(lambda: 12 in replies.ids)
    assert wait_until(lambda: any(message.get("frame_id") == 13 for message in told))
    put(session, 14)
    assert wait_until(lambda: 14 in replies.ids), replies.ids
    error = next(message for message in told if message.get("frame_id") == 13)
    assert error["code"] == "bad_image" and "MemoryError: no room for the pixels" in error["message"]
    assert 13 not in replies.ids and worker.engine_errors == 0


def test_a_frame_decoded_ahead_runs_when_its_decode_ends(worker, monkeypatch):
    """The frames left by a slow decode wake the worker when they are done; those decoded ahead did not, and one
    that outlasted the next turn's grace waited for the idle timeout (QA 61 F1: 200 ms). Here that timeout is 30 s."""
    worker, session, replies = worker
    real = worker_module.codec.decode_frame

    def decode(header, payload):
        if header is not None and header.frame_id == 2:
            time.sleep(0.3)
        return real(header, payload)

    monkeypatch.setattr(worker_module.codec, "decode_frame", decode)
    monkeypatch.setattr(worker, "_idle_timeout", lambda: 30.0)
    stepping = slow_steps(worker, 0.1)
    stepping.clear()
    put(session, 1)
    assert stepping.wait(5)
    put(session, 2)                            # decoded ahead during frame 1's step, for longer than the step
    assert wait_until(lambda: replies.ids == [1, 2], timeout=10), replies.ids


def test_a_closed_session_s_last_frame_leaves_the_crossfade(worker):
    """Its last output was held for the crossfade until every 256th turn, for good if none came (QA 61 F4)."""
    worker, session, replies = worker
    other = worker.registry.open("gone")
    other.put_frame(parse_frame(frame(5)))
    assert wait_until(lambda: 5 in replies.ids)
    assert worker.crossfade.held() == 2
    worker.registry.release(other)
    assert wait_until(lambda: worker.crossfade.held() == 1, timeout=5)


def test_txt2img_waits_only_until_the_next_frame_is_due():
    """The worker slept a whole 1 / max_fps after every turn, so the period was the step plus that: 6.6 fps for a
    max_fps of 10 and a 50 ms step (QA 61 F6)."""
    store = ParamStore(Schema(), initial={"engine": "preview", "mode": "txt2img", "max_fps": 1.0})
    registry = SessionRegistry()
    worker = Worker(registry, store, EngineHost(Settings(engine="preview", device="cpu")), lambda *a: None,
                    lambda *a: None)
    worker.params = store.snapshot()[1]
    assert worker._idle_timeout() == 1.0       # nothing to make: the rate's period
    session = registry.open("stage")
    session.viewers.add(object())
    session.next_generated_at = time.monotonic() + 0.05
    assert 0.0 < worker._idle_timeout() <= 0.05
    session.next_generated_at = time.monotonic() - 1
    assert worker._idle_timeout() == 0.0


def test_txt2img_with_nothing_to_generate_holds_the_last_frame():
    """The comment said the last frame sent holds; a grey one was sent every time (QA 61 F7)."""
    registry = SessionRegistry()
    session = registry.open("stage")
    last = np.full((32, 48, 3), 77, np.uint8)
    session.state.data[worker_module.LAST_OUTPUT] = last
    held, other = worker_module.Job(session, None), worker_module.Job(session, None)
    held.input_size, other.input_size = (48, 32), (64, 64)
    Worker._pass_through([held, other])
    assert held.output is last
    assert other.output.shape == (64, 64, 3) and int(other.output.max()) == 128


def test_a_closed_session_is_cut_in_the_plugins():
    """What plugins keep by a session's name (the feature bank's keys and values) stayed 300 turns of other sessions
    after it closed, for good if none streamed (QA 63 F6)."""
    from sdbridge.plugins.base import Plugin
    from sdbridge.plugins.manager import PluginManager

    class Keeper(Plugin):
        name = "keeper"
        cuts: list[str] = []

        def cut(self, session_id: str) -> None:
            Keeper.cuts.append(session_id)

    replies = Replies()
    store = ParamStore(Schema(), initial={"engine": "preview", "width": 64, "height": 64})
    registry = SessionRegistry()
    plugins = PluginManager(store, {"keeper": Keeper})
    store.update({"plugin.keeper.enabled": True})
    worker = Worker(registry, store, EngineHost(Settings(engine="preview", device="cpu")), replies.deliver,
                    lambda session, message: None, plugins=plugins)
    worker.start()
    try:
        session = registry.open("stage")
        put(session, 1)
        assert wait_until(lambda: 1 in replies.ids)
        Keeper.cuts.clear()
        registry.release(session)
        assert wait_until(lambda: Keeper.cuts == ["stage"], timeout=5)
    finally:
        worker.stop()
        worker.join(10)


def test_a_frame_passed_through_is_no_last_output_and_the_similarity_filter_does_not_skip_to_it():
    """One engine error passed a frame through; the plugins' after hook kept that raw input as the session's last
    output and the similarity filter its signature, so the next still frames were skipped to the raw camera picture,
    for up to max_skips frames, with no engine step (QA 71 F1)."""
    from sdbridge.plugins.manager import PluginManager
    from sdbridge.plugins.similarity import SimilarityFilter

    replies = Replies()
    store = ParamStore(Schema(), initial={"engine": "preview", "width": 64, "height": 64})
    plugins = PluginManager(store, {"similarity": SimilarityFilter})
    store.update({"plugin.similarity.enabled": True})
    registry = SessionRegistry()
    engines = EngineHost(Settings(engine="preview", device="cpu"))
    worker = Worker(registry, store, engines, replies.deliver, lambda session, message: None, plugins=plugins)
    worker.start()
    try:
        session = registry.open("stage")

        def send(frame_id: int) -> None:
            answered = len(replies.ids)
            put(session, frame_id)
            assert wait_until(lambda: len(replies.ids) > answered)

        assert wait_until(lambda: engines.active_engine() is not None or put(session, 0))
        send(1)
        send(1)
        engine = engines.active_engine()
        real = engine.step

        def failing(frames, states):
            engine.step = real
            raise RuntimeError("one bad batch")

        engine.step = failing
        send(20)                                     # passed through
        last = session.state.data[worker_module.LAST_OUTPUT]
        assert int(last.mean()) != 200, "the raw input is no last output"
        steps = worker.steps_measured
        send(20)                                     # the same still picture: the engine runs on it
        assert worker.steps_measured == steps + 1
    finally:
        worker.stop()
        worker.join(10)
