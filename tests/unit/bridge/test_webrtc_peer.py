"""The tracks between aiortc and the sessions (sdbridge/bridge/webrtc_peer.py): the newest frame wins both ways."""

from __future__ import annotations

import asyncio
import fractions
import threading
import time

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="WebRTC tests need aiortc (pip install \"sdbridge[webrtc]\")")

import av  # noqa: E402
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack  # noqa: E402

from aiortc.jitterbuffer import JitterBuffer  # noqa: E402
from aiortc.rtp import RtpPacket  # noqa: E402

from sdbridge.bridge.webrtc_peer import (IngestReader, MarkerJitterBuffer, OutputTrack,  # noqa: E402
                                         keep_only_video, new_peer_connection)


def test_a_viewer_that_does_not_take_its_frames_keeps_only_the_newest_and_never_blocks_the_offer() -> None:
    async def run() -> None:
        track = OutputTrack(asyncio.get_running_loop())
        frames = [np.full((65, 33, 3), value, np.uint8) for value in range(1, 101)]
        started = time.perf_counter()
        offered = threading.Thread(target=lambda: [track.offer(frame) for frame in frames])  # the worker's side
        offered.start()
        offered.join()
        assert time.perf_counter() - started < 1.0  # 100 offers, no reader: nothing waits
        video = await asyncio.wait_for(track.recv(), 5)
        assert (track.sent, track.dropped) == (1, 99)
        assert (video.width, video.height) == (32, 64)  # cut to even sizes for yuv420p
        assert int(video.to_ndarray(format="rgb24").mean()) == 100  # the newest
        assert video.time_base == fractions.Fraction(1, 90_000)

        waiting = asyncio.create_task(track.recv())  # nothing offered: it waits, then takes the next one
        await asyncio.sleep(0.05)
        assert not waiting.done()
        threading.Thread(target=track.offer, args=(frames[0],)).start()
        second = await asyncio.wait_for(waiting, 5)
        assert second.pts > video.pts and int(second.to_ndarray(format="rgb24").mean()) == 1

        track.stop()
        with pytest.raises(MediaStreamError):
            await track.recv()

    asyncio.run(run())


class Burst(MediaStreamTrack):
    """A sender faster than the reader converts: ``count`` frames as fast as they are asked for, then the end."""

    kind = "video"

    def __init__(self, count: int) -> None:
        super().__init__()
        self.left = count
        self.pts = 0

    async def recv(self) -> av.VideoFrame:
        if self.left == 0:
            raise MediaStreamError
        self.left -= 1
        self.pts += 1
        await asyncio.sleep(0.002)
        frame = av.VideoFrame.from_ndarray(np.full((16, 16, 3), self.pts, np.uint8), format="rgb24")
        frame.pts, frame.time_base = self.pts, fractions.Fraction(1, 90_000)
        return frame


def test_a_slow_conversion_drops_older_frames_before_converting_them() -> None:
    put: list[int] = []

    def slow_put(image: np.ndarray) -> None:  # the executor thread: the slot and the InputFrame copy, made slow
        time.sleep(0.03)
        put.append(int(image[0, 0, 0]))

    async def run() -> IngestReader:
        reader = IngestReader(Burst(60), slow_put)
        await asyncio.wait_for(reader.run(), 10)
        return reader

    reader = asyncio.run(run())
    assert reader.frames == len(put) and reader.dropped > 0 and reader.frames + reader.dropped <= 60
    assert put == sorted(put) and len(set(put)) == len(put)  # in order, none twice
    assert len(put) < 30  # most of the 60 were never converted


def feed(buffer: JitterBuffer, packets: list[tuple[int, int, bool]]) -> list[tuple[int, bytes] | None]:
    """(sequence number, timestamp, marker) in arrival order -> what each add released: (timestamp, payload)."""
    out = []
    for sequence, timestamp, marker in packets:
        packet = RtpPacket(sequence_number=sequence, timestamp=timestamp, marker=marker)
        packet._data = bytes([sequence % 256])
        frame = buffer.add(packet)[1]
        out.append(None if frame is None else (frame.timestamp, frame.data))
    return out


