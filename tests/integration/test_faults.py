"""Faults on stage: a dead client, a failing engine, a model too big, a port in use, SIGTERM."""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from sdbridge.bridge import codec
from tests.clients import StalledViewer, free_port, make_image, recv_frame, recv_json, wait_for, ws_connect

ROOT = Path(__file__).resolve().parents[2]


def test_engine_exception_is_reported_and_the_next_frame_served(start_daemon, monkeypatch):
    from sdbridge.engines.identity import IdentityEngine

    calls = {"n": 0}
    original = IdentityEngine.step

    def flaky(self, frames, states):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("simulated CUDA error")
        return original(self, frames, states)

    monkeypatch.setattr(IdentityEngine, "step", flaky)
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64})
    frame = codec.encode_png(make_image())
    messages: list = []
    with ws_connect(daemon) as ws:
        for _ in range(3):
            ws.send(frame)
            while not isinstance(message := ws.recv(timeout=10), bytes):  # every frame gets an answer
                messages.append(json.loads(message))
    errors = [m for m in messages if m["type"] == "error"]
    assert len(errors) == 1
    assert errors[0]["code"] == "engine_failed" and "simulated CUDA error" in errors[0]["message"]
    stats = daemon.collect_stats()
    assert stats["worker"]["engine_errors"] == 1 and stats["frames_out"] == 3


def test_model_over_the_vram_budget_leaves_the_previous_engine(start_daemon, tiny_model_dir, tmp_path):
    daemon = start_daemon(params={"engine": "preview", "width": 64, "height": 64}, vram_budget_mb=1,
                          model_roots=[str(tiny_model_dir.parent)])
    with ws_connect(daemon) as ws:
        assert wait_for(lambda: daemon.engines.status == "ready")
        ws.send(json.dumps({"type": "set", "params": {"engine": "diffusion", "model": str(tiny_model_dir)}}))
        error = recv_json(ws, "error", timeout=60)
        assert error["code"] == "out_of_memory" and "1 MB budget" in error["message"]
        assert daemon.engines.describe()["engine"] == "preview"
        ws.send(codec.encode_png(make_image()))
        assert recv_frame(ws)[:3] == b"\xff\xd8\xff"


def test_checkpoint_of_wrong_architecture_leaves_the_previous_engine(start_daemon, tmp_path):
    import torch
    from safetensors.torch import save_file

    save_file({"not.a.unet": torch.zeros(4)}, str(tmp_path / "odd.safetensors"))
    daemon = start_daemon(params={"engine": "preview"}, models_dir=str(tmp_path))
    with ws_connect(daemon) as ws:
        assert wait_for(lambda: daemon.engines.status == "ready")
        ws.send(json.dumps({"type": "set", "params": {"engine": "diffusion", "model": "odd.safetensors"}}))
        error = recv_json(ws, "error", timeout=30)
    assert error["code"] == "unknown_architecture"
    assert daemon.engines.describe()["engine"] == "preview"


@pytest.mark.parametrize("attempt", ["../../etc", "/etc", "%2e%2e/%2e%2e/etc", "..\\..\\etc"])
def test_client_cannot_name_a_model_outside_the_model_folders(start_daemon, tmp_path, attempt):
    daemon = start_daemon(params={"engine": "identity"}, models_dir=str(tmp_path))
    with ws_connect(daemon) as ws:
        ws.send(json.dumps({"type": "set", "params": {"engine": "diffusion", "model": attempt}}))
        error = recv_json(ws, "error", timeout=30)
    assert error["code"] == "forbidden_path", error
    # refused where it is set, naming the parameter (QA 34: answered "applied", then refused by the load)
    assert error["message"].startswith("model: "), error
    assert daemon.store.get("model") == ""


def test_add_on_names_not_in_their_folders_are_refused_where_they_are_set(start_daemon, tmp_path):
    """An IP-Adapter or motion adapter a client names is looked for when it is set, as a ControlNet's is (QA 34:
    "applied", then refused in the background)."""
    daemon = start_daemon(params={"engine": "identity"}, models_dir=str(tmp_path))
    with ws_connect(daemon) as ws:
        for name, value, code in (("ip_adapter", "nope", "model_not_found"),
                                  ("motion_adapter", "../../etc", "forbidden_path")):
            ws.send(json.dumps({"type": "set", "params": {name: value}}))
            error = recv_json(ws, "error", timeout=30)
            assert error["code"] == code and error["message"].startswith(f"{name}: "), error
            assert daemon.store.get(name) == ""


