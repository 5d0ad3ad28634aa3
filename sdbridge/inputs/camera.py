"""A capture device (webcam, capture card) as the input, through ``cv2.VideoCapture``.

``camera:0`` is the first device; a target that is not a number is passed to OpenCV as it is (a
``/dev/video2`` path, a GStreamer pipeline). ``?width=1280&height=720&fps=30`` are asked of the device,
which may give something else: the frames' real size shows in ``/stats``. The device paces the frames.

Written against OpenCV's documented VideoCapture API; this project's machines have no video device,
so it is untested here (docs/inputs.md says so).
"""

from __future__ import annotations

import threading

import cv2
import numpy as np

from sdbridge.inputs.base import Input, InputError, InputSpec


class CameraInput(Input):
    kind = "camera"

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        target = spec.target or "0"
        self.device: int | str = int(target) if target.isdigit() else target
        self.capture: cv2.VideoCapture | None = None

    def open(self) -> None:
        self.close()
        capture = cv2.VideoCapture(self.device)
        if not capture.isOpened():
            capture.release()
            raise InputError(f"no camera {self.device!r} (unplugged, in use by another program, or no permission)",
                             code="input_unavailable")
        for prop, value in ((cv2.CAP_PROP_FRAME_WIDTH, self.spec.width), (cv2.CAP_PROP_FRAME_HEIGHT, self.spec.height),
                            (cv2.CAP_PROP_FPS, self.spec.fps)):
            if value:
                capture.set(prop, float(value))  # a request: the device picks its nearest mode
        self.capture = capture

    def read(self, stop: threading.Event) -> np.ndarray | None:
        assert self.capture is not None
        ok, bgr = self.capture.read()  # blocks for the device's next frame: at most one frame time
        if stop.is_set():
            return None
        if not ok or bgr is None:
            raise InputError(f"camera {self.device!r} gave no frame (unplugged?)")
        return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def close(self) -> None:
        if self.capture is not None:
            self.capture.release()
            self.capture = None
