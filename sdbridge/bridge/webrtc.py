"""WebRTC in and out: WHIP ingest (RFC 9725) and WHEP viewers, through aiortc (docs/webrtc.md).

- ``POST /whip/{session}`` with an SDP offer: the peer's video feeds the session's latest-frame slot as an
  ``--input`` does (a raw RGB InputFrame through :meth:`Session.put_frame`); the answer (201, every ICE
  candidate in it: no trickle) names the resource to ``DELETE`` in its ``Location``.
- ``POST /whep/{session}``: a viewer; its video is the session's output frames, the same raw RGB frames the
  worker hands to the ``--output`` s (:meth:`WebRtcHub.tap`), each viewer behind a newest-frame slot of its own.

The routes sit behind the daemon's access middleware (Host, Origin, token) like every HTTP route; a WHIP
client sends the token as ``Authorization: Bearer``. aiortc is optional (``pip install "sdbridge[webrtc]"``):
without it an offer is answered 501. Peers are capped (503 past :data:`MAX_PEERS`), and one that fails ICE,
closes or never connects is cleaned up, its session released as a WebSocket close releases it.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect

from sdbridge.bridge.protocol import PixelFormat
from sdbridge.bridge.session import Session, SessionRegistry, Viewer
from sdbridge.bridge.webrtc_sdp import (MAX_SDP_BYTES, RESOURCE_ID, SDP_CONTENT_TYPE, IceServer, WebRtcError,
                                        check_content_type, check_offer, check_session_name, resource_path)
from sdbridge.inputs.hub import input_frame

if TYPE_CHECKING:
    from sdbridge.bridge.server import Daemon

log = logging.getLogger(__name__)

MAX_PEERS = 16           # WHIP and WHEP together: each costs a VP8/H.264 encoder or decoder thread
CONNECT_TIMEOUT_S = 30.0  # a peer that has not connected by then (a client gone after its POST) is ended
SETUP_TIMEOUT_S = 20.0    # offer to answer: host candidates only, normally well under a second
SLOW_GATHERING_S = 3.0    # an answer's gathering longer than this waited for an ICE server


def load_aiortc() -> Any:
    """The aiortc side (:mod:`sdbridge.bridge.webrtc_peer`), or WebRtcError 501 naming the extra to install."""
    try:
        return importlib.import_module("sdbridge.bridge.webrtc_peer")
    except ImportError as exc:
        raise WebRtcError(f"WebRTC needs aiortc, which is not installed here ({exc}): "
                          f"pip install \"sdbridge[webrtc]\"", status=501, code="webrtc_unavailable") from None


class WhepViewer(Viewer):
    """A WHEP viewer in its session's ``viewers``: it keeps the session open (and txt2img generating) as a
    WebSocket viewer does. Its frames come raw through the tap, so the encoded replies and JSON are not kept."""

    def offer_frame(self, message: bytes) -> None:
        return

    def offer_control(self, message: dict[str, Any]) -> None:
        return


@dataclass(eq=False)
class Peer:
    role: str                  # "whip" or "whep"
    session: Session
    resource_id: str
    pc: Any                    # aiortc's RTCPeerConnection
    reader: Any = None         # WHIP: its IngestReader
    track: Any = None          # WHEP: its OutputTrack
    viewer: WhepViewer | None = None
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)
    created: float = field(default_factory=time.monotonic)
    ended: bool = False

    @property
    def location(self) -> str:
        return resource_path(self.role, self.session.id, self.resource_id)


class WebRtcHub:
    """Every WHIP and WHEP peer; lives on the daemon's loop, except :meth:`tap` (the worker's codec pool)."""

    def __init__(self, registry: SessionRegistry, max_peers: int = MAX_PEERS,
                 connect_timeout_s: float = CONNECT_TIMEOUT_S, ice_servers: Sequence[IceServer] = ()) -> None:
        self.registry = registry
        self.ice_servers = tuple(ice_servers)
        self.max_peers = max_peers
        self.connect_timeout_s = connect_timeout_s
        self.peers: dict[str, Peer] = {}
        self._opening = 0
        # session id -> its viewers' tracks. Replaced whole, never changed in place, so that the worker's
        # threads read it without a lock.
        self._tracks: dict[str, tuple[Any, ...]] = {}
        # Counters of ended peers, so that totals survive them.
        self.retired = {"frames_in": 0, "frames_out": 0, "dropped": 0, "frames_refused": 0}
        self.refused = 0
        self.slow_answers = 0
        self.closed = False

    # --- the worker's side --------------------------------------------------------------------

    def tap(self, session_id: str, frame: np.ndarray) -> None:
        """Any thread: one output frame, uint8 RGB ``[H, W, 3]``, to the session's WHEP viewers; never waits."""
        tracks = self._tracks.get(session_id)
        if tracks:
            for track in tracks:
                track.offer(frame)

    # --- peers ----------------------------------------------------------------------------------

    async def open(self, role: str, session_name: str, offer: bytes) -> tuple[str, str]:
        """Answer a WHIP (``role`` "whip") or WHEP offer: (the answer's SDP, its resource's path)."""
        check_session_name(session_name)
        sections = check_offer(offer, role)
        peer_module = await asyncio.to_thread(load_aiortc)  # the first import (aiortc, PyAV) takes ~0.5 s
        if self.closed:
            raise WebRtcError("the daemon is stopping", status=503, code="stopping")
        if len(self.peers) + self._opening >= self.max_peers:
            self.refused += 1
            raise WebRtcError(f"{len(self.peers) + self._opening} WebRTC peers already connected, at most "
                              f"{self.max_peers}: DELETE one first", status=503, code="too_many_peers")
        if not any(section.candidates for section in sections):
            log.info("%s offer for %s carries no ICE candidate: the peer must reach ours", role, session_name)
        self._opening += 1
        try:
            peer = await self._start(peer_module, role, session_name, offer.decode("utf-8"))
        finally:
            self._opening -= 1
        if self.closed or peer.ended:  # the daemon began stopping (or the peer closed) while the answer was made
            await self._end(peer, "the daemon stopped")
            raise WebRtcError("the daemon is stopping", status=503, code="stopping")
        if role == "whip":
            # One sender per session: a newer one (OBS reconnecting before ICE told us the old one is gone)
            # replaces the older, which would otherwise flicker with it in the slot.
            for other in [p for p in self.peers.values() if p.role == "whip" and p.session is peer.session]:
                log.info("WHIP %s replaces %s on session %s", peer.resource_id, other.resource_id, peer.session.id)
                await self._end(other, "replaced by a newer WHIP sender")
        self.peers[peer.resource_id] = peer
        peer.tasks.append(asyncio.create_task(self._watch_connect(peer), name="sdbridge-webrtc-connect"))
        log.info("%s peer %s on session %s", role.upper(), peer.resource_id, peer.session.id)
        return peer.pc.localDescription.sdp, peer.location

    async def _start(self, peer_module: Any, role: str, session_name: str, offer_sdp: str) -> Peer:
        loop = asyncio.get_running_loop()
        pc = peer_module.new_peer_connection(self.ice_servers)
        session = self.registry.open(session_name)
        peer = Peer(role, session, secrets.token_urlsafe(12), pc)
        if role == "whip":
            session.senders += 1
        else:
            peer.viewer = WhepViewer(name=f"{session.id}/whep-{peer.resource_id}")
            session.viewers.add(peer.viewer)

        @pc.on("connectionstatechange")
        async def on_state() -> None:
            log.debug("%s peer %s: %s", role.upper(), peer.resource_id, pc.connectionState)
            if pc.connectionState in ("failed", "closed"):
                await self._end(peer, f"connection {pc.connectionState}")

        try:
            await asyncio.wait_for(pc.setRemoteDescription(peer_module.RTCSessionDescription(offer_sdp, "offer")),
                                   SETUP_TIMEOUT_S)
            if role == "whep":
                peer.track = peer_module.OutputTrack(loop)
            kept = peer_module.keep_only_video(pc, "recvonly" if role == "whip" else "sendonly", peer.track)
            if kept is None:
                raise ValueError("no video section aiortc can use goes the right way")
            videos = sum(1 for transceiver in pc.getTransceivers() if transceiver.kind == "video")
            if videos > 1:
                log.info("%s offer for %s has %d video sections: the daemon takes the first, the other %d are "
                         "answered inactive (one camera per session)", role.upper(), session_name, videos, videos - 1)
            if role == "whip":
                # Only the kept section's track is read; the others get no receiver, so nothing of theirs queues.
                peer.reader = peer_module.IngestReader(kept.receiver.track,
                                                       lambda image: _put(session, image, peer.reader),
                                                       name=f"WHIP {peer.resource_id} on session {session.id}")
                peer.tasks.append(asyncio.create_task(peer.reader.run(), name="sdbridge-whip-read"))
            gathering = time.monotonic()
            await asyncio.wait_for(pc.setLocalDescription(await pc.createAnswer()), SETUP_TIMEOUT_S)
            self._note_gathering(time.monotonic() - gathering)
        except Exception as exc:
            log.info("%s offer for %s not answered: %r", role.upper(), session_name, exc,
                     exc_info=log.isEnabledFor(logging.DEBUG))
            await self._end(peer, "no answer")
            if isinstance(exc, asyncio.TimeoutError):
                raise WebRtcError(f"no answer within {SETUP_TIMEOUT_S:.0f} s (ICE gathering)", status=500,
                                  code="webrtc_failed") from None
            # aiortc's own sentence: a malformed line, no codec in common ("VP8 or H.264" is what it offers).
            raise WebRtcError(f"the offer cannot be answered: {str(exc)[:200] or type(exc).__name__} "
                              f"(video codecs here: VP8, H.264)", code="bad_sdp") from None
        if peer.track is not None:
            self._tracks = {**self._tracks, session.id: (*self._tracks.get(session.id, ()), peer.track)}
        return peer

    def _note_gathering(self, seconds: float) -> None:
        """An answer that waited for an ICE server (a STUN server that does not answer holds each one ~5 s): told
        once in the log, counted in /stats, so that a slow WHIP start has a reason (QA 7)."""
        if seconds < SLOW_GATHERING_S or not self.ice_servers:
            return
        self.slow_answers += 1
        if self.slow_answers == 1:
            log.warning("a WebRTC answer waited %.1f s for its ICE candidates: an --ice-server (%s) does not answer; "
                        "`sdbridge doctor` tries each", seconds, ", ".join(str(server) for server in self.ice_servers))

    async def _watch_connect(self, peer: Peer) -> None:
        await asyncio.sleep(self.connect_timeout_s)
        if not peer.ended and peer.pc.connectionState != "connected":
            log.info("%s peer %s did not connect within %.0f s", peer.role.upper(), peer.resource_id,
                     self.connect_timeout_s)
            await self._end(peer, "no connection")

    async def end(self, role: str, session_name: str, resource_id: str) -> None:
        """``DELETE``: end a peer; WebRtcError 404 when there is no such resource."""
        peer = self.peers.get(resource_id) if RESOURCE_ID.fullmatch(resource_id) else None
        if peer is None or peer.role != role or peer.session.id != session_name:
            raise WebRtcError(f"no {role.upper()} resource {resource_path(role, session_name, resource_id)[:200]!r} "
                              f"(ended, or never created here)", status=404, code="unknown_resource")
        await self._end(peer, "deleted by the client")

    async def _end(self, peer: Peer, reason: str) -> None:
        """Close a peer and give its session back; once per peer, whoever comes first (DELETE, ICE, stop)."""
        if peer.ended:
            return
        peer.ended = True
        if self.peers.get(peer.resource_id) is peer:
            del self.peers[peer.resource_id]
        session = peer.session
        if peer.track is not None:
            tracks = tuple(t for t in self._tracks.get(session.id, ()) if t is not peer.track)
            self._tracks = {k: v for k, v in self._tracks.items() if k != session.id}
            if tracks:
                self._tracks[session.id] = tracks
            self.retired["frames_out"] += peer.track.sent
            self.retired["dropped"] += peer.track.dropped
        if peer.reader is not None:
            self.retired["frames_in"] += peer.reader.frames
            self.retired["dropped"] += peer.reader.dropped
            self.retired["frames_refused"] += sum(peer.reader.refused.values())
        current = asyncio.current_task()
        for task in peer.tasks:
            if task is not current:
                task.cancel()
        await peer.pc.close()
        if peer.role == "whip":
            session.senders -= 1
        elif peer.viewer is not None:
            session.viewers.discard(peer.viewer)
        self.registry.release(session)
        log.info("%s peer %s on session %s ended: %s", peer.role.upper(), peer.resource_id, session.id, reason)

    async def close(self) -> None:
        """Daemon stop: every peer closed, no new one."""
        self.closed = True
        await asyncio.gather(*(self._end(peer, "the daemon stopped") for peer in list(self.peers.values())),
                             return_exceptions=True)

    # --- stats ------------------------------------------------------------------------------------

    @property
    def frames_in(self) -> int:
        return self.retired["frames_in"] + sum(p.reader.frames for p in self.peers.values() if p.reader is not None)

    def stats(self) -> dict[str, Any]:
        peers = list(self.peers.values())
        return {
            "peers": len(peers),
            "max_peers": self.max_peers,
            "whip": sum(1 for p in peers if p.role == "whip"),
            "whep": sum(1 for p in peers if p.role == "whep"),
            "frames_in": self.frames_in,
            "frames_out": self.retired["frames_out"] + sum(p.track.sent for p in peers if p.track is not None),
            # WHIP frames a newer one replaced before conversion, WHEP frames a newer one replaced before sending.
            "dropped": self.retired["dropped"] + sum(p.reader.dropped for p in peers if p.reader is not None)
            + sum(p.track.dropped for p in peers if p.track is not None),
            # WHIP frames a session cannot take (over 8192 pixels a side) or that failed to convert: dropped.
            "frames_refused": self.retired["frames_refused"]
            + sum(sum(p.reader.refused.values()) for p in peers if p.reader is not None),
            "refused": self.refused,
            "ice_servers": [str(server) for server in self.ice_servers],  # never the TURN password
            "slow_answers": self.slow_answers,
            "connections": [{"role": p.role, "session": p.session.id, "id": p.resource_id,
                             "state": p.pc.connectionState, "age_s": round(time.monotonic() - p.created, 1)}
                            for p in peers],
        }


