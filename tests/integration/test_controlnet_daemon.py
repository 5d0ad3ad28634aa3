"""ControlNet in the real daemon: a condition stream on channel 1 of the frame header, over a real WebSocket."""

from __future__ import annotations

import json
import time

import httpx
import numpy as np
import pytest

from sdbridge.bridge.protocol import FrameHeader, PixelFormat
from tests.clients import header_frame, make_image, recv_frame, recv_json, reply_image, wait_for, ws_connect
from tests.clients import rgb_frame as raw
from tests.support.controlnets import controlnet_folder


@pytest.fixture(scope="module")
def controlnet_dir(tiny_model_dir, tmp_path_factory):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    return controlnet_folder(tmp_path_factory.mktemp("controlnet"), unet, edges={"seed": 1, "std": 1.0},
                             lines={"seed": 2, "std": 1.0})


def serving(client: httpx.Client, name: str) -> bool:
    """Whether ControlNet slot 1 runs ``name`` from the next frame on (/health)."""
    engine = client.get("/health").json()["engine"]
    return engine.get("controlnet", {}).get("slots", [{}])[0].get("serving") == name


def test_condition_frame_on_channel_1_drives_the_controlnet(start_daemon, tiny_model_dir, controlnet_dir):
    daemon = start_daemon(model=str(tiny_model_dir), controlnet_dir=str(controlnet_dir),
                          params={"width": 64, "height": 64, "steps": 2, "strength": 1.0,
                                  "controlnet_1_model": "edges", "controlnet_1_channel": 1,
                                  "controlnet_1_scale": 2.0, "crossfade_s": 0.0})
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=30)

    assert wait_for(lambda: serving(client, "edges"), timeout=60)
    frame = make_image(64, 64, seed=2)
    square = np.zeros((64, 64, 3), np.uint8)
    square[16:48, 16:48] = 255
    stripes = np.zeros((64, 64, 3), np.uint8)
    stripes[:, ::8] = 255
    with ws_connect(daemon, "?session=cn") as ws:
        ws.send(raw(frame, frame_id=1))
        base = reply_image(recv_frame(ws))            # no condition frame yet: the slot adds nothing
        ws.send(raw(square, channel=1, frame_id=2))    # no reply: it waits for the next main frame
        ws.send(raw(frame, frame_id=3))
        message = recv_frame(ws)
        assert FrameHeader.parse(message)[0].frame_id == 3
        with_square = reply_image(message)
        ws.send(raw(frame, frame_id=4))                # the latest condition frame stays in use
        again = reply_image(recv_frame(ws))
        ws.send(raw(stripes, channel=1, frame_id=5))
        ws.send(raw(frame, frame_id=6))
        with_stripes = reply_image(recv_frame(ws))
        ws.send(json.dumps({"type": "set", "params": {"controlnet_1_scale": 0}}))
        ws.send(raw(frame, frame_id=7))
        off = reply_image(recv_frame(ws))
        session = daemon.registry.get("cn").stats()
    assert session["frames_in"] == 5  # condition frames are counted apart
    assert session["condition_frames"] == {1: {"in": 2, "dropped": 0}}
    # The tiny random model's TAESD gives dim frames: a few levels of difference is the ControlNet's doing,
    # since everything else is deterministic (the same frame with the same condition gives the same bytes).
    assert np.abs(with_square.astype(int) - base.astype(int)).max() >= 2
    assert np.array_equal(again, with_square)
    assert not np.array_equal(with_stripes, with_square)
    assert np.array_equal(off, base)


def test_a_session_is_told_once_that_a_slot_reads_a_channel_it_has_not_sent(start_daemon, tiny_model_dir,
                                                                            controlnet_dir):
    """A reconnect is a new session, with no condition frame: a depth pass that cooked once was never sent again and
    the ControlNet was off for the rest of the show without a word (QA 41). Each session is told once per channel."""
    daemon = start_daemon(model=str(tiny_model_dir), controlnet_dir=str(controlnet_dir),
                          params={"width": 64, "height": 64, "steps": 1, "strength": 1.0, "crossfade_s": 0.0,
                                  "controlnet_1_model": "edges", "controlnet_1_channel": 1})
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=30)
    assert wait_for(lambda: serving(client, "edges"), timeout=60)
    frame = make_image(64, 64, seed=2)

    def told(ws, frames: list[bytes]) -> list[dict]:
        errors = []
        for message in frames:
            ws.send(message)
            while not isinstance(reply := ws.recv(timeout=30), bytes):
                if json.loads(reply)["type"] == "error":
                    errors.append(json.loads(reply))
        return errors

    for connection in range(2):  # the DAT's Active toggled: a new session each time
        with ws_connect(daemon, "?session=stage") as ws:
            errors = told(ws, [raw(frame, frame_id=1), raw(frame, frame_id=2), raw(frame, frame_id=3)])
            assert [error["code"] for error in errors] == ["no_condition"], (connection, errors)
            assert errors[0]["message"].startswith("controlnet_1 reads channel 1, which this session has not sent")
            ws.send(raw(frame, channel=1, frame_id=4))
            assert told(ws, [raw(frame, frame_id=5)]) == []
        assert wait_for(lambda: daemon.registry.get("stage") is None, timeout=10)


