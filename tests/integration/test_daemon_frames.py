"""Frames through the real daemon over real WebSocket connections on loopback."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from sdbridge.bridge import codec
from sdbridge.bridge.protocol import HEADER_SIZE, FrameHeader, PixelFormat
from tests.clients import (StalledViewer, header_frame, make_image, recv_frame, recv_json, rgb_frame, wait_for,
                           ws_connect)

IDENTITY = {"engine": "identity", "width": 64, "height": 64}


def test_bare_jpeg_in_jpeg_out(start_daemon):
    daemon = start_daemon(params={**IDENTITY})
    with ws_connect(daemon) as ws:
        hello = recv_json(ws, "hello")
        assert hello["session"]
        ws.send(codec.encode_jpeg(make_image(96, 80), 90))
        reply = recv_frame(ws)
    assert reply[:3] == b"\xff\xd8\xff"
    image = codec.decode_image(reply)
    assert image.shape == (64, 64, 3)  # fitted to the engine's resolution (crop)


def test_a_client_without_a_path_is_served_at_the_root_and_a_wrong_path_told_so(start_daemon):
    """TouchDesigner's WebSocket DAT has an address and a port, no path: it connects to "/" (QA 41: a bare 403, and
    the README's "/ws" could be typed nowhere). Another path gets 404 with the error JSON, not a bare 403."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    daemon = start_daemon(params={**IDENTITY})
    with connect(f"ws://127.0.0.1:{daemon.port}", compression=None, proxy=None, open_timeout=10) as ws:
        assert recv_json(ws, "hello")["session"]
        ws.send(codec.encode_jpeg(make_image(96, 80), 90))
        assert recv_frame(ws)[:3] == b"\xff\xd8\xff"
    for path in ("/ws/", "/WS", "/stream/1"):
        with pytest.raises(InvalidStatus) as info:
            connect(f"ws://127.0.0.1:{daemon.port}{path}", proxy=None, open_timeout=10)
        assert info.value.response.status_code == 404, path
        error = json.loads(info.value.response.body)
        assert error["code"] == "not_found" and repr(path) in error["message"] and "/ws (or /)" in error["message"]


def test_png_in_jpeg_out_at_input_size(start_daemon):
    daemon = start_daemon(params={**IDENTITY, "output_size": "input"})
    with ws_connect(daemon) as ws:
        ws.send(codec.encode_png(make_image(100, 60)))
        image = codec.decode_image(recv_frame(ws))
    assert image.shape == (60, 100, 3)


@pytest.mark.parametrize("mode", ["crop", "fit"])
def test_a_reply_at_input_size_is_not_stretched(start_daemon, mode):
    """A 16:9 frame with a square in it comes back at 16:9 with the square square, whatever the resize mode
    (QA 16: crop and fit replies were stretched back over the whole frame; fit's kept its bars)."""
    daemon = start_daemon(params={**IDENTITY, "output_size": "input", "resize_mode": mode})
    image = np.zeros((180, 320, 3), np.uint8)
    image[50:130, 120:200] = 255  # an 80x80 square at the centre
    with ws_connect(daemon) as ws:
        ws.send(codec.encode_png(image))
        back = codec.decode_image(recv_frame(ws))
    assert back.shape == (180, 320, 3)
    rows, columns = np.nonzero(back[..., 0] > 127)
    width, height = columns.max() - columns.min() + 1, rows.max() - rows.min() + 1
    assert abs(width - 80) <= 6 and abs(height - 80) <= 6, f"the square came back {width}x{height}"
    assert abs(columns.mean() - 159.5) <= 3 and abs(rows.mean() - 89.5) <= 3


def test_raw_rgba_bottom_up_round_trip_is_exact(start_daemon):
    """TouchDesigner's raw TOP bytes (RGBA, bottom-up rows) come back byte-identical on identity."""
    daemon = start_daemon(params={**IDENTITY})
    rgb = make_image(64, 64, seed=3)
    rgba = np.dstack([rgb, np.full((64, 64), 255, np.uint8)])
    bottom_up = np.ascontiguousarray(rgba[::-1])
    message = header_frame(bottom_up.tobytes(), PixelFormat.RGBA8, 64, 64, frame_id=77, client_ts_us=123456789,
                           reply=PixelFormat.RGBA8, bottom_up=True)
    with ws_connect(daemon) as ws:
        ws.send(message)
        reply = recv_frame(ws)
    header, payload = FrameHeader.parse(reply)
    assert header.frame_id == 77 and header.client_ts_us == 123456789
    assert header.pixel_format == PixelFormat.RGBA8 and (header.width, header.height) == (64, 64)
    assert header.flags & 1
    assert bytes(payload) == bottom_up.tobytes()


