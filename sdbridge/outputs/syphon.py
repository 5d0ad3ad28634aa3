"""Syphon (macOS): the frame shared as a Metal texture with Resolume, MadMapper, TouchDesigner.

Written against syphon-python's documented API; it cannot run on this project's Linux machines,
so it is untested here (docs/outputs.md says so).
"""

from __future__ import annotations

import sys

import numpy as np

from sdbridge.outputs.base import Output

if sys.platform != "darwin":
    raise ImportError("Syphon exists only on macOS", name="syphon")

import syphon  # noqa: E402
from syphon.utils.numpy import copy_image_to_mtl_texture  # noqa: E402
from syphon.utils.raw import create_mtl_texture  # noqa: E402


class SyphonOutput(Output):
    kind = "syphon"

    def __init__(self, target: str | None) -> None:
        super().__init__(target)
        self.server = None
        self.texture = None

    def open(self, width: int, height: int, fps: float) -> None:
        self.close()
        self.server = syphon.SyphonMetalServer(self.target or "sdbridge")
        self.texture = create_mtl_texture(self.server.device, width, height)

    def send(self, frame: np.ndarray) -> None:
        rgba = np.dstack([frame, np.full(frame.shape[:2], 255, np.uint8)])
        copy_image_to_mtl_texture(rgba, self.texture)
        self.server.publish_frame_texture(self.texture)

    def close(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None