def test_only_the_channels_a_slot_reads_are_decoded(start_daemon, tiny_model_dir, controlnet_dir):
    """QA: 255 channels of tiny frames were each kept decoded at the engine's size (900x what was sent, no slot
    reading them). Now a channel is decoded while a slot reads it; its latest frame waits encoded till then."""
    from sdbridge.bridge import codec
    from sdbridge.engines.base import CONDITIONS

    daemon = start_daemon(model=str(tiny_model_dir), controlnet_dir=str(controlnet_dir),
                          params={"width": 64, "height": 64, "steps": 1, "strength": 1.0, "crossfade_s": 0.0,
                                  "controlnet_1_model": "edges", "controlnet_1_channel": 1,
                                  "controlnet_1_scale": 2.0})
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=30)
    assert wait_for(lambda: serving(client, "edges"), timeout=60)
    frame = make_image(64, 64, seed=2)
    square = np.zeros((64, 64, 3), np.uint8)
    square[16:48, 16:48] = 255
    small = codec.encode_jpeg(make_image(16, 16, seed=3), 80)
    with ws_connect(daemon, "?session=many") as ws:
        for channel in range(2, 256):
            ws.send(header_frame(small, PixelFormat.JPEG, 16, 16, frame_id=channel, channel=channel))
        ws.send(raw(square, channel=40, frame_id=300))
        ws.send(raw(frame, frame_id=301))
        assert FrameHeader.parse(recv_frame(ws))[0].frame_id == 301
        session = daemon.registry.get("many")
        assert wait_for(lambda: len(session.condition_latest) == 254)
        assert set(session.state.data.get(CONDITIONS, {})) <= {1}  # channel 1 has no frame: nothing decoded
        # The slot turns to channel 40: the square sent before is decoded now and drives it.
        ws.send(json.dumps({"type": "set", "params": {"controlnet_1_channel": 40}}))
        ws.send(raw(frame, frame_id=302))
        assert FrameHeader.parse(recv_frame(ws))[0].frame_id == 302
        ws.send(raw(frame, frame_id=303))
        via_40 = reply_image(recv_frame(ws))
        assert set(session.state.data[CONDITIONS]) == {40}
        ws.send(raw(square, channel=1, frame_id=304))
        ws.send(json.dumps({"type": "set", "params": {"controlnet_1_channel": 1}}))
        ws.send(raw(frame, frame_id=305))
        recv_frame(ws)
        ws.send(raw(frame, frame_id=306))
        via_1 = reply_image(recv_frame(ws))
        assert set(session.state.data[CONDITIONS]) == {1}
    assert np.array_equal(via_40, via_1)  # the same square on either channel: the same image
    client.close()


def test_bad_condition_frame_is_an_error_and_the_stream_goes_on(start_daemon, tiny_model_dir, controlnet_dir):
    daemon = start_daemon(model=str(tiny_model_dir), controlnet_dir=str(controlnet_dir),
                          params={"width": 64, "height": 64, "steps": 1})
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=30)
    assert wait_for(lambda: client.get("/health").json()["engine"]["status"] == "ready", timeout=60)
    with ws_connect(daemon) as ws:
        bad_jpeg = header_frame(b"\xff\xd8\xff" + b"\x00" * 64, PixelFormat.JPEG, 0, 0, frame_id=9, channel=1)
        ws.send(bad_jpeg)
        ws.send(raw(make_image(64, 64), frame_id=10))
        error = recv_json(ws, "error")
        assert error["code"] == "bad_image" and "JPEG" in error["message"] and error["frame_id"] == 9
        assert FrameHeader.parse(recv_frame(ws))[0].frame_id == 10