def test_vanished_client_is_dropped_within_the_ping_timeout(start_daemon):
    daemon = start_daemon(params={"engine": "identity"}, ws_ping_interval_s=0.5, ws_ping_timeout_s=0.5)
    ghost = StalledViewer(daemon.port, "?session=ghost")  # never reads, never answers a ping, never closes
    try:
        assert wait_for(lambda: daemon.registry.get("ghost") is not None, timeout=5)
        started = time.monotonic()
        assert wait_for(lambda: daemon.registry.get("ghost") is None, timeout=10)
        dropped_after = time.monotonic() - started
    finally:
        ghost.close()
    assert dropped_after < 10  # ping interval + timeout is 1 s; the bound is 10x looser
    assert daemon.stats.connections == 0


def test_port_in_use_is_refused_with_a_clear_message():
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = subprocess.run([sys.executable, "-m", "sdbridge.cli", "serve", "--port", str(port),
                                 "--osc-port", str(free_port(socket.SOCK_DGRAM))], capture_output=True, text=True,
                                timeout=60, cwd=ROOT)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stderr


def test_osc_port_in_use_is_refused_with_a_clear_message():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        result = subprocess.run([sys.executable, "-m", "sdbridge.cli", "serve", "--port", str(free_port()),
                                 "--osc-port", str(busy.getsockname()[1])], capture_output=True, text=True,
                                timeout=60, cwd=ROOT)
    assert result.returncode == 2 and "cannot listen for OSC" in result.stderr
    assert "Traceback" not in result.stderr


def test_osc_listens_by_the_time_http_answers(start_daemon, monkeypatch):
    """A controller waits for /health, then sends its OSC at once: the OSC port was bound some ms after HTTP first
    answered, and those first datagrams were lost (stop 28's note). The bind is slowed here so that the order shows
    every time, not in a window of milliseconds."""
    from sdbridge.bridge.osc import OscServer

    bind = OscServer.start

    async def slow_bind(self, host: str, port: int) -> None:
        await asyncio.sleep(1.5)
        await bind(self, host, port)

    monkeypatch.setattr(OscServer, "start", slow_bind)
    port, osc_port = free_port(), free_port(socket.SOCK_DGRAM)
    starting = threading.Thread(target=start_daemon, kwargs={"params": {"engine": "identity"}, "port": port,
                                                             "osc_port": osc_port})
    starting.start()
    try:
        deadline = time.monotonic() + 60
        while not _healthy(port):
            assert time.monotonic() < deadline
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as controller:
            controller.sendto(b"/sd/strength\x00\x00\x00\x00,f\x00\x00" + struct.pack(">f", 0.25),
                              ("127.0.0.1", osc_port))  # once, as soon as /health answers, as a controller does
        assert wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/params", trust_env=False, timeout=5)
                        .json()["values"]["strength"] == 0.25, timeout=10)
    finally:
        starting.join(timeout=60)


def test_sigterm_drains_and_exits_cleanly(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sdbridge.cli", "serve", "--port", str(port), "--osc-port",
                                str(free_port(socket.SOCK_DGRAM)), "--engine", "identity"], cwd=tmp_path,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: _healthy(port), timeout=60)
        with ws_connect(type("D", (), {"port": port})()) as ws:  # a live client while the daemon stops
            ws.send(codec.encode_png(make_image()))
            recv_frame(ws)
            started = time.monotonic()
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
            elapsed = time.monotonic() - started
    finally:
        if process.poll() is None:
            process.kill()
    output = process.stdout.read()
    assert process.returncode == 0, output
    assert "sdbridge stopped" in output
    assert elapsed < 20  # the target is 2 s (benchmarks/RESULTS.md); tests hold bounds 10x looser


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False, timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def refusing_daemon(start_daemon, monkeypatch, refusal: Exception):
    """An identity daemon whose engine's prepare raises ``refusal`` while the prompt is "poison"."""
    from sdbridge.engines.identity import IdentityEngine

    def picky(self, params):
        if params["prompt"] == "poison":
            raise refusal
        self.resolution = (int(params["width"]), int(params["height"]))

    monkeypatch.setattr(IdentityEngine, "prepare", picky)
    return start_daemon(params={"engine": "identity", "width": 64, "height": 64})


def send_poisoned_frame(ws, frame: bytes) -> list[dict]:
    """Set the poison prompt and send a frame: the error messages before its reply, which passed through."""
    errors = []
    ws.send(json.dumps({"type": "set", "params": {"prompt": "poison"}}))
    ws.send(frame)
    while isinstance(message := ws.recv(timeout=10), str):
        errors += [m for m in [json.loads(message)] if m["type"] == "error"]
    assert message[:3] == b"\xff\xd8\xff"  # passed through
    return errors


