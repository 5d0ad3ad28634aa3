"""The examples, run against the real daemon: OSC control, webcam script, TouchDesigner helper."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.clients import free_port, recv_frame, wait_for, ws_connect

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def run_example(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_osc_control_set_sweep_and_preset(start_daemon):
    daemon = start_daemon(params={"engine": "identity"})
    port = str(daemon.osc_port)
    assert run_example(str(EXAMPLES / "osc_control.py"), "--port", port, "set", "prompt", "a heron",
                       "--http", f"http://127.0.0.1:{daemon.port}").returncode == 0
    assert wait_for(lambda: daemon.store.get("prompt") == "a heron")
    result = run_example(str(EXAMPLES / "osc_control.py"), "--port", port, "sweep", "strength", "0.1", "0.9",
                         "--seconds", "0.5")
    assert result.returncode == 0
    assert wait_for(lambda: abs(daemon.store.get("strength") - 0.9) < 1e-6)
    errors = daemon.osc.stats.param_errors
    result = run_example(str(EXAMPLES / "osc_control.py"), "--port", port, "sweep", "steps", "1", "4",
                         "--seconds", "0.3", "--http", f"http://127.0.0.1:{daemon.port}")
    assert result.returncode == 0
    assert wait_for(lambda: daemon.store.get("steps") == 4) and daemon.osc.stats.param_errors == errors
    # Without the types (no daemon on --http), ends that look whole sweep in whole numbers: no value refused.
    result = run_example(str(EXAMPLES / "osc_control.py"), "--port", port, "sweep", "steps", "1", "5",
                         "--seconds", "0.3", "--http", f"http://127.0.0.1:{free_port()}")
    assert result.returncode == 0 and "--http names the daemon's HTTP address" in result.stderr
    assert wait_for(lambda: daemon.store.get("steps") == 5) and daemon.osc.stats.param_errors == errors
    result = run_example(str(EXAMPLES / "osc_control.py"), "--port", port, "preset", "neon", "--glide", "0")
    assert result.returncode == 0, result.stderr
    assert wait_for(lambda: daemon.store.get("effect") == "edges")


def test_osc_control_sends_each_value_as_its_parameter_type(start_daemon):
    """Integers as OSC ints (int64 past int32), never float32, which cannot hold 16777217 or a seed
    of 4000000000; a str parameter gets text even when it looks like a number."""
    daemon = start_daemon(params={"engine": "identity"})
    osc = [str(EXAMPLES / "osc_control.py"), "--port", str(daemon.osc_port)]
    http = ["--http", f"http://127.0.0.1:{daemon.port}"]
    for param, text, expected in [("seed", "4000000000", 4000000000), ("seed", "16777217", 16777217),
                                  ("prompt", "2024", "2024"), ("strength", "0.25", 0.25), ("steps", "3", 3)]:
        result = run_example(*osc, "set", param, text, *http)
        assert result.returncode == 0, result.stderr
        assert wait_for(lambda: daemon.store.get(param) == expected), (param, text, daemon.store.get(param))
        assert type(daemon.store.get(param)) is type(expected)
    # No daemon on --http: the value goes as it looks (an int stays exact), and --type says otherwise.
    closed = ["--http", f"http://127.0.0.1:{free_port()}"]
    result = run_example(*osc, "set", "seed", "16777219", *closed)
    assert result.returncode == 0 and "could not read the parameter types" in result.stderr
    assert wait_for(lambda: daemon.store.get("seed") == 16777219), daemon.store.get("seed")
    assert run_example(*osc, "set", "prompt", "2025", "--type", "str", *closed).returncode == 0
    assert wait_for(lambda: daemon.store.get("prompt") == "2025"), daemon.store.get("prompt")
    too_big = run_example(*osc, "set", "seed", str(2**64), "--type", "int")
    assert too_big.returncode == 2 and f"seed '{2**64}' cannot be sent as int" in too_big.stderr
    assert "does not fit an OSC int64" in too_big.stderr
    assert daemon.store.get("seed") == 16777219


def test_webcam_script_on_a_video_file(start_daemon, tmp_path):
    daemon = start_daemon(params={"engine": "preview", "width": 128, "height": 128})
    video = write_clip(tmp_path / "clip.avi")
    result = run_example(str(EXAMPLES / "webcam.py"), "--url", f"ws://127.0.0.1:{daemon.port}/ws", "--source",
                         str(video), "--size", "128", "--frames", "30", "--no-window")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("30 frames")
    assert daemon.collect_stats()["frames_out"] >= 30


def import_example(folder: Path, name: str):  # noqa: ANN201 - the example's module
    sys.path.insert(0, str(folder))
    try:
        return __import__(name)
    finally:
        sys.path.pop(0)


def write_clip(path: Path, frames: int = 20) -> Path:
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 30, (160, 120))
    for index in range(frames):
        frame = np.full((120, 160, 3), index * 10, np.uint8)
        cv2.circle(frame, (20 + index * 6, 60), 15, (0, 0, 255), -1)
        writer.write(frame)
    writer.release()
    return path


def test_webcam_script_prints_the_daemons_errors_as_they_come(start_daemon, tmp_path):
    folder = tmp_path / "rec"
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64}, outputs=[f"record:{folder}"])
    folder.rmdir()
    folder.write_text("the recording folder, gone: its output fails at the first frame and tells every client")
    result = run_example(str(EXAMPLES / "webcam.py"), "--url", f"ws://127.0.0.1:{daemon.port}/ws", "--source",
                         str(write_clip(tmp_path / "clip.avi")), "--size", "64", "--frames", "6", "--no-window")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("6 frames")
    assert f"sdbridge: output_failed: output record:{folder} failed: cannot record into {folder}: File exists" \
        in result.stderr


def test_webcam_script_sends_a_virtual_camera_frames_at_its_own_size(start_daemon, tmp_path, monkeypatch, capsys):
    """The reply comes at the engine's size (64²); the camera was opened at --size (96²). No v4l2loopback
    device here: pyvirtualcam's Camera is replaced by one that keeps what it is sent."""
    webcam = import_example(EXAMPLES, "webcam")
    assert webcam.fit_to(np.zeros((64, 48, 3), np.uint8), 96, 80).shape == (80, 96, 3)
    same = np.zeros((96, 96, 3), np.uint8)
    assert webcam.fit_to(same, 96, 96) is same
    sent: list[np.ndarray] = []

    class KeepingCamera:
        def __init__(self, width: int, height: int, fps: float) -> None:
            self.width, self.height = width, height

        def send(self, frame: np.ndarray) -> None:
            sent.append(frame)

    pyvirtualcam = pytest.importorskip("pyvirtualcam")
    monkeypatch.setattr(pyvirtualcam, "Camera", KeepingCamera)
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64})
    figures = webcam.main(["--url", f"ws://127.0.0.1:{daemon.port}/ws", "--source",
                           str(write_clip(tmp_path / "clip.avi")), "--size", "96", "--frames", "3", "--no-window",
                           "--virtual-camera"])
    assert figures["frames"] == 3 and len(sent) == 3
    assert all(frame.shape == (96, 96, 3) and frame.dtype == np.uint8 for frame in sent)
    # RGB order for the camera: the clip's red circle (BGR (0, 0, 255)) is red, not blue.
    assert sent[-1][..., 0].max() > 200 and sent[-1][..., 2].max() < 100


