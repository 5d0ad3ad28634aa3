"""The WHIP/WHEP hub (sdbridge/bridge/webrtc.py) apart from aiortc: what it tells and counts."""

from __future__ import annotations

import logging

from sdbridge.bridge.session import SessionRegistry
from sdbridge.bridge.webrtc import WebRtcHub
from sdbridge.bridge.webrtc_sdp import parse_ice_server


def test_an_answer_that_waited_for_an_ice_server_is_told_once_and_counted(caplog):
    """A STUN server that does not answer holds every answer ~5 s (aioice's timeout): the first such answer logs a
    warning naming the servers, /stats counts them all; without ICE servers a slow answer is no such sign."""
    hub = WebRtcHub(SessionRegistry(), ice_servers=[parse_ice_server("stun:10.255.255.1")])
    with caplog.at_level(logging.WARNING, logger="sdbridge.bridge.webrtc"):
        for seconds in (0.4, 5.2, 5.1):
            hub._note_gathering(seconds)
    assert hub.stats()["slow_answers"] == 2
    [record] = caplog.records
    assert "waited 5.2 s" in record.message and "stun:10.255.255.1:3478" in record.message
    quiet = WebRtcHub(SessionRegistry())
    quiet._note_gathering(9.0)
    assert quiet.stats()["slow_answers"] == 0