def test_engine_refusing_new_parameters_keeps_the_stream_going(start_daemon, monkeypatch):
    daemon = refusing_daemon(start_daemon, monkeypatch, ValueError("cannot encode this prompt"))
    frame = codec.encode_png(make_image())
    with ws_connect(daemon) as ws:
        errors = send_poisoned_frame(ws, frame)
        ws.send(json.dumps({"type": "set", "params": {"prompt": "fine"}}))
        ws.send(frame)
        assert recv_frame(ws)[:3] == b"\xff\xd8\xff"
    assert len(errors) == 1 and "cannot encode this prompt" in errors[0]["message"]
    assert daemon.collect_stats()["worker"]["engine_errors"] == 1


def test_a_client_mistake_the_engine_refuses_is_told_in_its_own_words_and_is_no_engine_error(start_daemon,
                                                                                          monkeypatch):
    """QA 5: a schedule the sampler cannot run (a ParamError at prepare) was told as "...: ParamError: ..." and
    counted in /stats as an engine error, though no frame failed."""
    from sdbridge.errors import ParamError

    daemon = refusing_daemon(start_daemon, monkeypatch, ParamError(
        "schedule '1@2' needs a sampler that takes explicit timesteps", name="schedule"))
    with ws_connect(daemon) as ws:
        errors = send_poisoned_frame(ws, codec.encode_png(make_image()))
    assert len(errors) == 1 and errors[0]["code"] == "bad_param"
    assert errors[0]["message"] == ("the engine could not take the new parameters: schedule '1@2' needs a sampler "
                                    "that takes explicit timesteps; frames pass through")
    assert daemon.collect_stats()["worker"]["engine_errors"] == 0


def test_a_stop_that_outlasts_the_frame_being_made_says_so(monkeypatch, caplog, tmp_path):
    """SIGTERM waits for the frame being made; one longer than the wait (a CPU at many steps) is left, and the
    log says why the stop took that long (it was a silent 10 s gap)."""
    import logging
    import threading

    from sdbridge.bridge import server
    from sdbridge.config import Settings
    from sdbridge.engines.identity import IdentityEngine

    monkeypatch.setattr(server, "WORKER_STOP_WAIT_S", 0.2)
    in_frame, release = threading.Event(), threading.Event()
    step = IdentityEngine.step

    def long_step(self, frames, states):
        in_frame.set()
        release.wait(10)
        return step(self, frames, states)

    monkeypatch.setattr(IdentityEngine, "step", long_step)
    settings = Settings(port=0, osc_port=0, oscquery_port=-1, feedback_port=0, presets_dir=str(tmp_path))
    settings.params = {"engine": "identity"}
    thread = server.DaemonThread(settings)
    daemon = thread.start()
    try:
        with ws_connect(daemon) as ws:
            ws.send(codec.encode_jpeg(make_image(64, 64)))
            assert in_frame.wait(10)
        with caplog.at_level(logging.WARNING, logger="sdbridge.bridge.server"):
            started = time.monotonic()
            thread.stop()
            took = time.monotonic() - started
    finally:
        release.set()
        thread.stop()
    assert took < 8
    assert "still making a frame after 0 s: stopping without it" in caplog.text


def test_a_console_that_takes_no_writes_does_not_stop_the_daemon(tmp_path):
    """QA 44 F15: on Windows a click in the console window (QuickEdit) holds every write to it; the event loop
    wrote its log lines itself, so HTTP, WebSocket and OSC stopped with it. Here stderr is a pipe nobody reads
    (64 KB, filled by the lines of 400 connections), Linux's stand-in for that console."""
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sdbridge.cli", "serve", "--port", str(port), "--osc-port",
                                str(free_port(socket.SOCK_DGRAM)), "--oscquery-port", "-1", "--engine", "identity",
                                "--log-level", "debug"], cwd=tmp_path, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE)
    try:
        assert wait_for(lambda: _healthy(port), timeout=60)
        for _ in range(400):
            with ws_connect(type("D", (), {"port": port})()):
                pass
        started = time.monotonic()
        answer = httpx.get(f"http://127.0.0.1:{port}/health", trust_env=False, timeout=20)
        assert answer.status_code == 200 and time.monotonic() - started < 10
        process.send_signal(signal.SIGINT)
        # Still unread: it stops all the same (QA 46 F1: it waited for the console without end, and a launcher's
        # terminate(); wait() hung), leaving what the console never took.
        assert process.wait(timeout=60) == 0
        output = process.stderr.read().decode()
    finally:
        if process.poll() is None:
            process.kill()
    assert len(re.findall(r"session \S+ opened", output)) >= 100  # the lines the pipe took
