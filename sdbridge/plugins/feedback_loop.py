"""Feedback loop: the last output, zoomed, turned and moved, mixed into the next input.

The video-feedback look of VJ sets and Deforum's 2D animation: each frame the engine sees the input
with the previous output laid over it, scaled by ``zoom`` about the centre (above 1 a tunnel
inwards), turned by ``rotate`` degrees and moved by ``shift_x``/``shift_y`` (fractions of the
frame), at ``strength``. With a still input the image keeps travelling, since the engine repaints
what the transform moved; ``strength`` 1 runs on the output alone. It changes the input before the
engine runs, and notes ``ctx.info["feedback"]``, so that the similarity filter skips no frame it mixed: a
skipped frame leaves the last output as it was, the next mix is the same, and the tunnel would stand still
(QA 26: 21 frames of 23 skipped). The edges that come in mirror the picture (no black frame creeps in).
"""

from __future__ import annotations

import cv2
import numpy as np

from sdbridge.plugins.base import Plugin, PluginContext, param


def transform(image: np.ndarray, zoom: float, rotate: float, shift_x: float, shift_y: float) -> np.ndarray:
    """``image`` scaled about its centre, turned ``rotate`` degrees (counter-clockwise) and moved by fractions
    of its size; the edges that come in mirror the picture (no black frame creeping in)."""
    height, width = image.shape[:2]
    matrix = cv2.getRotationMatrix2D((width / 2.0, height / 2.0), rotate, zoom)
    matrix[0, 2] += shift_x * width
    matrix[1, 2] += shift_y * height
    return cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)


class FeedbackLoop(Plugin):
    name = "feedback_loop"
    doc = "Mix the last output, zoomed, turned and moved, into the next input (video feedback, Deforum 2D)."
    default_order = 5  # before the similarity filter: it sees the input the engine will run on, and the mark
    params = (
        param("feedback_loop", "strength", "float", 0.5,
              "How much of the transformed last output goes into the input: 0 none, 1 the output alone.",
              minimum=0.0, maximum=1.0),
        param("feedback_loop", "zoom", "float", 1.02, "Scale per frame about the centre: above 1 zooms in.",
              minimum=0.5, maximum=2.0),
        param("feedback_loop", "rotate", "float", 0.0, "Degrees per frame, counter-clockwise.",
              minimum=-45.0, maximum=45.0),
        param("feedback_loop", "shift_x", "float", 0.0, "Move per frame, a fraction of the width (+ right).",
              minimum=-0.5, maximum=0.5),
        param("feedback_loop", "shift_y", "float", 0.0, "Move per frame, a fraction of the height (+ down).",
              minimum=-0.5, maximum=0.5),
    )

    def before(self, ctx: PluginContext) -> np.ndarray | None:
        assert ctx.image is not None
        last = ctx.last_output
        strength = float(ctx.params["strength"])
        if last is None or strength <= 0.0:
            return None  # a first frame (or one after a pause): the input as it is
        if last.shape != ctx.image.shape:  # the engine's size changed
            last = cv2.resize(last, (ctx.image.shape[1], ctx.image.shape[0]), interpolation=cv2.INTER_AREA)
        moved = transform(last, float(ctx.params["zoom"]), float(ctx.params["rotate"]),
                          float(ctx.params["shift_x"]), float(ctx.params["shift_y"]))
        ctx.image = cv2.addWeighted(ctx.image, 1.0 - strength, moved, strength, 0.0)
        ctx.info["feedback"] = True
        return None
