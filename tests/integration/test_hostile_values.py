"""Hostile values through the real daemon (QA 3, findings 2, 4, 7, 13): a lone surrogate, a 400-digit integer,
a broken presets folder and an OSC colour are each refused with a code and a sentence, while other clients
(a second WebSocket, GET /params, the preset list, the OSC echo) keep working and the log holds no traceback."""

from __future__ import annotations

import json
import logging
import socket
import struct

import httpx
import pytest

from tests.clients import UdpReceiver, recv_json, wait_for, ws_connect

BIG = int("1" + "0" * 400)  # JSON allows it; float() of it overflows


@pytest.fixture
def no_tracebacks(caplog):
    """The daemon runs in this process: every record it logs passes here. A client's error is logged
    without a traceback."""
    with caplog.at_level(logging.INFO):
        yield caplog
    tracebacks = [record.getMessage() for record in caplog.records if record.exc_info]
    assert not tracebacks, tracebacks


def _http(daemon) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", trust_env=False, timeout=10)


def _post_json(http: httpx.Client, path: str, body: object) -> httpx.Response:
    # json.dumps escapes the surrogate as \ud800, as a client's JSON library does (httpx's json= would
    # try to encode it as UTF-8 and fail in the client).
    return http.post(path, content=json.dumps(body), headers={"content-type": "application/json"})


def _still_served(ws, http) -> None:
    ws.send(json.dumps({"type": "ping", "id": "alive", "t": 1}))
    assert recv_json(ws, "pong")["t"] == 1
    reply = http.get("/params")
    assert reply.status_code == 200, reply.text
    json.dumps(reply.json()).encode("utf-8")


def test_a_lone_surrogate_is_refused_and_breaks_no_other_client(start_daemon, tmp_path, no_tracebacks):
    receiver = UdpReceiver()
    presets = tmp_path / "presets"
    try:
        daemon = start_daemon(params={"engine": "identity"}, feedback_port=receiver.port, presets_dir=str(presets))
        with ws_connect(daemon) as attacker, ws_connect(daemon) as other, _http(daemon) as http:
            before = daemon.store.get("prompt")
            attacker.send(json.dumps({"type": "set", "id": 1, "params": {"prompt": "\ud800 evil"}}))
            error = recv_json(attacker, "error")
            assert error["code"] == "bad_param" and "prompt" in error["message"] and "U+D800" in error["message"]
            reply = _post_json(http, "/params", {"negative_prompt": "\udcff"})
            assert reply.status_code == 400 and reply.json()["code"] == "bad_param"
            assert "U+DCFF" in reply.json()["message"]
            assert daemon.store.get("prompt") == before and daemon.store.get("negative_prompt") == ""
            attacker.send(json.dumps({"type": "save_preset", "id": 2, "name": "surr", "description": "\udcff"}))
            error = recv_json(attacker, "error")
            assert error["code"] == "bad_param" and "description" in error["message"]
            reply = _post_json(http, "/presets", {"name": "x", "description": "\udcff"})
            assert reply.status_code == 400 and "U+DCFF" in reply.json()["message"]
            assert not presets.exists() or list(presets.iterdir()) == []  # no preset, no .tmp left behind
            # The attacker's connection, the other client, GET /params and the OSC echo all still work.
            _still_served(attacker, http)
            _still_served(other, http)
            other.send(json.dumps({"type": "set", "id": 3, "params": {"prompt": "a calm lake"}}))
            assert recv_json(other, "ack")["applied"] == {"prompt": "a calm lake"}
            echoed = receiver.messages(1.5)
            assert ("/sd/prompt", ["a calm lake"]) in echoed, echoed
    finally:
        receiver.close()


def test_a_400_digit_integer_is_a_bad_param_and_the_connection_stays(start_daemon, no_tracebacks):
    daemon = start_daemon(params={"engine": "identity"})
    with ws_connect(daemon) as ws, _http(daemon) as http:
        for name in ("strength", "guidance", "seed", "sampler"):
            ws.send(json.dumps({"type": "set", "id": name, "params": {name: BIG}}))
            error = recv_json(ws, "error")
            assert error["code"] == "bad_param" and error["message"].startswith(name), error
            assert "(401 digits)" in error["message"] and "0" * 30 not in error["message"]  # shortened
        ws.send(json.dumps({"type": "preset", "id": "p", "name": "neon", "glide_beats": BIG}))
        error = recv_json(ws, "error")
        assert error["code"] == "bad_param" and "glide_beats" in error["message"], error
        for beats in (-1, 1e308, 3001):
            ws.send(json.dumps({"type": "preset", "id": "p", "name": "neon", "glide_beats": beats}))
            assert "glide_beats" in recv_json(ws, "error")["message"]
        reply = _post_json(http, "/params", {"strength": BIG})
        assert reply.status_code == 400 and reply.json()["code"] == "bad_param"
        _still_served(ws, http)
        ws.send(json.dumps({"type": "preset", "id": "ok", "name": "neon", "glide_beats": 4}))
        assert recv_json(ws, "preset")["name"] == "neon"


