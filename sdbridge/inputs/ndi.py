"""NDI as the input: an NDI source on the network (OBS, Resolume, TouchDesigner's NDI Out TOP) feeds a session.

``ndi:NAME`` connects to the source whose full name (``HOST (STREAM)``) or stream name is NAME; plain
``ndi`` takes the first source found. Sources are found by NDI's own discovery (mDNS): a source that
is not there yet is looked for again at each retry. Frames arrive as RGBA (``RGBX_RGBA``: NDI
converts any other format itself) and are paced by the sender.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
from cyndilib.finder import Finder, Source
from cyndilib.receiver import ReceiveFrameType, Receiver
from cyndilib.video_frame import VideoRecvFrame
from cyndilib.wrapper.ndi_recv import RecvBandwidth, RecvColorFormat

from sdbridge.inputs.base import Input, InputError, InputSpec

log = logging.getLogger(__name__)

FIND_TIMEOUT_S = 3.0      # discovery's first answers take a second or two on a LAN
RECEIVE_TIMEOUT_MS = 200  # the longest a stop waits for ``receive`` to return
SILENCE_S = 5.0           # no frame for this long while connected: the source is treated as gone


def matches(source_name: str, wanted: str | None) -> bool:
    """``wanted`` names this source: its full name ``HOST (STREAM)`` or the STREAM part; None takes any."""
    if wanted is None:
        return True
    stream = source_name[source_name.find("(") + 1:-1] if source_name.endswith(")") and "(" in source_name else None
    return wanted in (source_name, stream)


class NdiInput(Input):
    kind = "ndi"

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        self.finder: Finder | None = None
        self.receiver: Receiver | None = None
        self.frame: VideoRecvFrame | None = None
        self._buffer = np.empty(0, np.uint8)

    def open(self) -> None:
        self._disconnect()
        if self.finder is None:
            self.finder = Finder()
            self.finder.open()
        source = self._find(self.finder)
        receiver = Receiver(color_format=RecvColorFormat.RGBX_RGBA, bandwidth=RecvBandwidth.highest,
                            recv_name="sdbridge")
        frame = VideoRecvFrame()
        receiver.set_video_frame(frame)
        receiver.set_source(source)
        self.receiver, self.frame = receiver, frame
        log.info("input %s: receiving from NDI source %r", self.spec, source.name)

    def _find(self, finder: Finder) -> Source:
        wanted = self.spec.target
        finder.wait_for_sources(FIND_TIMEOUT_S)
        finder.update_sources()
        for name in finder.get_source_names():
            if matches(name, wanted):
                return finder.get_source(name)
        seen = ", ".join(repr(name) for name in finder.get_source_names()) or "none"
        raise InputError(f"no NDI source {wanted or '(any)'} on the network (sources seen: {seen})",
                         code="input_unavailable")

    def read(self, stop: threading.Event) -> np.ndarray | None:
        assert self.receiver is not None and self.frame is not None
        silent_ms = 0
        while not stop.is_set():
            result = self.receiver.receive(ReceiveFrameType.recv_video, RECEIVE_TIMEOUT_MS)
            if not result & ReceiveFrameType.recv_video:
                silent_ms += RECEIVE_TIMEOUT_MS
                if silent_ms > SILENCE_S * 1000:
                    raise InputError(f"NDI source {self.receiver.source_name!r} sent no frame for {SILENCE_S:.0f} s")
                continue
            self.frame.skip_frames(True)  # the newest frame only: the session's slot keeps the newest anyway
            width, height = self.frame.get_resolution()
            stride = self.frame.get_line_stride() or width * 4
            size = self.frame.get_buffer_size()
            if self._buffer.size != size:
                self._buffer = np.empty(size, np.uint8)
            if not self.frame.fill_p_data(self._buffer):
                continue
            rows = self._buffer[:stride * height].reshape(height, stride)
            return rows[:, :width * 4].reshape(height, width, 4)
        return None

    def _disconnect(self) -> None:
        if self.receiver is not None:
            self.receiver.disconnect()
            self.receiver = None
            self.frame = None

    def close(self) -> None:
        self._disconnect()
        if self.finder is not None:
            self.finder.close()
            self.finder = None
