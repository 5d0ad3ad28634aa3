"""A virtual webcam (pyvirtualcam): Zoom, OBS or a browser sees the output as a camera.

On Linux it needs the v4l2loopback kernel module (``modprobe v4l2loopback``); on Windows and
macOS, OBS's virtual camera.
"""

from __future__ import annotations

import numpy as np
import pyvirtualcam

from sdbridge.outputs.base import Output, OutputError


class VirtualCamOutput(Output):
    kind = "virtualcam"

    def __init__(self, target: str | None) -> None:
        super().__init__(target)
        self.camera: pyvirtualcam.Camera | None = None

    def open(self, width: int, height: int, fps: float) -> None:
        self.close()
        try:
            self.camera = pyvirtualcam.Camera(width, height, fps, device=self.target,
                                              fmt=pyvirtualcam.PixelFormat.RGB)
        except RuntimeError as exc:
            raise OutputError(f"no virtual camera: {exc}", code="output_unavailable") from exc

    def send(self, frame: np.ndarray) -> None:
        assert self.camera is not None
        self.camera.send(frame)

    def close(self) -> None:
        if self.camera is not None:
            self.camera.close()
            self.camera = None
