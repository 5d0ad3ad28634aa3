"""WHIP / WHEP request checks, sans I/O: content type, body size, the offer's media sections; and the
``--ice-server`` URLs (STUN/TURN) the peers gather through.

What :mod:`sdbridge.bridge.webrtc` refuses before aiortc sees a byte (RFC 9725 for WHIP; WHEP follows it
for viewers). Only the few SDP lines the checks need are read (``m=``, the direction attributes); aiortc
parses the whole offer. No sockets, asyncio or aiortc here; every refusal is a :class:`WebRtcError` with
the HTTP status it is answered with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from sdbridge.bridge.protocol import SESSION_NAME, SESSION_NAME_RULE
from sdbridge.errors import SdbridgeError

SDP_CONTENT_TYPE = "application/sdp"
# A browser's or OBS's offer is 3-10 KB (each codec is a few lines, each candidate one line); 64 KiB leaves
# room for many interfaces and stops a client from making the daemon hold any size in memory.
MAX_SDP_BYTES = 64 * 1024
# aiortc answers an offer's sections on the daemon's one event loop, ~3 ms each: 560 of them in 64 KiB held every
# client 1.8 s (QA 74 F6). The daemon takes one video section; OBS and browsers offer 2 (audio and video), 3 with a
# data channel: 8 leaves room for a client that offers more and is answered inactive for them.
MAX_MEDIA_SECTIONS = 8
DIRECTIONS = ("sendrecv", "sendonly", "recvonly", "inactive")
_SESSION = re.compile(rf"^{SESSION_NAME}$")
RESOURCE_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class WebRtcError(SdbridgeError):
    """A WHIP/WHEP request refused; ``status`` is the HTTP status it gets."""

    code = "bad_webrtc"

    def __init__(self, message: str, *, status: int = 400, code: str | None = None, allow: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.allow = allow  # a 405's Allow header


@dataclass(frozen=True)
class MediaSection:
    """One ``m=`` section of an offer: what the checks need of it."""

    kind: str         # "video", "audio", "application", ...
    port: int         # 0: the section is rejected or disabled
    direction: str    # the offerer's, "sendrecv" when the section does not say
    candidates: int   # a=candidate lines in it


def check_content_type(value: str | None) -> None:
    """415 unless the request says ``application/sdp`` (parameters such as a charset are allowed)."""
    media_type = (value or "").split(";", 1)[0].strip().lower()
    if media_type != SDP_CONTENT_TYPE:
        shown = repr(value[:80]) if value else "none"
        raise WebRtcError(f"Content-Type {shown} is not {SDP_CONTENT_TYPE}: send the SDP offer as the body",
                          status=415, code="unsupported_media_type")


def check_session_name(name: str) -> None:
    if not _SESSION.fullmatch(name):
        raise WebRtcError(f"session name {name[:80]!r} must be {SESSION_NAME_RULE}", code="bad_session")


def parse_offer(body: bytes) -> list[MediaSection]:
    """The offer's media sections, or WebRtcError 400 for a body that is not an SDP offer."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebRtcError(f"the body is not an SDP offer: byte {exc.start} is not UTF-8 text", code="bad_sdp") from None
    lines = [line.rstrip("\r") for line in text.split("\n") if line.strip()]
    if not lines or lines[0] != "v=0":
        first = lines[0][:40] if lines else "nothing"
        raise WebRtcError(f"the body is not an SDP offer: it starts with {first!r}, not 'v=0'", code="bad_sdp")
    count = sum(1 for line in lines if line.startswith("m="))
    if count > MAX_MEDIA_SECTIONS:
        raise WebRtcError(f"the offer has {count} media sections (m= lines), at most {MAX_MEDIA_SECTIONS}: "
                          f"offer one video track (and audio, which is answered inactive)", code="too_many_media")
    sections: list[MediaSection] = []
    session_direction = "sendrecv"
    current: dict[str, object] | None = None
    for line in lines[1:]:
        if line.startswith("m="):
            if current is not None:
                sections.append(MediaSection(**current))  # type: ignore[arg-type]
            fields = line[2:].split()
            port = fields[1].split("/")[0] if len(fields) >= 3 else ""
            # ASCII digits only: '²' passes str.isdigit() and int() refuses it, a 500 (QA 74 F4).
            if not (port.isascii() and port.isdigit()):
                raise WebRtcError(f"the offer's media line {line[:80]!r} is not 'm=KIND PORT PROTO FORMATS'",
                                  code="bad_sdp")
            current = {"kind": fields[0], "port": int(port), "direction": session_direction, "candidates": 0}
        elif line.startswith("a="):
            attribute = line[2:].split(":", 1)[0]
            if attribute in DIRECTIONS:
                if current is None:
                    session_direction = attribute
                else:
                    current["direction"] = attribute
            elif attribute == "candidate" and current is not None:
                current["candidates"] = int(current["candidates"]) + 1  # type: ignore[call-overload]
    if current is not None:
        sections.append(MediaSection(**current))  # type: ignore[arg-type]
    return sections