def test_missing_controlnet_is_reported_and_frames_keep_coming(start_daemon, tiny_model_dir, controlnet_dir):
    daemon = start_daemon(model=str(tiny_model_dir), controlnet_dir=str(controlnet_dir),
                          params={"width": 64, "height": 64, "steps": 1})
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=30)
    assert wait_for(lambda: client.get("/health").json()["engine"]["status"] == "ready", timeout=60)
    with ws_connect(daemon) as ws:
        ws.send(json.dumps({"type": "set", "params": {"controlnet_1_model": "nowhere"}}))
        ws.send(raw(make_image(64, 64), frame_id=1))
        error = recv_json(ws, "error", timeout=30)
        assert error["code"] == "model_not_found" and "nowhere" in error["message"]
        ws.send(raw(make_image(64, 64), frame_id=2))
        assert FrameHeader.parse(recv_frame(ws))[0].frame_id in (1, 2)
    # Refused where it was set, so the slot's value stays (QA 31: a typo kept as the value was loaded again, and
    # told to every session again, at each model switch).
    assert daemon.store.get("controlnet_1_model") == ""


def test_swapping_the_controlnet_mid_stream_drops_no_frame(start_daemon, tiny_model_dir, controlnet_dir):
    """Frames sent one at a time while the slot switches edges -> lines -> a broken name -> edges: every one is
    answered by the engine (none passed through), and each model's frames are its own."""
    daemon = start_daemon(model=str(tiny_model_dir), controlnet_dir=str(controlnet_dir),
                          params={"width": 64, "height": 64, "steps": 2, "strength": 1.0, "controlnet_1_scale": 2.0,
                                  "controlnet_1_model": "edges", "crossfade_s": 0.0})  # exact frames, no dissolve
    (controlnet_dir / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}garbage")
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=30)

    assert wait_for(lambda: serving(client, "edges"), timeout=60)
    frame = make_image(64, 64, seed=2)
    outputs: dict[str, list[np.ndarray]] = {}
    frame_id = 0
    with ws_connect(daemon, "?session=swap") as ws:
        for model in ("edges", "lines", "broken", "edges"):
            ws.send(json.dumps({"type": "set", "params": {"controlnet_1_model": model}}))
            for _ in range(6):
                frame_id += 1
                ws.send(raw(frame, frame_id=frame_id))
                message = recv_frame(ws)
                assert FrameHeader.parse(message)[0].frame_id == frame_id
                outputs.setdefault(model, []).append(reply_image(message))
            if model == "lines":
                assert wait_for(lambda: serving(client, "lines"), timeout=30)
            if model == "broken":
                failed = client.get("/health").json()["engine"]["controlnet"]["failed"]
                assert "safetensors" in failed["broken"] and serving(client, "lines")
        stats = daemon.registry.get("swap").stats()
    assert stats["frames_out"] == frame_id and stats["passthrough_frames"] == 0
    edges, lines = outputs["edges"][0], outputs["lines"][-1]
    assert not np.array_equal(edges, lines)
    assert all(np.array_equal(image, lines) for image in outputs["broken"])  # the old model kept serving
    assert np.array_equal(outputs["edges"][-1], edges)
    (controlnet_dir / "broken.safetensors").unlink()


def test_a_controlnet_swap_dissolves_instead_of_cutting(start_daemon, tiny_model_dir, controlnet_dir):
    """With crossfade_s, the frames after the new ControlNet takes over blend from the old one's last frame."""
    daemon = start_daemon(model=str(tiny_model_dir), controlnet_dir=str(controlnet_dir),
                          params={"width": 64, "height": 64, "steps": 2, "strength": 1.0, "controlnet_1_scale": 2.0,
                                  "controlnet_1_model": "edges", "crossfade_s": 1.0})
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=30)

    assert wait_for(lambda: serving(client, "edges"), timeout=60)
    frame = make_image(64, 64, seed=2)
    with ws_connect(daemon, "?session=fade") as ws:
        def one(frame_id: int) -> np.ndarray:
            ws.send(raw(frame, frame_id=frame_id))
            return reply_image(recv_frame(ws)).astype(float)

        one(1)
        time.sleep(1.2)  # past the fade of the start-up load
        old = one(2)
        ws.send(json.dumps({"type": "set", "params": {"controlnet_1_model": "lines"}}))
        assert wait_for(lambda: serving(client, "lines"), timeout=30)
        during = one(3)
        time.sleep(1.2)
        new = one(4)
    full = np.abs(new - old).mean()
    assert full > 0.5
    assert np.abs(during - old).mean() < 0.8 * full  # part of the way, not a cut
    assert np.abs(during - new).mean() > 0.1 * full