def test_a_model_name_past_the_file_system_s_limit_is_model_not_found(start_daemon, no_tracebacks):
    # 256 bytes, within the schema's 1024: Path.exists raised "File name too long" out of the set (QA 49 F1): the
    # WebSocket dropped, HTTP answered a plain 500.
    daemon = start_daemon(params={"engine": "identity"})
    name = "x" * 256
    with ws_connect(daemon) as ws, _http(daemon) as http:
        ws.send(json.dumps({"type": "set", "id": 1, "params": {"model": name}}))
        error = recv_json(ws, "error")
        assert error["code"] == "model_not_found" and "too long" in error["message"].lower(), error
        reply = _post_json(http, "/params", {"model": name})
        assert reply.status_code == 400 and reply.json()["code"] == "model_not_found"
        assert http.get("/params").json()["values"]["model"] != name
        _still_served(ws, http)


def test_a_broken_presets_folder_still_lists_the_good_presets(start_daemon, tmp_path, no_tracebacks):
    presets = tmp_path / "presets"
    presets.mkdir()
    (presets / "passwd.toml").symlink_to("/etc/passwd")
    (presets / "deep.toml").write_text("x = " + "[" * 5000 + "]" * 5000 + "\n")
    (presets / "nan.toml").write_text("glide_s = nan\n[params]\n")
    (presets / "good.toml").write_text('description = "fine"\n[params]\nstrength = 0.4\n')
    daemon = start_daemon(params={"engine": "identity"}, presets_dir=str(presets))
    with _http(daemon) as http:
        reply = http.get("/presets")
        assert reply.status_code == 200, reply.text
        names = {preset["name"] for preset in reply.json()["presets"]}
        assert "good" in names and "neon" in names and not names & {"passwd", "deep", "nan"}
        passwd = http.get("/presets/passwd")
        assert passwd.status_code == 400 and passwd.json()["code"] == "forbidden_path"
        for name in ("deep", "nan"):
            reply = http.get(f"/presets/{name}")
            assert reply.status_code == 400 and reply.json()["code"] == "bad_preset", reply.text
            reply = http.post(f"/presets/{name}/recall")
            assert reply.status_code == 400 and reply.json()["code"] == "bad_preset", reply.text
    skipped = [r.getMessage() for r in no_tracebacks.records if "left out of the list" in r.getMessage()]
    assert len(skipped) == 3, skipped


def _osc(address: str, tags: str, payload: bytes) -> bytes:
    def padded(text: str) -> bytes:
        raw = text.encode() + b"\x00"
        return raw + b"\x00" * (-len(raw) % 4)

    return padded(address) + padded("," + tags) + payload


def test_an_osc_colour_is_not_a_number(start_daemon, no_tracebacks):
    receiver = UdpReceiver()
    try:
        daemon = start_daemon(params={"engine": "identity"}, feedback_port=receiver.port)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(_osc("/sd/steps", "r", struct.pack(">I", 5)), ("127.0.0.1", daemon.osc_port))
            sock.sendto(_osc("/sd/seed", "r", struct.pack(">I", 0xFFFFFFFF)), ("127.0.0.1", daemon.osc_port))
            sock.sendto(_osc("/sd/strength", "f", struct.pack(">f", 0.25)), ("127.0.0.1", daemon.osc_port))
        assert wait_for(lambda: abs(daemon.store.get("strength") - 0.25) < 1e-6)
        assert daemon.store.get("steps") == 2 and daemon.store.get("seed") == 42
        errors = [args for address, args in receiver.messages(1.5) if address == "/sd/status/error"]
        assert ["bad_param", "/sd/steps is an RGBA colour ('r'), expected a number or a string"] in errors, errors
    finally:
        receiver.close()


def test_a_model_that_fails_to_load_is_told_to_an_osc_only_controller(start_daemon, tmp_path, no_tracebacks):
    """A controller that speaks only OSC was never told that the model it asked for failed: the failure went to
    WebSocket clients alone (QA 25)."""
    receiver = UdpReceiver()
    try:
        daemon = start_daemon(params={"engine": "identity"}, feedback_port=receiver.port)
        missing = str(tmp_path / "nowhere.safetensors")
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(_osc("/sd/model", "s", missing.encode() + b"\x00" * (4 - len(missing) % 4)),
                        ("127.0.0.1", daemon.osc_port))
            sock.sendto(_osc("/sd/engine", "s", b"diffusion\x00\x00\x00"), ("127.0.0.1", daemon.osc_port))
        errors: list = []
        assert wait_for(lambda: errors.extend(args for address, args in receiver.messages(0.5)
                                              if address == "/sd/status/error") or errors, timeout=30)
        # outside the model roots: refused before any load, as a missing or broken file is after one
        assert errors[0][0] == "forbidden_path" and "nowhere.safetensors" in errors[0][1], errors
    finally:
        receiver.close()
