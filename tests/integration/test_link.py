"""Ableton Link with a real peer, in a network namespace of the test's own (Link announces by multicast)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

SCRIPT = textwrap.dedent("""
    import asyncio, json, statistics, time
    from aalink import Link
    from sdbridge.bridge.server import DaemonThread
    from sdbridge.config import Settings

    async def main():
        peer = Link(120.0)
        peer.quantum = 4  # a bar of 4, as Ableton Live sets it: beats agree modulo the quantum
        peer.enabled = True
        settings = Settings(port=0, osc=False, oscquery_port=-1, feedback_port=0, link=True)
        thread = DaemonThread(settings)
        daemon = await asyncio.to_thread(thread.start)
        try:
            deadline = time.monotonic() + 10
            while daemon.link.describe()["peers"] < 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            peer.tempo = 133.0  # the drummer speeds up
            deadline = time.monotonic() + 10
            while abs(float(daemon.store.get("bpm")) - 133.0) > 0.01 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            took_tempo = float(daemon.store.get("bpm"))
            await asyncio.sleep(0.5)
            errors = []
            for _ in range(50):  # the daemon's beat against the peer's, read at the same instant
                ours = daemon.worker.clock.beat(time.monotonic(), 133.0)
                offset = (ours - peer.beat) % 4.0
                errors.append(min(offset, 4.0 - offset))
                await asyncio.sleep(0.02)
            daemon.store.update({"bpm": 100.0})  # as OSC /sd/bpm would
            deadline = time.monotonic() + 10
            while abs(peer.tempo - 100.0) > 0.01 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            print(json.dumps({"took_tempo": took_tempo, "peer_tempo": peer.tempo,
                              "phase_error_max_beats": max(errors),
                              "phase_error_p50_beats": statistics.median(errors),
                              "peers": daemon.link.describe()["peers"]}))
        finally:
            await asyncio.to_thread(thread.stop)

    asyncio.run(main())
""")


def test_link_tempo_both_ways_and_the_shared_beat() -> None:
    pytest.importorskip("aalink")
    unshare = shutil.which("unshare")
    setup = "ip link set lo up && ip link set lo multicast on && ip route add 224.0.0.0/4 dev lo"
    if unshare is None or shutil.which("ip") is None or subprocess.run(
            [unshare, "-n", "sh", "-c", setup], capture_output=True).returncode != 0:
        pytest.skip("needs unshare -n and ip (root) to keep Link's multicast off the network")
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run([unshare, "-n", "sh", "-c", f'{setup} && exec "$0" -c "$1"', sys.executable, SCRIPT],
                            capture_output=True, text=True, timeout=120, cwd=root,
                            env={**os.environ, "PYTHONPATH": str(root)})
    assert result.returncode == 0, result.stderr[-3000:]
    figures = json.loads(result.stdout.strip().splitlines()[-1])
    assert abs(figures["took_tempo"] - 133.0) < 0.01  # a peer's tempo became bpm
    assert abs(figures["peer_tempo"] - 100.0) < 0.01  # bpm set here became the session's tempo
    assert figures["peers"] >= 1
    # The shared beat, modulo the bar: measured 0.00005 beats (20 µs); bound 0.02 beats (9 ms at 133 bpm).
    assert figures["phase_error_max_beats"] < 0.02, figures