def test_a_raw_4096_square_rgba_frame_fits_one_message(start_daemon):
    """The largest raw frame the docs promise (RGBA8 4096x4096 and its header) is answered, not closed with 1009
    (qa8: the limit was exactly 64 MiB, the header 32 bytes over it)."""
    daemon = start_daemon(params={**IDENTITY})
    rgba = np.zeros((4096, 4096, 4), np.uint8)
    rgba[..., 1] = 200
    with ws_connect(daemon) as ws:
        ws.send(header_frame(rgba.tobytes(), PixelFormat.RGBA8, 4096, 4096, frame_id=9, reply=PixelFormat.RGB8))
        header, payload = FrameHeader.parse(recv_frame(ws))
    assert header.frame_id == 9 and (header.width, header.height) == (64, 64)
    assert np.frombuffer(payload, np.uint8).reshape(64, 64, 3)[..., 1].min() == 200


def test_header_jpeg_reply_rgb8_echoes_ids(start_daemon):
    daemon = start_daemon(params={**IDENTITY})
    jpeg = codec.encode_jpeg(make_image(64, 64), 95)
    with ws_connect(daemon) as ws:
        for frame_id in (1, 2, 3):
            ws.send(header_frame(jpeg, PixelFormat.JPEG, 0, 0, frame_id=frame_id, client_ts_us=frame_id * 1000,
                                 reply=PixelFormat.RGB8))
            header, payload = FrameHeader.parse(recv_frame(ws))
            assert (header.frame_id, header.client_ts_us) == (frame_id, frame_id * 1000)
            assert header.pixel_format == PixelFormat.RGB8 and len(payload) == 64 * 64 * 3


def test_preview_engine_changes_the_image(start_daemon):
    daemon = start_daemon(params={"engine": "preview", "effect": "cartoon", "strength": 1.0, "width": 128,
                                  "height": 128})
    source = make_image(128, 128, seed=5)
    with ws_connect(daemon) as ws:
        ws.send(codec.encode_png(source))
        out = codec.decode_image(recv_frame(ws))
    assert out.shape == source.shape
    assert np.abs(out.astype(int) - source.astype(int)).mean() > 3


def test_viewer_joins_a_session_by_name(start_daemon):
    daemon = start_daemon(params={**IDENTITY})
    with ws_connect(daemon, "?session=stage") as sender, ws_connect(daemon, "?session=stage") as viewer:
        assert recv_json(viewer, "hello")["session"] == "stage"
        recv_json(sender, "hello")
        sender.send(header_frame(codec.encode_jpeg(make_image(), 90), PixelFormat.JPEG, 64, 64, frame_id=9))
        assert FrameHeader.parse(recv_frame(sender))[0].frame_id == 9
        assert FrameHeader.parse(recv_frame(viewer))[0].frame_id == 9


def test_flood_drops_old_frames_and_keeps_latency_bounded(start_daemon):
    """A sender that floods never builds a queue: old frames are dropped, counted, never decoded."""
    daemon = start_daemon(params={"engine": "preview", "width": 256, "height": 256})
    jpeg = codec.encode_jpeg(make_image(256, 256), 85)
    with ws_connect(daemon, "?session=flood") as ws:
        for frame_id in range(300):
            ws.send(header_frame(jpeg, PixelFormat.JPEG, 256, 256, frame_id=frame_id))
        sent_last = time.monotonic()
        replies, last_id = 0, -1
        while last_id != 299:
            last_id = FrameHeader.parse(recv_frame(ws, timeout=20))[0].frame_id
            replies += 1
        latency = time.monotonic() - sent_last
        session = daemon.registry.get("flood").stats()
    assert session["frames_in"] == 300
    assert session["frames_dropped"] > 0 and replies < 300
    assert session["frames_out"] + session["frames_dropped"] == 300
    # The last frame is answered promptly: bounded by a few frame times, not by 300 (10x loose).
    assert latency < 5.0
    # Totals outlive the session.
    assert daemon.collect_stats()["frames_dropped"] == session["frames_dropped"]


