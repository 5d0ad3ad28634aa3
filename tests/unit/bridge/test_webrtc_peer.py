"""The tracks between aiortc and the sessions (sdbridge/bridge/webrtc_peer.py): the newest frame wins both ways."""

from __future__ import annotations

import asyncio
import fractions
import threading
import time

import numpy as np
import pytest

pytest.importorskip("aiortc", reason="WebRTC tests need aiortc (pip install 'sdbridge[webrtc]')")

import av  # noqa: E402
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack  # noqa: E402

from sdbridge.bridge.webrtc_peer import IngestReader, OutputTrack  # noqa: E402


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
