"""WHIP/WHEP request checks (sdbridge/bridge/webrtc_sdp.py): literal offers in, sections or refusals out."""

from __future__ import annotations

import re

import pytest

from sdbridge.bridge.webrtc_sdp import (MAX_MEDIA_SECTIONS, MAX_SDP_BYTES, WebRtcError, check_content_type,
                                        check_ice_servers, check_offer, check_session_name, parse_ice_server,
                                        parse_offer, resource_path)

# What OBS's WHIP output offers, cut to the lines that matter: Opus audio and H.264 video, both sendonly.
OBS_OFFER = (
    "v=0\r\no=rtc 1 0 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\na=group:BUNDLE 0 1\r\n"
    "m=audio 9 UDP/TLS/RTP/SAVPF 111\r\nc=IN IP4 0.0.0.0\r\na=mid:0\r\na=sendonly\r\n"
    "a=rtpmap:111 opus/48000/2\r\n"
    "m=video 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\na=mid:1\r\na=sendonly\r\n"
    "a=rtpmap:96 H264/90000\r\na=candidate:1 1 UDP 2122317823 192.168.1.5 50000 typ host\r\n"
    "a=candidate:2 1 UDP 2122317567 10.0.0.5 50001 typ host\r\n"
).encode()
# A browser's WHEP viewer: video it receives, no candidate (it waits for ours).
VIEWER_OFFER = b"v=0\no=- 2 2 IN IP4 0.0.0.0\ns=-\nt=0 0\nm=video 9 UDP/TLS/RTP/SAVPF 96\na=recvonly\n"


def test_an_obs_offer_is_read_section_by_section() -> None:
    audio, video = parse_offer(OBS_OFFER)
    assert (audio.kind, audio.port, audio.direction, audio.candidates) == ("audio", 9, "sendonly", 0)
    assert (video.kind, video.port, video.direction, video.candidates) == ("video", 9, "sendonly", 2)
    assert check_offer(OBS_OFFER, "whip")[1] == video


def test_a_direction_at_session_level_applies_to_sections_that_do_not_say() -> None:
    offer = b"v=0\r\ns=-\r\na=recvonly\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\nm=audio 9 RTP/AVP 0\r\na=inactive\r\n"
    video, audio = parse_offer(offer)
    assert (video.direction, audio.direction) == ("recvonly", "inactive")


def test_whip_needs_video_it_sends_and_whep_video_it_receives() -> None:
    assert check_offer(VIEWER_OFFER, "whep")[0].direction == "recvonly"
    with pytest.raises(WebRtcError, match=r"video is recvonly: a WHIP client must send video to the daemon"):
        check_offer(VIEWER_OFFER, "whip")
    with pytest.raises(WebRtcError, match=r"video is sendonly: a WHEP client must receive video"):
        check_offer(OBS_OFFER, "whep")


@pytest.mark.parametrize(("body", "says"), [
    (b"", "starts with 'nothing'"),
    (b"hello", "starts with 'hello'"),
    (b"v=0\r\n\xff\xfe", "byte 5 is not UTF-8"),
    (b"v=0\r\nm=video\r\n", "'m=video' is not 'm=KIND PORT PROTO FORMATS'"),
    (b"v=0\r\nm=video x UDP 96\r\n", "'m=video x UDP 96'"),
    ("v=0\r\nm=video ² UDP 96\r\n".encode(), "'m=video ² UDP 96'"),  # isdigit() but not int(): was a 500
    ("v=0\r\nm=video ３ UDP 96\r\n".encode(), "'m=video ３ UDP 96'"),  # a port is ASCII digits
    (b"v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\n", "no video m-line (it has audio)"),
    (b"v=0\r\nm=video 0 UDP/TLS/RTP/SAVPF 96\r\n", "no video m-line (it has video)"),  # port 0: rejected
    (b"v=0\r\ns=-\r\n", "no video m-line (it has no media section)"),
])
def test_a_body_that_is_no_usable_offer_is_a_400_naming_why(body: bytes, says: str) -> None:
    with pytest.raises(WebRtcError) as refused:
        check_offer(body, "whip")
    assert refused.value.status == 400 and refused.value.code == "bad_sdp" and says in str(refused.value)