def test_touchdesigner_helper_round_trips_raw_rgba(start_daemon):
    sdbridge_td = import_example(EXAMPLES / "touchdesigner", "sdbridge_td")
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64})
    rng = np.random.default_rng(0)
    top = rng.random((64, 64, 4), dtype=np.float32)  # what TOP.numpyArray() gives: float RGBA, bottom-up
    top[:, :, 3] = 1.0
    with ws_connect(daemon) as ws:
        ws.send(sdbridge_td.pack_top(top, frame_id=12, client_ts_us=3_000_000))
        frame_id, client_ts_us, pixels = sdbridge_td.unpack_reply(recv_frame(ws))
    assert (frame_id, client_ts_us) == (12, 3_000_000)
    assert pixels.shape == (64, 64, 4)
    assert np.abs(pixels - top).max() <= 1 / 255 + 1e-6  # identity engine: the same picture, same row order


def test_touchdesigner_helper_sends_one_and_three_channel_tops(start_daemon):
    """A depth pass from a single-channel TOP ([H, W] or [H, W, 1]) goes as grey RGB8, an RGB array as
    RGB8: the daemon takes each and the identity engine answers the same picture."""
    sdbridge_td = import_example(EXAMPLES / "touchdesigner", "sdbridge_td")
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64})
    rng = np.random.default_rng(1)
    grey = rng.random((64, 64), dtype=np.float32)
    colour = rng.integers(0, 256, (64, 64, 3), np.uint8)
    cases = [(grey, np.repeat(grey[:, :, None], 3, axis=2)), (grey[:, :, None], np.repeat(grey[:, :, None], 3, axis=2)),
             ((grey * 255 + 0.5).astype(np.uint8), np.repeat(grey[:, :, None], 3, axis=2)),
             (colour, colour.astype(np.float32) / 255)]
    with ws_connect(daemon) as ws:
        for frame_id, (pixels, expected) in enumerate(cases):
            message = sdbridge_td.pack_top(pixels, frame_id=frame_id, client_ts_us=1000 + frame_id)
            assert message[5] == sdbridge_td.RGB8 and len(message) == 32 + 64 * 64 * 3
            ws.send(message)
            got_id, _, reply = sdbridge_td.unpack_reply(recv_frame(ws))
            assert got_id == frame_id and reply.shape == (64, 64, 4)
            assert np.abs(reply[:, :, :3] - expected).max() <= 1 / 255 + 1e-6, frame_id
            assert (reply[:, :, 3] == 1.0).all()


