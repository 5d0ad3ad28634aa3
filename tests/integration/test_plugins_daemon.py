"""Plugins in the running daemon: a third-party package installed with pip, driven over OSC;
the similarity filter skipping frames; a failing plugin turned off with the stream going on."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from pythonosc.udp_client import SimpleUDPClient

from sdbridge.bridge import codec
from tests.clients import free_port, make_image, recv_frame, ws_connect

ROOT = Path(__file__).resolve().parents[2]


def test_pip_installed_plugin_appears_and_answers_osc(tmp_path):
    target = tmp_path / "site"
    source = shutil.copytree(ROOT / "examples" / "plugin-invert", tmp_path / "plugin-invert")  # builds leave files
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, timeout=300)
    port, osc_port = free_port(), free_port(socket.SOCK_DGRAM)
    env = {**os.environ, "PYTHONPATH": str(target)}
    process = subprocess.Popen([sys.executable, "-m", "sdbridge.cli", "serve", "--port", str(port), "--osc-port",
                                str(osc_port), "--engine", "identity", "--set", "width=64", "--set", "height=64"],
                               cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        http = httpx.Client(base_url=f"http://127.0.0.1:{port}", trust_env=False)
        deadline = time.monotonic() + 60
        while True:
            try:
                params = http.get("/params").json()
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline and process.poll() is None
                time.sleep(0.2)
        names = {spec["name"] for spec in params["schema"]}
        assert {"plugin.invert.enabled", "plugin.invert.amount"} <= names
        osc = SimpleUDPClient("127.0.0.1", osc_port)
        # The HTTP port answers a moment before the OSC port is bound (serve starts HTTP first): a datagram sent in
        # that moment is lost, and a single send then waited out the test's timeout on a loaded machine.
        deadline = time.monotonic() + 60
        while (values := http.get("/params").json()["values"])["plugin.invert.enabled"] is not True or \
                values["plugin.invert.amount"] != 1.0:
            assert time.monotonic() < deadline, values
            osc.send_message("/sd/plugin/invert/enabled", 1.0)
            osc.send_message("/sd/plugin/invert/amount", 1.0)
            time.sleep(0.2)
        image = make_image(64, 64)
        with ws_connect(type("D", (), {"port": port})()) as ws:
            ws.send(codec.encode_png(image))
            out = codec.decode_image(recv_frame(ws))
        assert np.abs(out.astype(int) - (255 - image.astype(int))).mean() < 8  # inverted (through JPEG)
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_similarity_filter_skips_still_frames(start_daemon):
    daemon = start_daemon(params={"engine": "preview", "width": 64, "height": 64,
                                  "plugin.similarity.enabled": True, "plugin.similarity.max_skips": 100})
    frame = codec.encode_png(make_image(64, 64))
    with ws_connect(daemon, "?session=still") as ws:
        for _ in range(10):
            ws.send(frame)
            recv_frame(ws)
        stats = daemon.registry.get("still").stats()
        assert daemon.collect_stats()["frames_skipped"] == 9
    assert stats["frames_out"] == 10 and stats["skipped_frames"] == 9
    deadline = time.monotonic() + 10
    while daemon.registry.get("still") is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    totals = daemon.collect_stats()   # the session closed: its skipped frames stay in the total
    assert totals["frames_skipped"] == 9 and totals["frames_out"] == 10


def test_a_failing_plugin_is_turned_off_and_the_stream_goes_on(start_daemon, monkeypatch):
    from sdbridge.plugins.flow_warp import FlowWarp

    def broken(self, ctx):
        raise RuntimeError("flow exploded")

    monkeypatch.setattr(FlowWarp, "after", broken)
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64, "plugin.flow_warp.enabled": True})
    frame = codec.encode_png(make_image(64, 64))
    messages = []
    with ws_connect(daemon) as ws:
        for _ in range(3):
            ws.send(frame)
            while not isinstance(message := ws.recv(timeout=10), bytes):
                messages.append(json.loads(message))
    failures = [m for m in messages if m.get("code") == "plugin_failed"]
    assert len(failures) == 1 and "flow exploded" in failures[0]["message"]
    assert daemon.plugins.failures == 1


def test_the_feedback_loop_runs_the_engine_on_the_last_output(start_daemon):
    """On the identity engine (output = input), strength 1 and no motion: from the second frame on, the engine runs
    on the last output, so the first frame's picture holds whatever comes in; strength 0 lets the input through."""
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64,
                                  "plugin.feedback_loop.enabled": True, "plugin.feedback_loop.strength": 1.0,
                                  "plugin.feedback_loop.zoom": 1.0})
    first = make_image(64, 64, seed=1)
    second = 255 - first

    def reply(ws, image) -> np.ndarray:
        ws.send(codec.encode_png(image))
        return codec.decode_image(recv_frame(ws))

    with ws_connect(daemon, "?session=loop") as ws:
        out1 = reply(ws, first)
        out2 = reply(ws, second)
        ws.send(json.dumps({"type": "set", "params": {"plugin.feedback_loop.strength": 0.0}}))
        out3 = reply(ws, second)
    assert np.abs(out1.astype(int) - first.astype(int)).mean() < 4      # JPEG's loss only
    assert np.abs(out2.astype(int) - out1.astype(int)).mean() < 4       # the first picture held
    assert np.abs(out2.astype(int) - second.astype(int)).mean() > 20
    assert np.abs(out3.astype(int) - second.astype(int)).mean() < 4     # off: the input again