def test_an_offer_with_more_media_sections_than_the_limit_is_a_400_naming_both() -> None:
    """aiortc answers each section on the event loop: 560 of them in 64 KiB held every client 1.8 s (QA 74 F6)."""
    def offer(count: int) -> bytes:
        return ("v=0\r\ns=-\r\n" + "m=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendonly\r\n" * count).encode()

    assert len(check_offer(offer(MAX_MEDIA_SECTIONS), "whip")) == MAX_MEDIA_SECTIONS
    for count in (MAX_MEDIA_SECTIONS + 1, 560):
        with pytest.raises(WebRtcError) as refused:
            check_offer(offer(count), "whip")
        assert refused.value.status == 400 and refused.value.code == "too_many_media"
        assert f"{count} media sections (m= lines), at most {MAX_MEDIA_SECTIONS}" in str(refused.value)
    assert len(offer(560)) < MAX_SDP_BYTES  # the size cap alone let it through
    assert 3 <= MAX_MEDIA_SECTIONS <= 16  # OBS offers 2, a browser with a data channel 3


@pytest.mark.parametrize("value", ["application/sdp", "application/SDP; charset=utf-8", " application/sdp "])
def test_the_sdp_content_type_is_accepted_with_parameters(value: str) -> None:
    check_content_type(value)


@pytest.mark.parametrize(("value", "shown"), [(None, "none"), ("", "none"), ("text/plain", "'text/plain'"),
                                               ("application/json", "'application/json'")])
def test_another_content_type_is_a_415(value: str | None, shown: str) -> None:
    with pytest.raises(WebRtcError) as refused:
        check_content_type(value)
    assert refused.value.status == 415 and f"Content-Type {shown} is not application/sdp" in str(refused.value)


def test_session_names_follow_the_websocket_rule_and_locations_name_the_resource() -> None:
    check_session_name("stage_1.main-2")
    for bad in ("", "a b", "x" * 65, "../etc"):
        with pytest.raises(WebRtcError, match="must be 1-64 of"):
            check_session_name(bad)
    assert resource_path("whip", "stage", "abc") == "/whip/stage/abc"
    assert 4096 < MAX_SDP_BYTES <= 1024 * 1024


@pytest.mark.parametrize("text, url, username, credential", [
    ("stun:stun.l.google.com:19302", "stun:stun.l.google.com:19302", None, None),
    ("STUN:10.0.0.1", "stun:10.0.0.1:3478", None, None),
    ("turn:bob:s3cret@relay.example?transport=tcp", "turn:relay.example:3478?transport=tcp", "bob", "s3cret"),
    ("turns:bob:p@ss:w@relay.example:443", "turns:relay.example:443", "bob", "p@ss:w"),  # @ and : in a password
])
def test_ice_servers_become_aiortc_s_url_and_credentials(text, url, username, credential):
    server = parse_ice_server(text)
    assert (server.url, server.username, server.credential) == (url, username, credential)
    assert credential is None or credential not in str(server)  # what logs and /stats show


@pytest.mark.parametrize("text, words", [
    ("http://relay.example", "must start with stun:, turn: or turns:"),
    ("stun:", "'' is not a host name"),
    ("stun:bad host", "'bad host' is not a host name"),
    ("stun:h:0", "port '0' is not in 1-65535"),
    ("stun:h:３", "port '３' is not in 1-65535"),
    ("stun:u:p@h", "a STUN server takes no user name or password"),
    ("stun:h?transport=udp", "stun: takes no options"),
    ("turn:relay.example", "a TURN server needs USER:PASSWORD@"),
    ("turn::p@relay.example", "USER:PASSWORD@HOST"),
    ("turns:u:p@relay.example?transport=udp", "turns: takes transport=tcp"),  # aiortc would skip it silently
    ("stun:[2001:db8::1]:3478", "aiortc takes no IPv6 address"),
])
def test_an_ice_server_aiortc_cannot_use_is_refused_with_the_part_named(text, words):
    with pytest.raises(ValueError, match=re.escape(words)) as error:
        parse_ice_server(text)
    assert repr(text) in str(error.value)


def test_one_stun_and_one_turn_server_at_most():
    assert [s.kind for s in check_ice_servers(["stun:a.example", "turn:u:p@b.example"])] == ["stun", "turn"]
    with pytest.raises(ValueError, match=r"2 TURN servers given .*\(user 'u'\).*one STUN and one TURN"):
        check_ice_servers(["turn:u:p@a.example", "turns:u:p@b.example"])