def _put(session: Session, image: np.ndarray, reader: Any) -> None:
    """Executor thread: a WHIP frame into the session's slot, as an ``--input``'s frame goes in."""
    session.put_frame(input_frame(image, reader.frames + 1, 0, PixelFormat.JPEG))


async def read_sdp_body(request: Request, limit: int = MAX_SDP_BYTES) -> bytes:
    """The body, or WebRtcError 413 past ``limit`` bytes (told by Content-Length or counted as it comes)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise WebRtcError(f"SDP body of {int(declared)} bytes is too large (at most {limit})", status=413,
                          code="too_large")
    body = bytearray()
    try:
        async for chunk in request.stream():
            body += chunk
            if len(body) > limit:
                raise WebRtcError(f"SDP body of more than {limit} bytes is too large", status=413, code="too_large")
    except ClientDisconnect:
        raise WebRtcError("the client disconnected before the SDP body ended", code="bad_sdp") from None
    return bytes(body)


def _refuse(exc: WebRtcError) -> JSONResponse:
    # The body http.error_response sends (http.py imports this module, so it is not imported back).
    return JSONResponse(exc.to_json(), status_code=exc.status, headers={"Allow": exc.allow} if exc.allow else None)


def create_webrtc_router(daemon: Daemon) -> APIRouter:
    """The WHIP and WHEP routes, kept out of the OpenAPI schema: their bodies are SDP, not JSON."""
    router = APIRouter(include_in_schema=False)
    hub: WebRtcHub = daemon.webrtc

    async def post(role: str, session: str, request: Request) -> Response:
        try:
            check_content_type(request.headers.get("content-type"))
            answer_sdp, location = await hub.open(role, session, await read_sdp_body(request))
        except WebRtcError as exc:
            return _refuse(exc)
        return Response(answer_sdp, status_code=201, media_type=SDP_CONTENT_TYPE, headers={"Location": location})

    async def delete(role: str, session: str, resource_id: str) -> Response:
        try:
            await hub.end(role, session, resource_id)
        except WebRtcError as exc:
            return _refuse(exc)
        return Response(status_code=200)

    def no_trickle() -> JSONResponse:
        return _refuse(WebRtcError(
            "trickle ICE and ICE restarts (PATCH) are not supported: the answer carries every candidate; "
            "send the offer once ICE gathering is complete", status=405, code="no_trickle", allow="DELETE"))

    @router.get("/webrtc", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        """A small page that sends the camera through WHIP and watches the output through WHEP."""
        return HTMLResponse(resources.files("sdbridge.bridge").joinpath("static/webrtc.html").read_text("utf-8"))

    @router.post("/whip/{session}")
    async def whip(session: str, request: Request) -> Response:
        """WHIP ingest: the offer's video feeds the session (RFC 9725)."""
        return await post("whip", session, request)

    @router.post("/whep/{session}")
    async def whep(session: str, request: Request) -> Response:
        """WHEP viewer: the answer's video is the session's output."""
        return await post("whep", session, request)

    @router.delete("/whip/{session}/{resource_id}")
    async def whip_end(session: str, resource_id: str) -> Response:
        return await delete("whip", session, resource_id)

    @router.delete("/whep/{session}/{resource_id}")
    async def whep_end(session: str, resource_id: str) -> Response:
        return await delete("whep", session, resource_id)

    @router.patch("/whip/{session}/{resource_id}")
    async def whip_patch(session: str, resource_id: str) -> JSONResponse:
        return no_trickle()

    @router.patch("/whep/{session}/{resource_id}")
    async def whep_patch(session: str, resource_id: str) -> JSONResponse:
        return no_trickle()

    # Last: any other method or path under /whip and /whep gets the error body the routes above give (FastAPI's
    # own 404 and 405 are {"detail": ...}; QA 6).
    @router.api_route("/whip/{rest:path}", methods=OTHER_METHODS)
    @router.api_route("/whep/{rest:path}", methods=OTHER_METHODS)
    async def elsewhere(request: Request, rest: str) -> JSONResponse:
        return _refuse(elsewhere_error(request.method, request.url.path))

    return router


OTHER_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def elsewhere_error(method: str, path: str) -> WebRtcError:
    """A request under /whip or /whep that no route takes: 405 naming what the path allows, or 404."""
    role, _, rest = path.strip("/").partition("/")
    parts = rest.split("/") if rest else []
    form = f"POST /{role}/NAME with an SDP offer; DELETE /{role}/NAME/ID ends it"
    allowed = "POST" if len(parts) == 1 else "DELETE, PATCH" if len(parts) == 2 and all(parts) else None
    if allowed is None or not all(parts):
        return WebRtcError(f"nothing at {path[:120]!r}: {form}", status=404, code="not_found")
    return WebRtcError(f"{method} {path[:120]!r} is not answered: it takes {allowed} ({form})", status=405,
                       code="method_not_allowed", allow=allowed)
