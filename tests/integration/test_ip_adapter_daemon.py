"""IP-Adapter in the real daemon: a style image sent once on channel 1 of the frame header steers the stream."""

from __future__ import annotations

import json

import httpx
import numpy as np

from sdbridge.bridge.protocol import FrameHeader
from tests.clients import make_image, recv_frame, recv_json, reply_image, wait_for, ws_connect
from tests.clients import rgb_frame as raw


def serving(client: httpx.Client) -> str | None:
    return client.get("/health").json()["engine"].get("ip_adapter", {}).get("serving")


def test_a_style_image_on_channel_1_steers_the_stream(start_daemon, tiny_model_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from sdbridge.engines.tiny import write_random_ip_adapter

    unet = UNet2DConditionModel.from_pretrained(tiny_model_dir / "unet")
    write_random_ip_adapter(tmp_path / "ip_adapter", unet, name="style", seed=1, std=1.0)
    daemon = start_daemon(model=str(tiny_model_dir), models_dir=str(tmp_path),
                          params={"width": 64, "height": 64, "steps": 2, "strength": 1.0, "crossfade_s": 0.0,
                                  "ip_adapter": "style", "ip_adapter_scale": 2.0})
    client = httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=30)
    assert wait_for(lambda: client.get("/health").json()["engine"]["status"] == "ready", timeout=60)
    frame = make_image(64, 64, seed=2)
    style = np.zeros((64, 64, 3), np.uint8)
    style[:, :32] = (255, 40, 0)
    with ws_connect(daemon, "?session=ip") as ws:
        ws.send(raw(frame, frame_id=1))
        base = reply_image(recv_frame(ws))            # no style image yet: the adapter adds nothing
        assert wait_for(lambda: serving(client) == "style", timeout=60)  # loaded from the first frame's prepare
        ws.send(raw(style, channel=1, frame_id=2))     # no reply: it waits for the next main frame
        ws.send(raw(frame, frame_id=3))
        styled = reply_image(recv_frame(ws))
        ws.send(raw(frame, frame_id=4))                # the style image holds
        again = reply_image(recv_frame(ws))
        ws.send(json.dumps({"type": "set", "params": {"ip_adapter_scale": 0}}))
        ws.send(raw(frame, frame_id=5))
        off = reply_image(recv_frame(ws))
        ws.send(json.dumps({"type": "set", "params": {"ip_adapter": "missing", "ip_adapter_scale": 1.0}}))
        error = recv_json(ws, "error", timeout=30)
        ws.send(raw(frame, frame_id=6))
        reply = recv_frame(ws)
        still, kept = FrameHeader.parse(reply)[0].frame_id, reply_image(reply)
    assert np.abs(styled.astype(int) - base.astype(int)).max() >= 2
    assert np.array_equal(again, styled)
    assert np.array_equal(off, base)
    assert error["code"] == "model_not_found" and "missing" in error["message"]
    assert "known: style)" in error["message"]  # the image encoder's folder is not an adapter
    assert still == 6  # the stream goes on, and the adapter serving serves on (docs/ip-adapter.md; QA 29)
    assert np.abs(kept.astype(int) - base.astype(int)).max() >= 2
    ip_adapter = client.get("/health").json()["engine"]["ip_adapter"]
    assert ip_adapter["serving"] == "style" and ip_adapter["encodes"] <= 2   # again only after a pause (> 1 s)