def test_touchdesigner_helper_rounds_each_value_as_documented():
    """pack_top writes each float in place after the header (it runs in TouchDesigner's main thread:
    benchmarks/bench_td_helper.py): the bytes stay clip(v, 0, 1) * 255 + 0.5, truncated, for values out of range and
    on the half-steps too; unpack_reply gives the reply's bytes / 255 as float32."""
    sdbridge_td = import_example(EXAMPLES / "touchdesigner", "sdbridge_td")
    rng = np.random.default_rng(3)
    top = (rng.random((16, 24, 4), dtype=np.float32) * 1.4 - 0.2)
    top.flat[::7] = (np.arange(top.flat[::7].size, dtype=np.float32) + 0.5) / 255 % 1  # the half-steps
    top[0, 0] = [np.float32(np.inf), -np.float32(np.inf), 1.0, 0.0]
    message = sdbridge_td.pack_top(top[::-1], frame_id=7, client_ts_us=9)  # a view, as a flipped TOP gives
    expected = (np.clip(top[::-1], 0, 1) * np.float32(255) + np.float32(0.5)).astype(np.uint8)
    assert isinstance(message, bytes) and message[32:] == expected.tobytes()
    frame_id, client_ts_us, pixels = sdbridge_td.unpack_reply(message)
    assert (frame_id, client_ts_us) == (7, 9) and pixels.dtype == np.float32
    assert np.array_equal(pixels, expected.astype(np.float32) / np.float32(255))


@pytest.mark.parametrize("shape, dtype, message", [
    ((64, 64, 2), np.float32, r"shape \(64, 64, 2\) are not \[H, W\], \[H, W, 1\], \[H, W, 3\] or \[H, W, 4\]"),
    ((64,), np.float32, r"shape \(64,\) are not"),
    ((2, 64, 64, 4), np.uint8, r"shape \(2, 64, 64, 4\) are not"),
    ((64, 64, 4), np.int32, "dtype int32 are neither float"),
    ((0, 0, 4), np.float32, r"shape \(0, 0, 4\) hold no pixel"),
])
def test_touchdesigner_helper_refuses_other_arrays_by_shape_and_dtype(shape, dtype, message):
    sdbridge_td = import_example(EXAMPLES / "touchdesigner", "sdbridge_td")
    with pytest.raises(ValueError, match=message):
        sdbridge_td.pack_top(np.zeros(shape, dtype), frame_id=0, client_ts_us=0)


def test_touchdesigner_helper_refuses_none_naming_the_first_delayed_download():
    """numpyArray(delayed=True) is None on its first call: an AttributeError on 'ndim' was a red error on the
    Execute DAT at every start (QA 41); a ValueError now, saying what to do."""
    sdbridge_td = import_example(EXAMPLES / "touchdesigner", "sdbridge_td")
    with pytest.raises(ValueError, match=r"pixels are NoneType, not a numpy array \(numpyArray\(delayed=True\)"):
        sdbridge_td.pack_top(None, frame_id=0, client_ts_us=0)


