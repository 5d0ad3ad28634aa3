"""OSC against an implementation that is not ours: Debian's liblo-tools (oscsend, oscdump)."""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import time

import pytest

from tests.clients import wait_for

pytestmark = pytest.mark.skipif(shutil.which("oscsend") is None or shutil.which("oscdump") is None,
                                reason="liblo-tools is not installed (make test-deps)")


def oscsend(port: int, address: str, types: str, *values: str) -> None:
    subprocess.run(["oscsend", "127.0.0.1", str(port), address, types, *values], check=True, timeout=10)


def test_oscsend_sets_every_kind_of_parameter(start_daemon):
    daemon = start_daemon(params={"engine": "identity"})
    oscsend(daemon.osc_port, "/sd/prompt", "s", "a cat made of liblo")
    oscsend(daemon.osc_port, "/sd/strength", "f", "0.1")
    oscsend(daemon.osc_port, "/sd/steps", "i", "4")
    oscsend(daemon.osc_port, "/sd/seed", "h", "4294967295")
    oscsend(daemon.osc_port, "/sd/norm/guidance", "f", "0.5")
    assert wait_for(lambda: daemon.store.get("guidance") == pytest.approx(15.0, abs=1e-3))
    assert daemon.store.get("prompt") == "a cat made of liblo"
    assert daemon.store.get("strength") == pytest.approx(0.1, abs=1e-6)  # float32 on the wire
    assert daemon.store.get("steps") == 4
    assert daemon.store.get("seed") == 4294967295
    # Several samples in one message (an OSC Out CHOP on Format: Time Slice): the newest one.
    oscsend(daemon.osc_port, "/sd/strength", "fff", "0.2", "0.3", "0.4")
    assert wait_for(lambda: daemon.store.get("strength") == pytest.approx(0.4, abs=1e-6))


def test_oscdump_receives_feedback_and_telemetry(start_daemon):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dump = subprocess.Popen(["oscdump", "-L", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
        time.sleep(0.3)
        daemon = start_daemon(params={"engine": "identity"}, feedback_port=port, telemetry_hz=20.0)
        oscsend(daemon.osc_port, "/sd/strength", "f", "0.75")
        time.sleep(1.0)
    finally:
        dump.send_signal(signal.SIGTERM)
        output, _ = dump.communicate(timeout=10)
    assert "/sd/status/fps f" in output
    assert "/sd/status/engine s" in output
    assert "/sd/strength f 0.75" in output