def test_stalled_viewer_does_not_slow_the_sender(start_daemon):
    daemon = start_daemon(params={"engine": "identity", "width": 256, "height": 256})
    noisy = np.random.default_rng(1).integers(0, 256, (256, 256, 3), dtype=np.uint8)
    jpeg = codec.encode_jpeg(noisy, 95)  # ~100 KB: the stalled socket's buffers fill fast
    stalled = StalledViewer(daemon.port, "?session=s")
    try:
        with ws_connect(daemon, "?session=s") as sender:
            started = time.monotonic()
            for frame_id in range(300):  # one in flight at a time, as a real client does
                sender.send(header_frame(jpeg, PixelFormat.JPEG, 256, 256, frame_id=frame_id))
                assert FrameHeader.parse(recv_frame(sender))[0].frame_id == frame_id
            elapsed = time.monotonic() - started
            session = daemon.registry.get("s")
            viewers = sorted(session.viewers, key=lambda v: v.frames_sent)
            stalled_viewer, sender_viewer = viewers[0], viewers[-1]
    finally:
        stalled.close()
    assert sender_viewer.frames_sent == 300 and sender_viewer.frames_dropped == 0
    # The stalled viewer holds at most one frame in the daemon; the rest were dropped for it alone.
    # What it was sent sits in the kernel's socket buffers (bounded by tcp_wmem, 4 MB here), not in ours.
    assert stalled_viewer.buffered_frames <= 1
    assert stalled_viewer.frames_sent * len(jpeg) < 10_000_000
    assert stalled_viewer.frames_dropped > 100
    assert elapsed < 60  # 300 round trips; a few seconds on 2 cores


def test_txt2img_streams_to_a_viewer_without_input(start_daemon):
    daemon = start_daemon(params={"engine": "preview", "mode": "txt2img", "width": 64, "height": 64,
                                  "max_fps": 20})
    with ws_connect(daemon) as ws:
        first = recv_frame(ws, timeout=10)
        second = recv_frame(ws, timeout=10)
    assert first[:3] == b"\xff\xd8\xff" and second[:3] == b"\xff\xd8\xff"


def test_a_frame_sent_in_txt2img_is_answered_when_img2img_comes_back(start_daemon):
    """A client that sends one frame and waits for its reply (docs/protocol.md) sent one while the operator had
    mode at txt2img: it was taken and never answered, dropped or refused, and the client waited for good (QA 47
    F5). It waits as the newest frame and is answered on the way back; /stats counts the generated frames apart,
    so that its totals still add up (QA 47 F4)."""
    import httpx

    daemon = start_daemon(params={**IDENTITY, "max_fps": 20})
    http = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=30, trust_env=False)
    image = make_image(64, 64, seed=3)
    with ws_connect(daemon) as ws:
        ws.send(rgb_frame(image, frame_id=1))
        assert FrameHeader.parse(recv_frame(ws))[0].frame_id == 1
        assert http.post("/params", json={"mode": "txt2img"}).status_code == 200
        assert recv_frame(ws, timeout=10)[:3] == b"\xff\xd8\xff"   # a generated frame, a bare JPEG
        ws.send(rgb_frame(image, frame_id=2))
        for _ in range(3):
            assert recv_frame(ws, timeout=10)[:3] == b"\xff\xd8\xff"   # still generated frames, no reply yet
        assert http.post("/params", json={"mode": "img2img"}).status_code == 200
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            message = recv_frame(ws, timeout=20)
            if message[:4] == b"SDBF":
                break
        header, payload = FrameHeader.parse(message)
        assert header.frame_id == 2 and np.array_equal(np.frombuffer(payload, np.uint8).reshape(64, 64, 3), image)
        stats = http.get("/stats").json()
    http.close()
    assert stats["frames_generated"] >= 4
    assert stats["frames_received"] == stats["frames_out"] - stats["frames_generated"] + stats["frames_dropped"] == 2