def check_offer(body: bytes, role: str) -> list[MediaSection]:
    """An offer's sections, checked for ``role``: "whip" needs a video section the client sends on,
    "whep" one it receives on. WebRtcError 400 names what is missing."""
    assert role in ("whip", "whep")
    sections = parse_offer(body)
    videos = [section for section in sections if section.kind == "video" and section.port != 0]
    if not videos:
        kinds = ", ".join(section.kind for section in sections) or "no media section"
        raise WebRtcError(f"the offer has no video m-line (it has {kinds}): offer a video track", code="bad_sdp")
    wanted = ("sendonly", "sendrecv") if role == "whip" else ("recvonly", "sendrecv")
    if not any(section.direction in wanted for section in videos):
        verb = "send video to" if role == "whip" else "receive video from"
        directions = ", ".join(section.direction for section in videos)
        raise WebRtcError(f"the offer's video is {directions}: a {role.upper()} client must {verb} the daemon "
                          f"({' or '.join(wanted)})", code="bad_sdp")
    return sections


def resource_path(role: str, session: str, resource_id: str) -> str:
    """The ``Location`` of a WHIP/WHEP resource: what the client DELETEs to end it."""
    return f"/{role}/{session}/{resource_id}"


ICE_SCHEMES = ("stun", "turn", "turns")
ICE_PORTS = {"stun": 3478, "turn": 3478, "turns": 5349}
_ICE_HOST = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.-]{0,252}$")  # aiortc's URL form has no room for IPv6 literals


@dataclass(frozen=True)
class IceServer:
    """One STUN or TURN server as parsed; aiortc's RTCIceServer takes :attr:`url` (no credentials) and the TURN
    user name and password apart (they never go in a log or in /stats)."""

    scheme: str                # stun, turn or turns
    host: str
    port: int
    transport: str = ""        # "" or a TURN server's "udp" / "tcp"
    username: str | None = None
    credential: str | None = None

    @property
    def kind(self) -> str:
        return "stun" if self.scheme == "stun" else "turn"

    @property
    def url(self) -> str:
        return f"{self.scheme}:{self.host}:{self.port}" + (f"?transport={self.transport}" if self.transport else "")

    def __str__(self) -> str:
        return self.url if self.username is None else f"{self.url} (user {self.username!r})"


def parse_ice_server(text: str) -> IceServer:
    """``stun:HOST[:PORT]``, or ``turn:USER:PASSWORD@HOST[:PORT][?transport=udp|tcp]`` (``turns:`` for TLS, over
    TCP): the form webrtc-streamer and others take on a command line. ValueError with a sentence naming the part
    (aiortc would skip a server it cannot use without a word)."""
    shown = repr(text[:120])
    scheme, colon, rest = text.partition(":")
    if not colon or scheme.lower() not in ICE_SCHEMES:
        raise ValueError(f"ICE server {shown} must start with stun:, turn: or turns:")
    scheme = scheme.lower()
    rest, _, query = rest.partition("?")
    if query:
        allowed = {"stun": (), "turn": ("transport=udp", "transport=tcp"), "turns": ("transport=tcp",)}[scheme]
        if query not in allowed:
            takes = " or ".join(allowed) if allowed else "no options"
            raise ValueError(f"ICE server {shown}: ?{query[:40]} is not an option here ({scheme}: takes {takes})")
    username = credential = None
    if "@" in rest:
        user_part, _, rest = rest.rpartition("@")
        username, colon, credential = user_part.partition(":")
        if scheme == "stun":
            raise ValueError(f"ICE server {shown}: a STUN server takes no user name or password")
        if not username or not colon or not credential:
            raise ValueError(f"ICE server {shown}: write the TURN user and password as USER:PASSWORD@HOST")
    elif scheme != "stun":
        raise ValueError(f"ICE server {shown}: a TURN server needs USER:PASSWORD@ before its host")
    host, _, port = rest.partition(":")
    port = port if _ else str(ICE_PORTS[scheme])
    if host.startswith("["):
        raise ValueError(f"ICE server {shown}: aiortc takes no IPv6 address here; give a host name or IPv4 address")
    if not _ICE_HOST.fullmatch(host):
        raise ValueError(f"ICE server {shown}: {host[:80]!r} is not a host name or IPv4 address")
    if not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"ICE server {shown}: port {port[:12]!r} is not in 1-65535")
    return IceServer(scheme, host, int(port), query.removeprefix("transport="), username, credential)


def check_ice_servers(texts: list[str]) -> list[IceServer]:
    """Every ``--ice-server``: at most one STUN and one TURN server, as aiortc uses (it skips the rest)."""
    servers = [parse_ice_server(text) for text in texts]
    for kind in ("stun", "turn"):
        same = [str(server) for server in servers if server.kind == kind]
        if len(same) > 1:
            raise ValueError(f"{len(same)} {kind.upper()} servers given ({', '.join(same)}): aiortc uses one "
                             f"STUN and one TURN server; give one of each at most")
    return servers
