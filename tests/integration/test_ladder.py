"""The quality ladder against an engine slowed on purpose: it steps down, then back up."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator

from sdbridge.bridge import codec
from tests.clients import UdpReceiver, make_image, recv_json, wait_for, ws_connect


def slow_identity(monkeypatch, seconds_at_128: float) -> None:
    """The identity engine, made to cost ``seconds_at_128`` a frame at 128x128, in proportion to the pixels
    as a real engine's cost grows."""
    from sdbridge.engines.identity import IdentityEngine

    original = IdentityEngine.step

    def slow(self, frames, states):
        time.sleep(seconds_at_128 * frames.shape[1] * frames.shape[2] / (128 * 128))
        return original(self, frames, states)

    monkeypatch.setattr(IdentityEngine, "step", slow)


@contextlib.contextmanager
def streaming(daemon) -> Iterator[None]:
    """A client sending frames one after the other, each when the last came back, while the block runs."""
    stop = threading.Event()

    def stream():
        frame = codec.encode_png(make_image(128, 128))
        with ws_connect(daemon) as ws:
            while not stop.is_set():
                ws.send(frame)
                while isinstance(ws.recv(timeout=10), str):
                    pass

    sender = threading.Thread(target=stream, daemon=True)
    sender.start()
    try:
        yield
    finally:
        stop.set()
        sender.join(timeout=10)


def ladder_telemetry(receiver: UdpReceiver, seconds: float) -> list[list]:
    return [args for address, args in receiver.messages(seconds) if address == "/sd/status/ladder"]


def test_ladder_steps_down_under_load_and_back_up(start_daemon, monkeypatch):
    slow_identity(monkeypatch, 0.040)  # 25 fps at 128x128
    receiver = UdpReceiver()
    daemon = start_daemon(params={"engine": "identity", "width": 128, "height": 128, "steps": 4},
                          telemetry_hz=8.0, feedback_port=receiver.port)
    # An OSC In wired for the documented "i s" gets both at the telemetry rate, before any move too.
    assert ladder_telemetry(receiver, 1.0)[-1] == [0, "none"]
    with streaming(daemon):
        with ws_connect(daemon) as watcher:
            watcher.send(json.dumps({"type": "set", "params": {"ladder_fps": 50.0}}))  # 25 fps now: too slow
            event = recv_json(watcher, "ladder", timeout=20)
            assert event["direction"] == "down" and event["rung"] == 1
            # Down until the engine can hold 50 fps: 3/4 resolution gives 44 fps (not enough), half 100.
            assert wait_for(lambda: daemon.store.get("width") == 64, timeout=30)
            assert daemon.store.get("steps") == 2   # half the size is rung 3 or below (rungs() in ladder.py)
            # A lower target gives headroom: the ladder climbs back to the artist's settings.
            watcher.send(json.dumps({"type": "set", "params": {"ladder_fps": 10.0}}))
            assert wait_for(lambda: daemon.ladder.rung == 0, timeout=40)
            assert daemon.store.get("width") == 128 and daemon.store.get("steps") == 4
    assert daemon.collect_stats()["ladder"]["rung"] == 0
    assert ladder_telemetry(receiver, 1.0)[-1] == [0, "up"]
    receiver.close()


def test_the_ladder_steps_down_from_the_values_of_the_moment_and_gives_them_back(start_daemon, monkeypatch):
    # QA repro: the ladder on at rung 0, the artist raises steps and size, then a target the engine misses.
    slow_identity(monkeypatch, 0.020)  # 200 fps at 64x64: short of 240
    daemon = start_daemon(params={"engine": "identity", "steps": 2, "width": 64, "height": 64},
                          telemetry_hz=10.0)
    with streaming(daemon):
        with ws_connect(daemon) as control:
            def send(params):
                control.send(json.dumps({"type": "set", "params": params}))

            send({"ladder_fps": 1.0})
            time.sleep(1.0)
            assert daemon.ladder.rung == 0
            send({"steps": 20, "width": 256, "height": 256})
            assert wait_for(lambda: daemon.store.get("width") == 256)
            time.sleep(0.5)
            send({"ladder_fps": 240.0})
            assert wait_for(lambda: daemon.ladder.rung >= 2, timeout=20)
            assert daemon.store.get("steps") == 10 and daemon.store.get("width") < 256
            # A preset saved now has the artist's steps, not the ladder's.
            control.send(json.dumps({"type": "save_preset", "id": 1, "name": "while-laddered"}))
            assert recv_json(control, "preset_saved")["params"]["steps"] == 20
            send({"ladder_fps": 0.0})
            assert wait_for(lambda: daemon.ladder.rung == 0, timeout=10)
            assert wait_for(lambda: daemon.store.get("width") == 256)
            assert (daemon.store.get("steps"), daemon.store.get("height")) == (20, 256)


def test_the_ladder_stays_put_while_no_frame_runs(start_daemon, monkeypatch):
    """The ladder read the step time of the last frames before a pause at every check, and walked down every rung on
    it with nothing served: 2048² at 4 steps became 1024² at 2 with the similarity filter on (QA 61 F5)."""
    slow_identity(monkeypatch, 0.020)  # 50 fps at 128x128: short of 240
    daemon = start_daemon(params={"engine": "identity", "width": 128, "height": 128, "steps": 4},
                          telemetry_hz=10.0)
    with ws_connect(daemon) as client:
        recv_json(client, "hello")
        for _ in range(3):
            client.send(codec.encode_png(make_image(128, 128)))
            while isinstance(client.recv(timeout=10), str):
                pass
    assert wait_for(lambda: daemon.worker.step_ms_ema is not None)
    with ws_connect(daemon) as control:
        control.send(json.dumps({"type": "set", "params": {"ladder_fps": 240.0}}))
        time.sleep(2.0)  # 20 checks: the old ladder moved every second check
    assert daemon.ladder.rung <= 1 and daemon.store.get("width") == 128
