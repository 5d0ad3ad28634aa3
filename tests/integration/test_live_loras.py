"""LoRA weights changed live over the WebSocket; an unknown LoRA is told to the client, the stream goes on."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from sdbridge.bridge import codec
from sdbridge.engines.models import load_pipeline_parts
from tests.clients import make_image, recv_json, wait_for, ws_connect
from tests.unit.engines.test_lora import random_lora, write_kohya


def frames_and_messages(ws, frame: bytes, count: int) -> tuple[list[bytes], list[dict]]:
    """Send ``count`` frames, one at a time; every frame gets an answer, messages are collected."""
    replies, messages = [], []
    for _ in range(count):
        ws.send(frame)
        while not isinstance(message := ws.recv(timeout=30), bytes):
            messages.append(json.loads(message))
        replies.append(message)
    return replies, messages


def test_live_lora_weights_and_an_unknown_name(start_daemon, tiny_model_dir, tmp_path):
    lora_dir = tmp_path / "lora"
    lora_dir.mkdir()
    parts = load_pipeline_parts(str(tiny_model_dir), torch.device("cpu"), torch.float32)
    write_kohya(lora_dir / "ink.safetensors", random_lora({"unet": parts.unet, "text_encoder": parts.text_encoder}, 1))
    daemon = start_daemon(model=str(tiny_model_dir), lora_dir=str(lora_dir),
                          params={"width": 64, "height": 64, "steps": 2, "strength": 0.9,
                                  "crossfade_s": 0.0})  # a LoRA set change would dissolve over frames
    frame = codec.encode_png(make_image())
    with ws_connect(daemon) as ws:
        assert wait_for(lambda: daemon.engines.status == "ready", timeout=60)
        (base,), _ = frames_and_messages(ws, frame, 1)
        ws.send(json.dumps({"type": "set", "params": {"loras": "ink:4"}}))
        (with_lora,), _ = frames_and_messages(ws, frame, 1)
        assert with_lora != base
        # A name not in the folder is refused where it is set (QA 28: it was acked, then every frame passed
        # through unstyled): the look in place stays.
        ws.send(json.dumps({"type": "set", "params": {"loras": "nosuch:1"}}))
        replies, messages = frames_and_messages(ws, frame, 2)
        errors = [m for m in messages if m["type"] == "error"]
        assert len(errors) == 1 and errors[0]["code"] == "unknown_lora"
        assert "'nosuch' not found" in errors[0]["message"] and "there: ink" in errors[0]["message"]
        assert replies == [with_lora, with_lora] and daemon.store.get("loras") == "ink:4"
        assert daemon.collect_stats()["passthrough"] is False
        # One deleted after it was set is found by the engine at the next change: frames pass through, and say why.
        shutil.copy(lora_dir / "ink.safetensors", lora_dir / "gone.safetensors")
        ws.send(json.dumps({"type": "set", "params": {"loras": "gone:1"}}))
        frames_and_messages(ws, frame, 1)
        (lora_dir / "gone.safetensors").unlink()
        ws.send(json.dumps({"type": "set", "params": {"prompt": "another prompt"}}))
        replies, messages = frames_and_messages(ws, frame, 2)
        assert [m["code"] for m in messages if m["type"] == "error"] == ["unknown_lora"]
        assert all(reply[:3] == b"\xff\xd8\xff" for reply in replies)   # frames keep coming (passed through)
        assert daemon.collect_stats()["passthrough"] is True
        with ws_connect(daemon) as late:  # a client that connects meanwhile hears why its frames pass through
            assert recv_json(late, "error")["code"] == "unknown_lora"
        first_prompt = daemon.store.schema.get("prompt").default
        ws.send(json.dumps({"type": "set", "params": {"loras": "", "prompt": first_prompt}}))
        (back,), messages = frames_and_messages(ws, frame, 1)
        assert back == base and not [m for m in messages if m["type"] == "error"]
        assert daemon.collect_stats()["passthrough"] is False


def test_a_malformed_lora_is_refused_at_the_set_and_a_standing_error_is_told_once(start_daemon, tiny_model_dir,
                                                                                  tmp_path):
    """QA 9: a malformed ``loras`` was acked as applied and every session's frames then passed through; and
    each later change of any parameter told every client the same error again."""
    daemon = start_daemon(model=str(tiny_model_dir), lora_dir=str(tmp_path),
                          params={"width": 64, "height": 64, "steps": 1, "crossfade_s": 0.0})
    frame = codec.encode_png(make_image())
    with ws_connect(daemon) as ws:
        assert wait_for(lambda: daemon.engines.status == "ready", timeout=60)
        frames_and_messages(ws, frame, 1)
        for params in ({"loras": "x:abc, :"}, {"prompt": "a <lora:x:zz> cat"}):
            ws.send(json.dumps({"type": "set", "id": 1, "params": params}))
            error = recv_json(ws, "error")
            assert error["code"] == "bad_lora" and ("'zz'" in error["message"] or "'abc'" in error["message"]), error
        _, messages = frames_and_messages(ws, frame, 2)
        assert not [m for m in messages if m["type"] == "error"]
        assert daemon.store.snapshot()[1]["loras"] == "" and daemon.collect_stats()["passthrough"] is False
        # A name that is not in the folder is refused where it is set, and the look stays.
        ws.send(json.dumps({"type": "set", "params": {"loras": "nosuch:1"}}))
        _, messages = frames_and_messages(ws, frame, 2)
        assert [m["code"] for m in messages if m["type"] == "error"] == ["unknown_lora"]
        assert daemon.store.get("loras") == "" and daemon.collect_stats()["passthrough"] is False
        # One deleted after it was set is found by the engine: told once, not again at each change.
        parts = load_pipeline_parts(str(tiny_model_dir), torch.device("cpu"), torch.float32)
        write_kohya(tmp_path / "gone.safetensors", random_lora({"unet": parts.unet, "text_encoder": parts.text_encoder},
                                                               1))
        ws.send(json.dumps({"type": "set", "params": {"loras": "gone:1"}}))
        frames_and_messages(ws, frame, 1)
        (tmp_path / "gone.safetensors").unlink()
        ws.send(json.dumps({"type": "set", "params": {"prompt": "another prompt"}}))   # a change that names it
        _, messages = frames_and_messages(ws, frame, 2)
        assert [m["code"] for m in messages if m["type"] == "error"] == ["unknown_lora"]
        for strength in (0.6, 0.7, 0.8):
            ws.send(json.dumps({"type": "set", "params": {"strength": strength}}))
            _, messages = frames_and_messages(ws, frame, 1)
            assert not [m for m in messages if m["type"] == "error"], messages
        assert daemon.collect_stats()["passthrough"] is True


def test_a_starting_lora_that_will_not_load_stops_the_start_naming_it(tmp_path):
    """--set loras=nosuch:1 started, and every frame passed through unstyled (QA 30); a starting strength out
    of range stops the start, and so does this now."""
    from sdbridge.bridge.server import Daemon
    from sdbridge.config import Settings
    from sdbridge.errors import ParamError

    (tmp_path / "lora").mkdir()
    for params, words in (({"loras": "nosuch:1"}, "'nosuch' not found"),
                          ({"prompt": "a cat <lora:nosuch:1>"}, "prompt: LoRA 'nosuch' not found")):
        settings = Settings(port=0, osc_port=0, oscquery_port=0, feedback_port=0, lora_dir=str(tmp_path / "lora"),
                            presets_dir=str(tmp_path / "presets"))
        settings.params = params
        with pytest.raises(ParamError, match=words) as caught:
            Daemon(settings)
        assert caught.value.code == "unknown_lora"
