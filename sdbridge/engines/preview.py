"""The preview engine: OpenCV effects on the CPU, no weights, so a rig can be wired up first.

Each effect reaches 30 frames/s at 512×512 on 2 cores with a wide margin
(benchmarks/bench_preview.py; the slowest, ``stylize``, ran at ~100 frames/s): filters that are
slower at full size (bilateral, stylization) run at a reduced size and are scaled back up.
``strength`` blends the effect over the input (0 = the input unchanged, 1 = the full effect).
The engine leaves ``cv2.setNumThreads`` at OpenCV's default: it is process-wide, and the daemon's
codec threads share the same cores (the benchmark measures both settings).
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import cv2
import numpy as np
import torch

from sdbridge.engines.base import Engine, StreamState

Effect = Callable[[np.ndarray], np.ndarray]


def _shrink(image: np.ndarray, factor: int) -> np.ndarray:
    height, width = image.shape[:2]
    return cv2.resize(image, (max(1, width // factor), max(1, height // factor)), interpolation=cv2.INTER_AREA)


def _grow(image: np.ndarray, like: np.ndarray) -> np.ndarray:
    return cv2.resize(image, (like.shape[1], like.shape[0]), interpolation=cv2.INTER_LINEAR)


def cartoon(image: np.ndarray) -> np.ndarray:
    """Flat colour regions (bilateral at half size) with dark ink edges."""
    small = _shrink(image, 2)
    for _ in range(2):
        small = cv2.bilateralFilter(small, 5, 40, 5)
    flat = _grow(small, image)
    flat = (flat // 24) * 24 + 12  # posterise the flat regions
    grey = cv2.cvtColor(_shrink(image, 2), cv2.COLOR_RGB2GRAY)
    edges = cv2.adaptiveThreshold(cv2.medianBlur(grey, 5), 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 9, 4)
    edges = _grow(edges, image)
    return cv2.bitwise_and(flat, flat, mask=(edges > 127).astype(np.uint8))


def stylize(image: np.ndarray) -> np.ndarray:
    """A painterly look. cv2.stylization runs at 6–13 fps at 512² and ~50 fps at 256², too close to
    30 on shared cores, so it runs at a third of each side (~120 fps) and is scaled back up."""
    small = _shrink(image, 3)
    painted = cv2.stylization(small, sigma_s=30, sigma_r=0.45)
    return _grow(painted, image)


def edges(image: np.ndarray) -> np.ndarray:
    """Neon edges on black: Canny on the colour image (OpenCV takes the strongest channel's gradient,
    so edges between colours of equal brightness count), glowing in the input's own hues."""
    lines = cv2.Canny(cv2.GaussianBlur(image, (5, 5), 0), 60, 140)
    lines = cv2.dilate(lines, np.ones((2, 2), np.uint8))
    glow = cv2.max(lines, cv2.GaussianBlur(lines, (0, 0), 2))
    hsv = cv2.cvtColor(image, cv2.COLOR_RGB2HSV)
    hsv[:, :, 1] = cv2.max(hsv[:, :, 1], 170)  # vivid
    hsv[:, :, 2] = 255  # bright
    neon = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return cv2.multiply(neon, cv2.cvtColor(glow, cv2.COLOR_GRAY2RGB), scale=1 / 255)


def _build_grade_lut() -> np.ndarray:
    """A teal-and-orange grade: warm highlights, cool shadows, a soft S-curve. ``[256, 1, 3]``."""
    x = np.arange(256, dtype=np.float32) / 255.0
    curve = x + 0.18 * np.sin(2 * np.pi * x) * (x * (1 - x)) * 4 / 2  # gentle S
    red = np.clip(curve * 1.08 + 0.02, 0, 1)
    green = np.clip(curve * 0.98 + 0.01, 0, 1)
    blue = np.clip(curve * 0.85 + 0.12 * (1 - x), 0, 1)
    return (np.stack([red, green, blue], axis=-1) * 255).astype(np.uint8).reshape(256, 1, 3)