def test_channel_minus_one_feeds_the_session_s_last_output_back(start_daemon, tiny_model_dir, controlnet_dir):
    """TemporalNet-style feedback: a slot on channel -1 reads the session's last output. The first frame has none
    (the slot adds nothing: the frame equals the slot off); the next is conditioned on the first's output."""
    daemon = start_daemon(model=str(tiny_model_dir), controlnet_dir=str(controlnet_dir),
                          params={"width": 64, "height": 64, "steps": 2, "strength": 1.0, "crossfade_s": 0.0,
                                  "controlnet_1_model": "edges", "controlnet_1_channel": -1,
                                  "controlnet_1_scale": 2.0})
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=30)
    assert wait_for(lambda: serving(client, "edges"), timeout=60)
    frame = make_image(64, 64, seed=2)
    with ws_connect(daemon, "?session=loop") as ws:
        ws.send(raw(frame, frame_id=1))
        first = reply_image(recv_frame(ws))
        ws.send(raw(frame, frame_id=2))
        second = reply_image(recv_frame(ws))
    with ws_connect(daemon, "?session=off") as ws:
        ws.send(json.dumps({"type": "set", "params": {"controlnet_1_scale": 0}}))
        ws.send(raw(frame, frame_id=1))
        off = reply_image(recv_frame(ws))
    assert np.array_equal(first, off)  # nothing to feed back yet
    assert np.abs(second.astype(int) - first.astype(int)).max() >= 2  # the first output, fed back, shows


def test_a_starting_controlnet_name_not_in_the_folder_stops_the_start(tmp_path, controlnet_dir):
    """--set controlnet_1_model=nosuch started, and its load failed in the background at every model switch
    (QA 32), as a bad starting LoRA no longer does."""
    from sdbridge.bridge.server import Daemon
    from sdbridge.config import Settings
    from sdbridge.errors import ParamError

    settings = Settings(port=0, osc_port=0, oscquery_port=0, feedback_port=0, controlnet_dir=str(controlnet_dir),
                        presets_dir=str(tmp_path / "presets"))
    settings.params = {"controlnet_1_model": "nosuch"}
    with pytest.raises(ParamError, match="controlnet_1_model: controlnet 'nosuch' not found") as caught:
        Daemon(settings)
    assert caught.value.code == "model_not_found"


def test_a_condition_frame_is_decoded_again_at_a_new_size(start_daemon, tiny_model_dir, controlnet_dir):
    """A condition frame decoded at one size was fitted to the next from that image, not from the frame: where the
    aspect changed, it was cropped twice (QA 63 F5's fix, read in the worker)."""
    from sdbridge.bridge import codec
    from sdbridge.engines.base import CONDITIONS

    daemon = start_daemon(model=str(tiny_model_dir), controlnet_dir=str(controlnet_dir),
                          params={"width": 64, "height": 64, "steps": 1, "strength": 1.0, "crossfade_s": 0.0,
                                  "controlnet_1_model": "edges", "controlnet_1_channel": 1,
                                  "controlnet_1_scale": 1.0})
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=30)
    assert wait_for(lambda: serving(client, "edges"), timeout=60)
    wide = make_image(128, 64, seed=4)                     # 2:1, sent once
    with ws_connect(daemon, "?session=sized") as ws:
        ws.send(raw(wide, channel=1, frame_id=1))
        ws.send(raw(make_image(64, 64, seed=2), frame_id=2))
        recv_frame(ws)
        session = daemon.registry.get("sized")
        assert np.array_equal(session.state.data[CONDITIONS][1], codec.fit(wide, 64, 64, "crop"))
        ws.send(json.dumps({"type": "set", "params": {"width": 96}}))
        assert wait_for(lambda: daemon.engines.active_engine().resolution == (96, 64), timeout=30)
        for frame_id in (3, 4):
            ws.send(raw(make_image(96, 64, seed=2), frame_id=frame_id))
            recv_frame(ws)
        assert np.array_equal(session.state.data[CONDITIONS][1], codec.fit(wide, 96, 64, "crop"))
    client.close()