@pytest.mark.parametrize("message, code", [
    (b"garbage bytes that are no frame", "bad_frame"),
    (b"SDBF" + b"\x03" + bytes(27), "bad_frame"),  # unsupported version
    (b"\xff\xd8\xff\xe0" + bytes(100), "bad_image"),  # a JPEG that is not
])
def test_bad_frames_get_an_error_and_the_next_frame_works(start_daemon, message, code):
    daemon = start_daemon(params={**IDENTITY})
    with ws_connect(daemon) as ws:
        ws.send(message)
        error = recv_json(ws, "error")
        assert error["code"] == code and error["message"]
        ws.send(codec.encode_jpeg(make_image(), 90))
        assert recv_frame(ws)[:3] == b"\xff\xd8\xff"


def test_header_that_lies_about_its_size(start_daemon):
    """A header frame's error names its frame_id: a payload of another length, a JPEG of another size."""
    daemon = start_daemon(params={**IDENTITY})
    good = header_frame(bytes(64 * 64 * 3), PixelFormat.RGB8, 64, 64, frame_id=7)
    lying = good[:HEADER_SIZE] + bytes(100)  # header says 12288 payload bytes
    jpeg = codec.encode_jpeg(make_image(64, 48), 90)
    with ws_connect(daemon) as ws:
        ws.send(lying)
        error = recv_json(ws, "error")
        assert error["code"] == "bad_frame" and "12288" in error["message"] and error["frame_id"] == 7
        ws.send(header_frame(jpeg, PixelFormat.JPEG, 100, 100, frame_id=8))
        error = recv_json(ws, "error")
        assert error["code"] == "bad_frame" and error["frame_id"] == 8
        assert "header says 100x100 but its JPEG is 64x48" in error["message"]
        ws.send(header_frame(jpeg, PixelFormat.JPEG, 64, 48, frame_id=9))
        assert FrameHeader.parse(recv_frame(ws))[0].frame_id == 9
        ws.send(good)
        assert FrameHeader.parse(recv_frame(ws))[0].payload_length > 0


