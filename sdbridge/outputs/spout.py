"""Spout (Windows): the frame shared as a texture with Resolume, TouchDesigner, OBS on the same GPU.

Written against SpoutGL's documented API; it cannot run on this project's Linux machines, so it
is untested here (docs/outputs.md says so).
"""

from __future__ import annotations

import sys

import numpy as np

from sdbridge.outputs.base import Output, OutputError

if sys.platform != "win32":
    raise ImportError("Spout exists only on Windows", name="SpoutGL")

import SpoutGL  # noqa: E402
from OpenGL import GL  # noqa: E402


class SpoutOutput(Output):
    kind = "spout"

    def __init__(self, target: str | None) -> None:
        super().__init__(target)
        self.sender: SpoutGL.SpoutSender | None = None
        self.size = (0, 0)

    def open(self, width: int, height: int, fps: float) -> None:
        self.close()
        sender = SpoutGL.SpoutSender()
        sender.setSenderName(self.target or "sdbridge")
        self.sender, self.size = sender, (width, height)

    def send(self, frame: np.ndarray) -> None:
        assert self.sender is not None
        rgba = np.dstack([frame, np.full(frame.shape[:2], 255, np.uint8)])
        if not self.sender.sendImage(rgba.tobytes(), self.size[0], self.size[1], GL.GL_RGBA, False, 0):
            raise OutputError("Spout refused the frame (no OpenGL context?)")

    def close(self) -> None:
        if self.sender is not None:
            self.sender.releaseSender()
            self.sender = None