def test_osc_control_reads_the_types_of_a_daemon_with_a_token(start_daemon):
    """With a token set, GET /params needs it: --token (or $SDBRIDGE_TOKEN) sends it, and a str parameter
    that looks like a number goes as text; without it the value goes as it looks, and the daemon refuses it."""
    token = "a-long-stage-token-0123456789"
    daemon = start_daemon(params={"engine": "identity"}, token=token)
    osc = [str(EXAMPLES / "osc_control.py"), "--port", str(daemon.osc_port)]
    http = ["--http", f"http://127.0.0.1:{daemon.port}"]
    result = run_example(*osc, "--token", token, "set", "prompt", "2026", *http)
    assert result.returncode == 0 and "could not read" not in result.stderr, result.stderr
    assert wait_for(lambda: daemon.store.get("prompt") == "2026"), daemon.store.get("prompt")
    result = run_example(*osc, "set", "prompt", "2028", *http, "--token", token)  # beside --http, as users write it
    assert result.returncode == 0 and token not in result.stderr, result.stderr
    assert wait_for(lambda: daemon.store.get("prompt") == "2028"), daemon.store.get("prompt")
    errors = daemon.osc.stats.param_errors
    result = run_example(*osc, "set", "prompt", "2027", *http)
    assert "could not read the parameter types" in result.stderr and "--token or $SDBRIDGE_TOKEN" in result.stderr
    assert wait_for(lambda: daemon.osc.stats.param_errors == errors + 1)  # an int for a str parameter: refused
    assert daemon.store.get("prompt") == "2028"


def touchdesigner_callbacks(folder: Path, jpeg_top: object) -> dict:
    """examples/touchdesigner/websocket_callbacks.py run with stand-ins for TouchDesigner's globals (no TD here):
    ``project.folder`` and an ``op`` that knows the Movie File In TOP."""
    namespace = {"project": type("Project", (), {"folder": str(folder)})(),
                 "op": lambda name: jpeg_top if name == "sdbridge_jpeg" else None}
    source = (EXAMPLES / "touchdesigner" / "websocket_callbacks.py").read_text(encoding="utf-8")
    exec(compile(source, "websocket_callbacks.py", "exec"), namespace)
    return namespace


class MovieFileInTop:
    """The parameters the callbacks touch, and the file the TOP shows at each reload."""

    def __init__(self) -> None:
        self.shown: list[bytes] = []
        top = self
        self.par = type("Par", (), {"file": ""})()
        self.par.reloadpulse = type("Pulse", (), {"pulse": lambda _self: top.shown.append(
            Path(top.par.file).read_bytes())})()


def test_touchdesigner_callbacks_show_each_jpeg_reply_whole_and_skip_one_windows_holds(start_daemon, tmp_path):
    """QA 44 F12: the callbacks replaced, every frame, the file the TOP reads, which Windows refuses while the
    TOP has it open (a script error a frame). Real JPEG replies from the daemon go through the callbacks; a write
    refused as Windows refuses it (PermissionError) skips that reply."""
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64})
    top = MovieFileInTop()
    callbacks = touchdesigner_callbacks(tmp_path, top)
    replies = []
    with ws_connect(daemon) as ws:
        for seed in range(3):
            ok, jpeg = cv2.imencode(".jpg", np.random.default_rng(seed).integers(0, 256, (64, 64, 3), np.uint8))
            ws.send(jpeg.tobytes())
            replies.append(recv_frame(ws))
    assert all(reply[:3] == b"\xff\xd8\xff" for reply in replies)
    for reply in replies[:2]:
        callbacks["onReceiveBinary"](None, reply)
    assert top.shown == replies[:2]
    assert Path(top.par.file).name in ("sdbridge_reply_0.jpg", "sdbridge_reply_1.jpg")
    shown_file = top.par.file

    def held_open(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "The process cannot access the file because it is being used by another process",
                              path)

    callbacks["open"] = held_open  # the module's open: Windows' refusal, which Linux never gives
    callbacks["onReceiveBinary"](None, replies[2])  # no exception: skipped
    assert top.shown == replies[:2] and top.par.file == shown_file
    del callbacks["open"]
    callbacks["onReceiveBinary"](None, replies[2])
    assert top.shown == replies and top.par.file != shown_file