def test_a_frame_goes_to_the_decoder_with_its_last_packet_not_with_the_next_frame_s_first() -> None:
    packets = [(0, 0, False), (1, 0, True), (2, 3000, False), (3, 3000, True)]
    assert feed(MarkerJitterBuffer(512, is_video=True), packets) == [None, (0, b"\x00\x01"), None,
                                                                      (3000, b"\x02\x03")]
    # aiortc's own: each frame one packet (one frame interval) later, the last not yet.
    assert feed(JitterBuffer(512, is_video=True), packets) == [None, None, (0, b"\x00\x01"), None]


def test_out_of_order_wrapped_or_markerless_packets_still_make_whole_frames() -> None:
    late_middle = [(10, 0, False), (12, 0, True), (11, 0, False), (13, 90, True)]
    assert feed(MarkerJitterBuffer(512, is_video=True), late_middle) == [None, None, (0, b"\n\x0b\x0c"),
                                                                          (90, b"\r")]
    wrapped = [(65534, 7, False), (65535, 7, True), (0, 8, True)]
    assert feed(MarkerJitterBuffer(512, is_video=True), wrapped) == [None, (7, b"\xfe\xff"), (8, b"\x00")]
    no_markers = [(0, 0, False), (1, 0, False), (2, 3000, False)]  # a sender that sets none: aiortc's rule
    assert feed(MarkerJitterBuffer(512, is_video=True), no_markers) == [None, None, (0, b"\x00\x01")]


def test_a_whip_answer_s_video_receiver_gets_the_marker_jitter_buffer() -> None:
    """The buffer sits in aiortc's private receiver attribute: this fails, rather than a frame of latency coming
    back unseen, if an aiortc release moves it."""
    from aiortc import RTCSessionDescription

    async def run() -> None:
        sender, daemon_side = new_peer_connection(), new_peer_connection()
        sender.addTransceiver("video", direction="sendonly")
        sender.addTransceiver("audio", direction="sendonly")
        await sender.setLocalDescription(await sender.createOffer())
        await daemon_side.setRemoteDescription(RTCSessionDescription(sender.localDescription.sdp, "offer"))
        keep_only_video(daemon_side, "recvonly")
        buffers = {t.kind: getattr(t.receiver, "_RTCRtpReceiver__jitter_buffer") for t in daemon_side.getTransceivers()}
        assert type(buffers["video"]) is MarkerJitterBuffer and buffers["video"].capacity == 512
        assert type(buffers["audio"]) is JitterBuffer  # audio (answered inactive) keeps aiortc's
        await asyncio.gather(sender.close(), daemon_side.close())

    asyncio.run(run())


def test_one_video_section_is_kept_each_way_and_every_other_is_answered_inactive() -> None:
    """Two cameras in one WHIP offer: aiortc decoded both, and the second's frames queued unread, 13 MB/s at
    640x480 (QA 74 F3). The first the client sends on is kept; a WHEP viewer's track goes on the first it
    receives on, even when a section it sends on comes before."""
    from aiortc import RTCSessionDescription

    async def answer(offerer, direction: str, track=None) -> tuple[list[str], object, object]:
        daemon_side = new_peer_connection()
        await offerer.setLocalDescription(await offerer.createOffer())
        await daemon_side.setRemoteDescription(RTCSessionDescription(offerer.localDescription.sdp, "offer"))
        kept = keep_only_video(daemon_side, direction, track)
        await daemon_side.setLocalDescription(await daemon_side.createAnswer())
        directions = [line[2:] for line in daemon_side.localDescription.sdp.split("\r\n")
                      if line in ("a=sendonly", "a=recvonly", "a=sendrecv", "a=inactive")]
        await asyncio.gather(offerer.close(), daemon_side.close())
        return directions, kept, daemon_side

    async def run() -> None:
        sender = new_peer_connection()
        for kind in ("audio", "video", "video"):
            sender.addTransceiver(kind, direction="sendonly")
        directions, kept, daemon_side = await answer(sender, "recvonly")
        assert directions == ["inactive", "recvonly", "inactive"]
        assert kept is daemon_side.getTransceivers()[1] and kept.receiver.track is not None

        viewer = new_peer_connection()
        viewer.addTransceiver("video", direction="sendonly")  # receives nothing from the daemon: not this one
        viewer.addTransceiver("video", direction="recvonly")
        viewer.addTransceiver("video", direction="recvonly")
        track = OutputTrack(asyncio.get_running_loop())
        directions, kept, daemon_side = await answer(viewer, "sendonly", track)
        assert directions == ["inactive", "sendonly", "inactive"]
        assert kept is daemon_side.getTransceivers()[1] and kept.sender.track is track

        nothing = new_peer_connection()
        nothing.addTransceiver("video", direction="recvonly")
        assert (await answer(nothing, "recvonly"))[1] is None  # a WHIP offer that sends no video keeps none

    asyncio.run(run())