def test_truncated_jpeg_is_an_error(start_daemon):
    daemon = start_daemon(params={**IDENTITY})
    jpeg = codec.encode_jpeg(make_image(), 90)
    with ws_connect(daemon) as ws:
        ws.send(jpeg[: len(jpeg) // 2])
        assert recv_json(ws, "error")["code"] == "bad_image"
        ws.send(jpeg)
        assert recv_frame(ws)[:3] == b"\xff\xd8\xff"


def test_a_frame_that_cannot_be_decoded_is_counted_so_the_totals_add_up(start_daemon):
    """QA 20: a whole file that is corrupt inside (found as it decodes) counted as received and never anywhere
    else, so /stats frames_received stayed above out + dropped + condition frames for good."""
    daemon = start_daemon(params={**IDENTITY})
    png = bytearray(codec.encode_png(make_image(64, 64)))
    data = png.index(b"IDAT") + 8
    png[data:data + 32] = bytes(value ^ 0x55 for value in png[data:data + 32])  # its CRC and end stay whole
    with ws_connect(daemon) as ws:
        for frame_id in range(3):
            ws.send(header_frame(bytes(png), PixelFormat.PNG, 0, 0, frame_id=frame_id))
            assert recv_json(ws, "error")["code"] == "bad_image"
        ws.send(codec.encode_jpeg(make_image(64, 64), 90))
        assert recv_frame(ws)
        stats = daemon.collect_stats()
    assert stats["frames_received"] == 4
    assert stats["frames_out"] + stats["frames_dropped"] + stats["condition_frames"] == 4, stats


def test_oversized_frames_get_an_error_and_the_connection_stays(start_daemon):
    daemon = start_daemon(params={**IDENTITY})
    jpeg = bytearray(codec.encode_jpeg(make_image(16, 16), 90))
    sof = jpeg.index(b"\xff\xc0")
    jpeg[sof + 5:sof + 7] = (9000).to_bytes(2, "big")  # claims 9000 rows
    with ws_connect(daemon) as ws:
        ws.send(header_frame(bytes(12), PixelFormat.RGB8, 9000, 1))
        assert "width 9000 exceeds 8192" in recv_json(ws, "error")["message"]
        ws.send(bytes(jpeg))
        assert "larger than 8192" in recv_json(ws, "error")["message"]
        ws.send(codec.encode_jpeg(make_image(), 90))
        assert recv_frame(ws)[:3] == b"\xff\xd8\xff"


def test_frames_pass_through_while_no_engine_can_serve(start_daemon, tmp_path):
    """The stream never stops: with a model that cannot load, the input comes back, flagged."""
    daemon = start_daemon(params={"engine": "diffusion", "model": str(tmp_path / "missing"), "width": 64,
                                  "height": 64})
    image = make_image(64, 64)
    with ws_connect(daemon) as ws:
        error = recv_json(ws, "error", timeout=30)
        assert error["code"] == "model_not_found"
        ws.send(codec.encode_png(image))
        out = codec.decode_image(recv_frame(ws))
    assert np.abs(out.astype(int) - image.astype(int)).mean() < 8  # the input, through JPEG q85
    stats = daemon.collect_stats()
    assert stats["passthrough"] is True and stats["engine"]["status"] == "failed"


def test_health_says_degraded_while_frames_are_not_what_was_asked(start_daemon, tmp_path):
    """QA 8: an operator --model that failed at start left the preview engine serving while /health said "ok";
    passed-through frames too said "ok". Both are "degraded" now, with what failed (still 200: it is alive)."""
    import httpx

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model_index.json").write_text("{not json", encoding="utf-8")
    daemon = start_daemon(model=str(broken), params={"width": 64, "height": 64})  # engine auto
    base = f"http://127.0.0.1:{daemon.port}"
    assert wait_for(lambda: httpx.get(base + "/health").json()["engine"].get("engine") == "preview", timeout=60)
    health = httpx.get(base + "/health").json()
    assert health["status"] == "degraded", health
    assert health["engine"]["fallback"]["model"] == str(broken) and health["engine"]["fallback"]["error"]
    failed = start_daemon(params={"engine": "diffusion", "model": str(tmp_path / "missing"), "width": 64,
                                  "height": 64})
    base = f"http://127.0.0.1:{failed.port}"
    assert wait_for(lambda: httpx.get(base + "/health").json()["engine"]["status"] == "failed", timeout=60)
    assert httpx.get(base + "/health").json()["status"] == "degraded"
    fine = start_daemon(params={**IDENTITY})
    assert wait_for(lambda: httpx.get(f"http://127.0.0.1:{fine.port}/health").json()["engine"]["status"] == "ready")
    assert httpx.get(f"http://127.0.0.1:{fine.port}/health").json()["status"] == "ok"


def test_a_client_model_that_fails_while_the_fallback_serves_is_tried_once(start_daemon, tmp_path):
    """QA 20: with the preview serving for a broken --model, a client's model that failed too set the parameters
    back to auto, which loaded the broken --model again: two loads, two errors to every client. One now."""
    import httpx

    for name in ("broken", "other"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text("{not json", encoding="utf-8")
    daemon = start_daemon(model=str(tmp_path / "broken"), models_dir=str(tmp_path), params={"width": 64, "height": 64})
    base = f"http://127.0.0.1:{daemon.port}"
    assert wait_for(lambda: httpx.get(base + "/health").json()["engine"].get("engine") == "preview", timeout=60)
    failures = daemon.engines.load_failures
    with ws_connect(daemon) as ws:
        recv_json(ws, "hello")
        ws.send(json.dumps({"type": "set", "params": {"model": "other"}}))
        error = recv_json(ws, "error", timeout=30)
        assert "other" in error["message"] and error["code"] == "bad_model"
        # Set back to what serves: the operator's --model, behind which the preview serves (QA 47 F7: the parameter
        # names the --model from the start, as after a switch).
        assert wait_for(lambda: daemon.store.get("model") == str(tmp_path / "broken"), timeout=10)
        time.sleep(1.5)  # a second load would have started and failed by now
        assert daemon.engines.load_failures == failures + 1
        ws.send(codec.encode_jpeg(make_image(64, 64), 90))
        assert recv_frame(ws)  # the preview still serves
    health = httpx.get(base + "/health").json()
    assert health["engine"]["engine"] == "preview" and health["engine"]["fallback"]["model"] == str(tmp_path / "broken")


@pytest.mark.parametrize("model, engine, architecture, extra", [
    ("tiny_model_dir", "compiled", "sd15", {}),
    ("tiny_sdxl_dir", "diffusion", "sdxl", {"guidance": 2.0, "negative_prompt": ""}),
    ("tiny_sdxl_dir", "compiled", "sdxl", {"guidance": 2.0, "negative_prompt": ""})])
def test_a_model_engine_serves_the_stream(request, start_daemon, model, engine, architecture, extra):
    """A model folder through the daemon's real loading path, on the engine a user picks (the compiled
    one; SDXL on both): it loads the model, answers every frame, and says what it runs."""
    import httpx

    from tests.clients import wait_for

    daemon = start_daemon(params={"engine": engine, "width": 64, "height": 64, "steps": 2, **extra},
                          model=str(request.getfixturevalue(model)), warm_sessions=3)
    base = f"http://127.0.0.1:{daemon.port}"
    assert wait_for(lambda: httpx.get(base + "/health").json()["engine"]["status"] == "ready", timeout=60)
    with ws_connect(daemon) as ws:
        for seed in range(3):
            ws.send(codec.encode_jpeg(make_image(64, 64, seed=seed), 90))
            assert codec.decode_image(recv_frame(ws)).shape == (64, 64, 3)
    described = httpx.get(base + "/health").json()["engine"]
    assert described["engine"] == engine and described["architecture"] == architecture
    if engine == "compiled":
        # --warm-sessions reached the engine: uncompiled on the CPU, each batch runs at its own size.
        assert described["nan_frames"] == 0 and described["batch_sizes"] == [1, 2, 3]


def test_the_animatediff_engine_refuses_an_sdxl_model(start_daemon, tiny_sdxl_dir):
    import httpx

    from tests.clients import wait_for

    daemon = start_daemon(params={"engine": "animatediff", "width": 64, "height": 64}, model=str(tiny_sdxl_dir))
    base = f"http://127.0.0.1:{daemon.port}"
    assert wait_for(lambda: httpx.get(base + "/health").json()["engine"]["status"] == "failed", timeout=60)
    engine = httpx.get(base + "/health").json()["engine"]
    assert "SDXL" in engine["last_error"] and "animatediff engine" in engine["last_error"]


def test_an_operator_motion_adapter_that_is_not_there_leaves_img2img_serving(start_daemon, tiny_model_dir, tmp_path):
    """QA 48 F1: ``--motion-adapter`` naming nothing failed the animatediff engine and frames passed through
    undiffused; the engine is ready now, /health says why it has no motion, and frames are diffused."""
    import httpx

    from tests.clients import wait_for

    daemon = start_daemon(params={"engine": "animatediff", "width": 64, "height": 64, "steps": 2},
                          model=str(tiny_model_dir), motion_adapter=str(tmp_path / "mm_sd_v15"))
    base = f"http://127.0.0.1:{daemon.port}"
    assert wait_for(lambda: httpx.get(base + "/health").json()["engine"]["status"] not in ("loading", "starting"),
                    timeout=60)
    health = httpx.get(base + "/health").json()
    engine = health["engine"]
    assert engine["status"] == "ready" and engine["engine"] == "animatediff", engine
    assert engine["motion"]["adapter"] is None and "mm_sd_v15" in engine["motion"]["error"]
    assert health["status"] == "degraded"  # not the frames asked for: no motion (QA 58 F3: "ok")
    image = make_image(64, 64, seed=4)
    with ws_connect(daemon) as ws:
        ws.send(codec.encode_jpeg(image, 95))
        out = codec.decode_image(recv_frame(ws)).astype(int)
    assert np.abs(out - image.astype(int)).mean() > 5   # diffused, not passed through


def test_the_sampler_changes_live_over_osc(start_daemon, tiny_model_dir):
    """``/sd/sampler "LCM"`` switches the compiled engine's sampler between frames: the stream keeps
    answering, LCM runs on the engine's fast path (the stream batch, not the eager fallback), and the
    same input gives another frame; an unknown sampler is refused with a code and the stream goes on."""
    import json

    import httpx
    from pythonosc.udp_client import SimpleUDPClient

    from tests.clients import recv_json, wait_for

    daemon = start_daemon(params={"engine": "compiled", "width": 64, "height": 64, "steps": 4, "strength": 0.75},
                          model=str(tiny_model_dir))
    base = f"http://127.0.0.1:{daemon.port}"
    assert wait_for(lambda: httpx.get(base + "/health").json()["engine"]["status"] == "ready", timeout=60)
    jpeg = codec.encode_jpeg(make_image(64, 64, seed=4), 95)
    with ws_connect(daemon) as ws:
        ws.send(jpeg)
        before = codec.decode_image(recv_frame(ws)).astype(int)
        assert httpx.get(base + "/health").json()["engine"]["scheduler"] != "LCMScheduler"
        SimpleUDPClient("127.0.0.1", daemon.osc_port).send_message("/sd/sampler", "LCM")
        assert wait_for(lambda: daemon.store.get("sampler") == "LCM")
        ws.send(jpeg)
        after = codec.decode_image(recv_frame(ws)).astype(int)
        described = httpx.get(base + "/health").json()["engine"]
        assert described["scheduler"] == "LCMScheduler" and described["path"] == "stream"
        assert np.abs(after - before).mean() > 1.0
        ws.send(json.dumps({"type": "set", "params": {"sampler": "Nope"}}))
        error = recv_json(ws, "error")
        assert error["code"] == "bad_param" and "Nope" in error["message"]
        ws.send(jpeg)
        assert codec.decode_image(recv_frame(ws)).shape == (64, 64, 3)
    assert daemon.store.get("sampler") == "LCM"


def test_the_stats_totals_add_up_with_condition_frames_and_sessions_closed_mid_stream(start_daemon):
    """QA 12: frames_received outran frames_out + frames_dropped by the condition frames and by the frames still
    in a slot when their session closed; each is now counted."""
    import httpx

    from tests.clients import rgb_frame

    daemon = start_daemon(params={"engine": "identity"})
    stats_url = f"http://127.0.0.1:{daemon.port}/stats"
    for round_ in range(3):
        with ws_connect(daemon) as ws:
            for frame_id in range(1, 41):  # faster than the replies: some wait in the slot, some are replaced
                ws.send(rgb_frame(make_image(64, 64, seed=frame_id), frame_id=frame_id))
                if frame_id % 10 == 0:
                    ws.send(rgb_frame(make_image(64, 64, seed=99), channel=1, frame_id=1000 + frame_id))
            recv_frame(ws)
        # closed without reading the rest: frames may be left in the slot

    def totals() -> dict:
        return httpx.get(stats_url, trust_env=False, timeout=10).json()

    assert wait_for(lambda: totals()["sessions"] == [], timeout=20)
    stats = totals()
    assert stats["condition_frames"] == 12
    assert stats["frames_received"] == stats["frames_out"] + stats["frames_dropped"] + stats["condition_frames"]
    assert stats["frames_received"] == 3 * 44


def test_a_new_client_on_a_reused_session_name_sees_none_of_the_old_ones_frames(start_daemon):
    """QA 13 F1: the crossfade remembered a closed session's last frame by name, and after a change of engine made
    while idle, a new client under that name got the old client's picture dissolving into its own."""
    import httpx

    from tests.clients import reply_image, rgb_frame

    daemon = start_daemon(params={"engine": "identity", "crossfade_s": 10.0})
    http = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", trust_env=False, timeout=10)
    red = np.zeros((64, 64, 3), np.uint8)
    red[..., 0] = 220  # RGB
    blue = np.zeros((64, 64, 3), np.uint8)
    blue[..., 2] = 220
    with ws_connect(daemon, "?session=X") as old:
        for frame_id in range(1, 4):
            old.send(rgb_frame(red, frame_id=frame_id))
            recv_frame(old)
    assert wait_for(lambda: http.get("/stats").json()["sessions"] == [], timeout=20)
    assert http.post("/params", json={"engine": "preview"}).status_code == 200
    assert wait_for(lambda: http.get("/health").json()["engine"].get("engine") == "preview", timeout=30)
    with ws_connect(daemon, "?session=X") as new, ws_connect(daemon, "?session=Y") as fresh:
        new.send(rgb_frame(blue, frame_id=1))
        fresh.send(rgb_frame(blue, frame_id=1))
        reused, control = reply_image(recv_frame(new)), reply_image(recv_frame(fresh))
    difference = np.abs(reused.astype(np.int16) - control.astype(np.int16))
    assert difference.mean() < 8, f"the new client's first frame differs from a fresh session's by {difference.mean()}"
    http.close()
