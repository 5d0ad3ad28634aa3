"""Similarity filter: skip the diffusion step when the input barely changed, reuse the last output.

A still camera or a paused render costs nothing, and a static scene stops flickering. The
similarity is the cosine similarity of the two inputs at 32×32 (cheap, and blind to sensor
noise); ``max_skips`` bounds how long a slowly drifting input can go without a fresh frame.
"""

from __future__ import annotations

import cv2
import numpy as np

from sdbridge.plugins.base import Plugin, PluginContext, param


def _signature(image: np.ndarray) -> np.ndarray:
    small = cv2.resize(image, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
    small -= small.mean()
    return small / (np.linalg.norm(small) + 1e-6)


class SimilarityFilter(Plugin):
    name = "similarity"
    doc = "Skip the engine when the input barely changed; reuse the last output."
    default_order = 10  # first: a skipped frame costs no other plugin anything
    params = (
        param("similarity", "threshold", "float", 0.98,
              "Skip when the input's similarity to the last processed one is at least this.",
              minimum=0.0, maximum=1.0),
        param("similarity", "max_skips", "int", 10, "At most this many frames skipped in a row.",
              minimum=0, maximum=1000),
    )

    def before(self, ctx: PluginContext) -> np.ndarray | None:
        assert ctx.image is not None
        signature = _signature(ctx.image)
        last = ctx.state.get("signature")
        output = ctx.last_output
        skips = ctx.state.get("skips", 0)
        # The last output stands in only at this frame's size: after a change of resolution it is another size.
        if last is not None and output is not None and output.shape == ctx.image.shape \
                and skips < ctx.params["max_skips"]:
            similarity = float(np.dot(signature, last))
            if similarity >= ctx.params["threshold"]:
                ctx.state["skips"] = skips + 1
                ctx.state["skipped_total"] = ctx.state.get("skipped_total", 0) + 1
                return output
        ctx.state["signature"] = signature
        ctx.state["skips"] = 0
        return None