class Sized(Burst):
    """``count`` frames of ``width`` x ``height``, as fast as they are asked for, then the end."""

    def __init__(self, count: int, width: int, height: int) -> None:
        super().__init__(count)
        self.size = (height, width, 3)

    async def recv(self) -> av.VideoFrame:
        if self.left == 0:
            raise MediaStreamError
        self.left -= 1
        self.pts += 1
        await asyncio.sleep(0.002)
        frame = av.VideoFrame.from_ndarray(np.zeros(self.size, np.uint8), format="rgb24")
        frame.pts, frame.time_base = self.pts, fractions.Fraction(1, 90_000)
        return frame


def test_frames_a_session_cannot_take_are_dropped_counted_and_told_once_not_a_traceback_each(caplog) -> None:
    """A sender of 8208x16 frames logged a 20-line ERROR traceback for each, 30 a second, forever, and nothing
    counted them (QA 74 F9)."""
    import logging

    from sdbridge.bridge.protocol import PixelFormat
    from sdbridge.inputs.hub import input_frame

    taken: list[tuple[int, ...]] = []

    def put(image: np.ndarray) -> None:  # what the hub's _put does: the v1 header refuses more than 8192 a side
        input_frame(image, 1, 0, PixelFormat.JPEG)
        taken.append(image.shape)

    async def run(track: MediaStreamTrack, put) -> IngestReader:
        reader = IngestReader(track, put, name="WHIP abc on session wide")
        await asyncio.wait_for(reader.run(), 10)
        return reader

    with caplog.at_level(logging.DEBUG, logger="sdbridge.bridge.webrtc_peer"):
        wide = asyncio.run(run(Sized(40, 8208, 16), put))
    assert taken == [] and wide.frames == 0
    assert 30 <= wide.refused["too_large"] + wide.dropped <= 40  # the last may come as the stream ends
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    first, *rest = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert first == ("WHIP abc on session wide: a 8208x16 frame is dropped: a session takes at most 8192 pixels a "
                     "side; send a smaller size")
    assert len(rest) <= 1 and all("more refused frames not logged (too_large +" in line for line in rest)

    caplog.clear()
    fits = asyncio.run(run(Sized(5, 8192, 16), put))  # the limit itself is taken
    assert fits.frames == len(taken) > 0 and fits.refused == {"too_large": 0, "failed": 0}

    def broken(image: np.ndarray) -> None:
        raise RuntimeError("no slot")

    with caplog.at_level(logging.DEBUG, logger="sdbridge.bridge.webrtc_peer"):
        failing = asyncio.run(run(Sized(40, 16, 16), broken))
    assert failing.refused["failed"] > 0 and failing.frames == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings[0].endswith("a 16x16 frame could not be converted and is dropped: RuntimeError('no slot')")
    assert len(warnings) <= 2 and not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len([r for r in caplog.records if r.exc_info]) == 1  # the first one's traceback, at DEBUG