_GRADE_LUT = _build_grade_lut()


def grade(image: np.ndarray) -> np.ndarray:
    """A colour grade through a 3-channel lookup table, with a saturation lift."""
    graded = cv2.LUT(image, _GRADE_LUT)
    hsv = cv2.cvtColor(graded, cv2.COLOR_RGB2HSV)
    hsv[:, :, 1] = cv2.add(hsv[:, :, 1], 30)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


# Darkens the dodge's faint mid-greys into pencil strokes; paper stays white.
_PENCIL_LUT = ((np.arange(256, dtype=np.float32) / 255.0) ** 3 * 255).astype(np.uint8)


def sketch(image: np.ndarray) -> np.ndarray:
    """Pencil on paper: the colour-dodge of the grey image by its blurred negative."""
    grey = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
    blurred = cv2.GaussianBlur(255 - grey, (0, 0), 6)
    drawing = cv2.LUT(cv2.divide(grey, 255 - blurred, scale=256), _PENCIL_LUT)
    return cv2.cvtColor(drawing, cv2.COLOR_GRAY2RGB)


EFFECTS: dict[str, Effect] = {"cartoon": cartoon, "stylize": stylize, "edges": edges, "grade": grade,
                              "sketch": sketch}


def plasma(width: int, height: int, t: float) -> np.ndarray:
    """An animated colour field for txt2img on the preview engine: computed at 1/8 size, scaled up."""
    small_w, small_h = max(8, width // 8), max(8, height // 8)
    y, x = np.mgrid[0:small_h, 0:small_w].astype(np.float32)
    x /= small_w
    y /= small_h
    value = np.sin(10 * x + t) + np.sin(10 * y + t * 0.7) + np.sin(10 * (x + y) + t * 1.3)
    hue = ((value + 3) / 6 * 179).astype(np.uint8)
    hsv = np.stack([hue, np.full_like(hue, 200), np.full_like(hue, 230)], axis=-1)
    rgb = cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)
    return cv2.resize(rgb, (width, height), interpolation=cv2.INTER_CUBIC)


class PreviewEngine(Engine):
    """OpenCV effects chosen by the ``effect`` parameter, blended over the input by ``strength``.

    ``clock`` (seconds) drives the txt2img pattern; tests pass their own.
    """

    name = "preview"

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.effect: Effect = cartoon
        self.strength = 1.0
        self._clock = clock
        self._started = clock()

    def prepare(self, params: Mapping[str, Any]) -> None:
        super().prepare(params)
        self.effect = EFFECTS[params["effect"]]
        self.strength = min(1.0, max(0.0, float(params["strength"])))

    def step(self, frames: torch.Tensor | None, states: Sequence[StreamState]) -> torch.Tensor:
        # 1. txt2img: a moving pattern per session (offset by its id, so sessions differ and keep their own).
        if frames is None:
            width, height = self.resolution
            t = self._clock() - self._started
            return torch.from_numpy(np.stack([plasma(width, height, t + _phase(state)) for state in states]))
        # 2. Nothing to do at strength 0: the input is the output.
        if self.strength <= 0.0:
            return frames
        # 3. The effect per image, written into one output batch.
        batch = frames.cpu().numpy()  # [B, H, W, 3] uint8, zero-copy on the CPU
        out = np.empty_like(batch)
        for index, image in enumerate(batch):
            out[index] = self.apply(image)
        return torch.from_numpy(out)  # [B, H, W, 3] uint8

    def apply(self, image: np.ndarray) -> np.ndarray:
        """One RGB uint8 ``[H, W, 3]`` image through the effect, blended by ``strength``."""
        if self.strength <= 0.0:
            return image
        styled = self.effect(np.ascontiguousarray(image))
        if self.strength >= 1.0:
            return styled
        return cv2.addWeighted(image, 1.0 - self.strength, styled, self.strength, 0.0)


def _phase(state: StreamState) -> float:
    """A fixed time offset per session, from its id: 0..10 s."""
    return zlib.crc32(state.session_id.encode()) % 1000 / 100
