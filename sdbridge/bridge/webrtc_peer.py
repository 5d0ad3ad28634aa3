"""The aiortc side of WHIP / WHEP: one peer connection each, and the tracks between them and the sessions.

Imported only when a WHIP or WHEP request comes (:mod:`sdbridge.bridge.webrtc` turns a missing aiortc into
a 501), so the daemon starts without it. Frames follow the daemon's one rule: the newest wins.

- In (WHIP): :class:`IngestReader` drains the remote track as fast as aiortc decodes it and keeps only the
  newest frame; the conversion to RGB and the copy into an InputFrame run in the default executor, and a
  frame that a newer one replaces first is never converted (counted in ``dropped``).
- Out (WHEP): :class:`OutputTrack` holds the newest output frame the worker offered; aiortc's sender asks
  for one when it is free, so a slow viewer (or its encoder) loses its own frames and never blocks the worker.
"""

from __future__ import annotations

import asyncio
import fractions
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import av
import numpy as np
from aiortc import RTCConfiguration, RTCIceServer, RTCPeerConnection, RTCSessionDescription  # noqa: F401
from aiortc.jitterbuffer import JitterBuffer, JitterFrame
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack
from aiortc.rtp import RtpPacket

from sdbridge.bridge.problem_log import ProblemLog
from sdbridge.bridge.protocol import MAX_DIMENSION
from sdbridge.bridge.webrtc_sdp import IceServer
from sdbridge.inputs.base import InputError

log = logging.getLogger(__name__)

VIDEO_CLOCK_HZ = 90_000  # RTP's video clock (RFC 3551): pts in these units
TIME_BASE = fractions.Fraction(1, VIDEO_CLOCK_HZ)


def new_peer_connection(ice_servers: Sequence[IceServer] = ()) -> RTCPeerConnection:
    """A peer gathering through ``ice_servers`` (``--ice-server``). None given: host candidates only, not
    aiortc's default (Google's public STUN server, which a closed network - a venue's LAN, these machines -
    never answers: every answer would wait for its timeout)."""
    servers = [RTCIceServer(urls=server.url, username=server.username, credential=server.credential)
               for server in ice_servers]
    return RTCPeerConnection(RTCConfiguration(iceServers=servers))


def keep_only_video(pc: RTCPeerConnection, video_direction: str, track: MediaStreamTrack | None = None) -> Any:
    """Before the answer: one video section one way, every other section inactive (OBS offers Opus audio; a
    client may offer two cameras), so no receiver starts for them and no decoded frame queues up unread: aiortc
    decodes every receiving track into an unbounded queue, 13 MB/s of a 640x480 camera nobody reads (QA 74 F3).

    The video kept is the offer's first that goes ``video_direction``'s way: "recvonly" (WHIP) keeps the first
    the client sends on, "sendonly" (WHEP) the first it receives on, and sends ``track`` there. A video receiver
    gets the :class:`MarkerJitterBuffer`. -> the kept transceiver, None when the offer has no such video."""
    # The offer's direction as seen from here (aiortc reverses it); a private field, checked by the tests. Were a
    # release to rename it, the first video is kept, as before QA 74 F3, rather than every section made inactive.
    wanted = ("recvonly", "sendrecv", None) if video_direction == "recvonly" else ("sendonly", "sendrecv", None)
    kept = None
    for transceiver in pc.getTransceivers():
        if (kept is None and transceiver.kind == "video"
                and getattr(transceiver, "_offerDirection", None) in wanted):
            kept = transceiver
            transceiver.direction = video_direction
        else:
            transceiver.direction = "inactive"
    if kept is not None and track is not None:
        kept.sender.replaceTrack(track)
    if kept is not None and video_direction == "recvonly":
        release_frames_on_marker(kept.receiver)
    return kept


class MarkerJitterBuffer(JitterBuffer):
    """aiortc's video jitter buffer, but a frame goes to the decoder as soon as its last packet is in.

    aiortc's own releases a frame when the first packet of the next one arrives: one frame interval late
    (33 ms at 30 fps; benchmarks/bench_webrtc.py measured it, RESULTS.md). Senders set the RTP marker bit on a
    frame's last packet (RFC 7741 for VP8, RFC 6184 for H.264's access units), so a run of packets from the
    oldest, without a gap, of one timestamp and ending in the marker is a whole frame. Anything else (a gap, a
    sender without markers) falls back to aiortc's rule."""

    def _remove_frame(self, sequence_number: int) -> JitterFrame | None:
        packets: list[RtpPacket] = []
        for count in range(self.capacity):
            packet = self._packets[(self._origin + count) % self.capacity]
            if packet is None or (packets and packet.timestamp != packets[0].timestamp):
                break
            packets.append(packet)
            if packet.marker:
                self.remove(count + 1)
                return JitterFrame(data=b"".join(p._data for p in packets), timestamp=packets[0].timestamp)
        return super()._remove_frame(sequence_number)


# aiortc keeps its receiver's jitter buffer in a private attribute: checked here, so that a release that
# renames it is a test failure (tests/unit/bridge/test_webrtc_peer.py), not a silent loss of a frame of latency.
_JITTER_BUFFER = "_RTCRtpReceiver__jitter_buffer"


