"""``sdbridge doctor``'s WebRTC line (sdbridge/doctor.py: check_webrtc)."""

from __future__ import annotations

import importlib

import pytest

from sdbridge.doctor import OFF, OK, WARN, check_webrtc


def test_with_aiortc_it_names_the_version_and_the_video_codecs() -> None:
    aiortc = pytest.importorskip("aiortc")
    from aioice.ice import get_host_addresses

    [finding] = check_webrtc()
    assert finding.topic == "webrtc" and f"aiortc {aiortc.__version__}" in finding.message
    assert "VP8" in finding.message and "H264" in finding.message and "rtx" not in finding.message
    # Here an interface other than loopback exists (the WebRTC daemon tests need it too), or it says it is missing.
    if get_host_addresses(use_ipv4=True, use_ipv6=True):
        assert finding.level == OK
    else:
        assert finding.level == WARN and "loopback" in finding.message


def test_without_aiortc_it_says_the_routes_answer_501_and_what_to_install() -> None:
    def import_module(name: str) -> object:
        if name == "aiortc":
            raise ImportError("No module named 'aiortc'")
        return importlib.import_module(name)

    [finding] = check_webrtc(import_module)
    # Off, not "ok" (QA 6, finding 13): an optional part missing is neither fine nor a problem.
    assert finding.level == OFF and "501" in finding.message and "pip install \"sdbridge[webrtc]\"" in finding.fix
    assert str(finding).startswith("[ off ] webrtc: aiortc is not installed")


def test_doctor_tries_each_ice_server() -> None:
    """An answering STUN server is OK with the address it sees; a silent one and a name that does not resolve are
    warnings saying what they cost; a TURN server is resolved, not tried."""
    import socket

    pytest.importorskip("aiortc")
    from aioice.ice import get_host_addresses

    from sdbridge.config import Settings
    from sdbridge.doctor import OK, WARN, check_ice_servers
    from tests.integration.test_webrtc_daemon import StunResponder

    assert check_ice_servers(Settings()) == []  # none configured: nothing to say
    host = (get_host_addresses(use_ipv4=True, use_ipv6=False) or ["127.0.0.1"])[0]
    answering = StunResponder(host, ("203.0.113.9", 4242))
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))  # bound, never read: no answer
    try:
        settings = Settings(ice_servers=[f"stun:{host}:{answering.address[1]}", "turn:u:p@127.0.0.1:3478"])
        found = check_ice_servers(settings, timeout_s=2.0)
        assert [f.level for f in found] == [OK, OK], found
        assert "203.0.113.9:4242" in found[0].message and "not tried" in found[1].message
        assert "u:p" not in found[1].message and "'p'" not in found[1].message  # never the password
        for spec, words in ((f"stun:127.0.0.1:{silent.getsockname()[1]}", "did not answer within 0.3 s"),
                            ("stun:nonexistent.invalid", "does not resolve")):
            (finding,) = check_ice_servers(Settings(ice_servers=[spec]), timeout_s=0.3)
            assert finding.level == WARN and words in finding.message, finding
    finally:
        answering.close()
        silent.close()
