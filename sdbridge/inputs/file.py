"""A video file or an image folder as the input, looping and paced at its frame rate: rehearse without the rig.

Video files and OpenCV patterns (``frames/%04d.png``) are read through ``cv2.VideoCapture``; a folder's
images are read in name order with ``cv2.imdecode`` (from bytes, so any path works on Windows too).
Frames go out at the file's own rate (``CAP_PROP_FPS``), or ``?fps=N``; a folder or a file that does not
say its rate plays at 30 fps.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import cv2
import numpy as np

from sdbridge.bridge.protocol import MAX_DIMENSION
from sdbridge.inputs.base import Input, InputError, InputSpec

log = logging.getLogger(__name__)

DEFAULT_FPS = 30.0
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


class FileInput(Input):
    kind = "file"

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        assert spec.target is not None  # parse_spec requires a path for file
        self.path = Path(spec.target).expanduser()
        self.capture: cv2.VideoCapture | None = None
        self.images: list[Path] = []
        self.index = 0
        self.fps = spec.fps or DEFAULT_FPS
        self._next_at: float | None = None
        self._shown = 0  # a folder's images decoded since open: none in a whole pass is an error
        self._told_bad: set[Path] = set()
        self._told_scaled: set[Path] = set()

    def check(self) -> None:
        typed = self.spec.text or str(self.spec)  # the argument as the user wrote it
        if "%" in self.path.name:  # an OpenCV image-sequence pattern: its first frame is what can be checked
            if not self.path.parent.is_dir():
                raise InputError(f"input {typed!r}: folder {self.path.parent} does not exist",
                                 code="bad_input")
            return
        if not self.path.exists():
            raise InputError(f"input {typed!r}: {self.path} does not exist", code="bad_input")
        if self.path.is_dir() and not _images_in(self.path):
            raise InputError(f"input {typed!r}: folder {self.path} holds no images "
                             f"({', '.join(sorted(IMAGE_SUFFIXES))})", code="bad_input")

    def open(self) -> None:
        self._open()

    def _open(self, looping: bool = False) -> None:
        """``looping``: a reopen for the next loop, told at debug level only (a short clip or a still
        image loops many times a second)."""
        self.close()
        self.index = 0
        self._shown = 0
        self._next_at = None
        if self.path.is_dir():
            self.images = _images_in(self.path)
            if not self.images:
                raise InputError(f"folder {self.path} holds no images")
            self.fps = self.spec.fps or DEFAULT_FPS
            return
        capture = cv2.VideoCapture(str(self.path))
        if not capture.isOpened():
            raise InputError(f"OpenCV cannot open {self.path} as a video (a codec missing, or not a video?)")
        self.capture = capture
        # Images (a %04d pattern, a single image) state no rate, and FFmpeg's image reader says 25 fps for them: they
        # play at DEFAULT_FPS as a folder does (QA 67 F7: a sequence rendered for 30 ran 17 % slow).
        images = self.path.suffix.lower() in IMAGE_SUFFIXES
        file_fps = 0.0 if images else capture.get(cv2.CAP_PROP_FPS)
        self.fps = self.spec.fps or (file_fps if 0 < file_fps <= 1000 else DEFAULT_FPS)
        level = logging.DEBUG if looping else logging.INFO
        log.log(level, "input %s: %s at %.3g fps", self.spec, self.path, self.fps)

    def read(self, stop: threading.Event) -> np.ndarray | None:
        image = self._next_image()
        if image is None and self.spec.loop and self.index > 0:  # the end: from the start again, in step
            next_at = self._next_at
            self._open(looping=True)
            self._next_at = next_at
            image = self._next_image()
        if image is None:
            if self.index == 0:
                raise InputError(f"{self.path} gave no frame")
            if self.capture is None and self._shown == 0:
                raise InputError(f"no image in folder {self.path} can be read")
            return None
        self._pace(stop)
        return None if stop.is_set() else image

    def _next_image(self) -> np.ndarray | None:
        if self.capture is not None:
            ok, bgr = self.capture.read()
            if not ok:
                return None
            path = self.path
        else:
            bgr = None
            while bgr is None:  # an image that cannot be read is skipped: the rest of the folder plays
                if self.index >= len(self.images):
                    return None
                path = self.images[self.index]
                bgr = self._decode(path)
                if bgr is None:
                    self.index += 1
            self._shown += 1
        self.index += 1
        return cv2.cvtColor(self._fit(bgr, path), cv2.COLOR_BGR2RGB)

    def _fit(self, bgr: np.ndarray, path: Path) -> np.ndarray:
        """``bgr`` scaled down, keeping its shape, when a side is over MAX_DIMENSION: the hub cannot send
        such a frame on, and failing there restarted the whole input (QA 75 F3). Told once per file."""
        height, width = bgr.shape[:2]
        if max(width, height) <= MAX_DIMENSION:
            return bgr
        scale = MAX_DIMENSION / max(width, height)
        size = (min(MAX_DIMENSION, max(1, round(width * scale))), min(MAX_DIMENSION, max(1, round(height * scale))))
        if path not in self._told_scaled:
            self._told_scaled.add(path)
            log.warning("input %s: %s is %dx%d, over %d a side: scaled down to %dx%d", self.spec, path, width,
                        height, MAX_DIMENSION, *size)
        return cv2.resize(bgr, size, interpolation=cv2.INTER_AREA)

    def _decode(self, path: Path) -> np.ndarray | None:
        """A folder's image, or None when it cannot be read (told once per file: it is tried again at
        every loop, as one still being copied in will be whole later)."""
        try:
            bgr = cv2.imdecode(np.fromfile(path, np.uint8), cv2.IMREAD_COLOR)
            why = "not an image OpenCV can decode"
        except OSError as exc:
            bgr, why = None, f"cannot be read: {exc.strerror or exc}"
        except cv2.error:  # an empty file (one being written) fails OpenCV's own check
            bgr, why = None, "empty or not an image OpenCV can decode"
        if bgr is None and path not in self._told_bad:
            self._told_bad.add(path)
            log.warning("input %s: %s %s: skipped", self.spec, path, why)
        elif bgr is not None:
            self._told_bad.discard(path)
        return bgr

    def _pace(self, stop: threading.Event) -> None:
        """Wait for this frame's time: frame n at start + n / fps. Behind by more than a frame (a slow
        decode, a pause of the machine), the clock starts again from now rather than bursting to catch up."""
        now = time.monotonic()
        period = 1.0 / self.fps
        if self._next_at is None or now - self._next_at > period:
            self._next_at = now
        delay = self._next_at - now
        if delay > 0:
            stop.wait(delay)
        self._next_at += period

    def close(self) -> None:
        if self.capture is not None:
            self.capture.release()
            self.capture = None


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