def release_frames_on_marker(receiver: Any) -> bool:
    """Give a video receiver the :class:`MarkerJitterBuffer` before any packet came. -> whether it took it."""
    current = getattr(receiver, _JITTER_BUFFER, None)
    if type(current) is not JitterBuffer or current._origin is not None:
        log.debug("WebRTC receiver keeps aiortc's jitter buffer (%s)", type(current).__name__)
        return False
    setattr(receiver, _JITTER_BUFFER, MarkerJitterBuffer(capacity=current.capacity, is_video=True))
    return True


class IngestReader:
    """A WHIP peer's video track into its session: ``put(image)`` (an executor thread) gets RGB ``[H, W, 3]``.

    A frame the session cannot take (over 8192 pixels a side, the frame header's limit) is dropped before it is
    converted and counted in ``refused``, as is one whose conversion fails: the sender sends 30 a second and has
    no channel to be told on, so the log says it once, then a summary every few seconds (QA 74 F9: an ERROR
    traceback per frame, forever). The stream goes on: a sender that changes its size back is taken again."""

    def __init__(self, track: MediaStreamTrack, put: Callable[[np.ndarray], None], name: str = "WHIP") -> None:
        self.track = track
        self.put = put
        self.name = name
        self.frames = 0    # converted and put
        self.dropped = 0   # replaced by a newer frame before conversion
        self.refused: dict[str, int] = {"too_large": 0, "failed": 0}  # frames the session could not take
        self._problems = ProblemLog(log, name, lambda: self.refused, noun="refused frames")
        self._latest: av.VideoFrame | None = None
        self._ready = asyncio.Event()
        self._ended = False

    async def run(self) -> None:
        converter = asyncio.create_task(self._convert_loop(), name="sdbridge-whip-convert")
        try:
            while True:
                try:
                    frame = await self.track.recv()
                except MediaStreamError:  # the peer stopped sending or closed
                    return
                if self._latest is not None:
                    self.dropped += 1
                self._latest = frame
                self._ready.set()
        finally:
            self._ended = True
            converter.cancel()
            await asyncio.gather(converter, return_exceptions=True)
            self._problems.flush()  # what was not logged, now that the stream is over

    async def _convert_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._ready.wait()
            self._ready.clear()
            frame, self._latest = self._latest, None
            if frame is None:
                continue
            if frame.width > MAX_DIMENSION or frame.height > MAX_DIMENSION:
                self.refused["too_large"] += 1
                self._problems.log("%s: a %dx%d frame is dropped: a session takes at most %d pixels a side; send a "
                                   "smaller size", self.name, frame.width, frame.height, MAX_DIMENSION)
                continue
            try:
                # yuv420p -> RGB and the InputFrame copy: ~1 ms at 512x512, more at 1080p; off the loop.
                await loop.run_in_executor(None, self._convert, frame)
            except InputError as exc:
                self.refused["too_large"] += 1
                self._problems.log("%s: a frame is dropped: %s", self.name, exc)
            except Exception as exc:  # one bad frame (an odd format mid-stream) never ends the stream
                self.refused["failed"] += 1
                if self.refused["failed"] == 1:  # a cause the daemon did not foresee: its traceback, once
                    log.debug("%s: the first frame that could not be converted", self.name, exc_info=True)
                self._problems.log("%s: a %dx%d frame could not be converted and is dropped: %r", self.name,
                                   frame.width, frame.height, exc)

    def _convert(self, frame: av.VideoFrame) -> None:
        self.put(frame.to_ndarray(format="rgb24"))
        self.frames += 1


class OutputTrack(MediaStreamTrack):
    """A WHEP viewer's video: the newest output frame of its session, offered from any thread."""

    kind = "video"

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__()
        self._loop = loop
        self._lock = threading.Lock()
        self._frame: np.ndarray | None = None
        self._ready = asyncio.Event()
        self._start_s: float | None = None
        self._last_pts = -1
        self.sent = 0
        self.dropped = 0

    def offer(self, frame: np.ndarray) -> None:
        """Any thread (the worker's codec pool): replace the waiting frame; returns at once."""
        with self._lock:
            if self._frame is not None:
                self.dropped += 1
            self._frame = frame
        try:
            self._loop.call_soon_threadsafe(self._ready.set)
        except RuntimeError:  # the loop closed under a frame the worker made while the daemon stopped
            return

    async def recv(self) -> av.VideoFrame:
        while True:
            if self.readyState != "live":
                raise MediaStreamError
            with self._lock:
                frame, self._frame = self._frame, None
            if frame is not None:
                break
            # No lost wake-up: offer() sets the event through the loop, which cannot run between take and clear.
            self._ready.clear()
            await self._ready.wait()
        height, width = frame.shape[0] & ~1, frame.shape[1] & ~1  # yuv420p halves each side: even sizes only
        video = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame[:height, :width]), format="rgb24")
        now = time.monotonic()
        if self._start_s is None:
            self._start_s = now
        # Wall-clock timestamps: the engine's pace varies, and the viewer's jitter buffer plays them as made.
        self._last_pts = max(int((now - self._start_s) * VIDEO_CLOCK_HZ), self._last_pts + 1)
        video.pts, video.time_base = self._last_pts, TIME_BASE
        self.sent += 1
        return video

    def stop(self) -> None:
        super().stop()
        self._ready.set()  # a recv() waiting for a frame sees the track ended
