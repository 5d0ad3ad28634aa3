"""NDI: the output appears as a source on the network (Resolume, OBS, TouchDesigner's NDI In TOP)."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
from cyndilib.sender import Sender
from cyndilib.video_frame import VideoSendFrame
from cyndilib.wrapper.ndi_structs import FourCC

from sdbridge.outputs.base import Output


class NdiOutput(Output):
    kind = "ndi"

    def __init__(self, target: str | None) -> None:
        super().__init__(target)
        self.name = target or "sdbridge"
        self.sender: Sender | None = None
        self._rgba: np.ndarray | None = None

    def open(self, width: int, height: int, fps: float) -> None:
        self.close()
        frame = VideoSendFrame()
        frame.set_resolution(width, height)
        frame.set_fourcc(FourCC.RGBA)  # NDI has no packed RGB: the alpha plane is set once, opaque
        frame.set_frame_rate(Fraction(max(1, round(fps)), 1))
        sender = Sender(self.name, clock_video=False)  # the worker paces frames; NDI must not block it
        sender.set_video_frame(frame)
        sender.open()
        self.sender = sender
        self._rgba = np.full((height, width, 4), 255, np.uint8)

    def send(self, frame: np.ndarray) -> None:
        assert self.sender is not None and self._rgba is not None
        self._rgba[..., :3] = frame
        self.sender.write_video_async(self._rgba.ravel())

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None
