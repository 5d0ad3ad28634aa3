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
    assert finding.level == OFF and "501" in finding.message and "pip install 'sdbridge[webrtc]'" in finding.fix
    assert str(finding).startswith("[ off ] webrtc: aiortc is not installed")
