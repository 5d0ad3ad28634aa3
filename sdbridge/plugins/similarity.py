"""Similarity filter: skip the diffusion step when the input barely changed, reuse the last output.

A still camera or a paused render costs nothing, and a static scene stops flickering. Two inputs are
compared at 32×32 (cheap, and blind to sensor noise) on three counts, and the similarity is the least:
the cosine similarity of their patterns (each with its mean taken out), one less their difference in
mean brightness (0–1), and the ratio of their contrasts. The pattern alone is blind to a fade (a
texture fading to black keeps its pattern) and sees nothing in a flat frame; brightness and contrast
see both (QA 26). ``max_skips`` bounds how long a slowly drifting input can go without a fresh frame.

A frame a feedback plugin has mixed the last output into (``ctx.info["feedback"]``) is never skipped:
its input moves by itself, and skipping it would hold the picture still (QA 26).
"""

from __future__ import annotations

from typing import NamedTuple

import cv2
import numpy as np

from sdbridge.plugins.base import Plugin, PluginContext, param

FLAT = 1e-3  # RMS contrast (0-1) below which a frame has no pattern to compare: a blackout, a held colour
ROUNDING = 1e-6  # float32 sums: a frame compared with itself comes out a hair under 1


class Signature(NamedTuple):
    pattern: np.ndarray  # the 32×32 grey-free pattern, unit length (zeros for a flat frame)
    mean: float          # mean brightness, 0-1
    contrast: float      # RMS of the pattern, 0-1


def signature(image: np.ndarray) -> Signature:
    small = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32).ravel() / 255.0
    mean = float(small.mean())
    small -= mean
    norm = float(np.linalg.norm(small))
    contrast = norm / np.sqrt(small.size)
    return Signature(small / norm if contrast >= FLAT else np.zeros_like(small), mean, contrast)


def similarity(first: Signature, second: Signature) -> float:
    """The least of pattern, brightness and contrast similarity, each 1 for the same frame."""
    flat = (first.contrast < FLAT, second.contrast < FLAT)
    pattern = 1.0 if all(flat) else 0.0 if any(flat) else float(np.dot(first.pattern, second.pattern))
    brightness = 1.0 - abs(first.mean - second.mean)
    high = max(first.contrast, second.contrast)
    contrast = 1.0 if high < FLAT else min(first.contrast, second.contrast) / high
    return min(pattern, brightness, contrast)


class SimilarityFilter(Plugin):
    name = "similarity"
    doc = "Skip the engine when the input barely changed; reuse the last output."
    default_order = 10  # first: a skipped frame costs no other plugin anything
    params = (
        param("similarity", "threshold", "float", 0.98,
              "Skip when the input's similarity to the last processed one (the least of pattern, brightness "
              "and contrast) is at least this.", minimum=0.0, maximum=1.0),
        param("similarity", "max_skips", "int", 10, "At most this many frames skipped in a row.",
              minimum=0, maximum=1000),
    )

    def before(self, ctx: PluginContext) -> np.ndarray | None:
        assert ctx.image is not None
        current = signature(ctx.image)
        last = ctx.state.get("signature")
        output = ctx.last_output
        skips = ctx.state.get("skips", 0)
        # The last output stands in only at this frame's size: after a change of resolution it is another size.
        if last is not None and output is not None and output.shape == ctx.image.shape \
                and skips < ctx.params["max_skips"] and not ctx.info.get("feedback"):
            if similarity(current, last) >= ctx.params["threshold"] - ROUNDING:
                ctx.state["skips"] = skips + 1
                return output
        ctx.state["signature"] = current
        ctx.state["skips"] = 0
        return None

    def passed_through(self, ctx: PluginContext) -> None:
        # Not processed: the next still frame skipped to the raw input for up to max_skips frames (QA 71 F1).
        ctx.state.pop("signature", None)
