"""Latent feedback: blend each frame's denoised latents with the previous frame's.

The cheapest temporal smoothing there is: an exponential moving average in latent space, before
decoding, so that what changes from frame to frame is damped while edges stay sharp (blending
in pixel space would ghost). With the session's fixed noise (the engine's seed lock) it steadies
textures that would otherwise boil. Too much strength trails behind fast motion.
"""

from __future__ import annotations

from typing import Any

from sdbridge.plugins.base import Plugin, PluginContext, param


class LatentFeedback(Plugin):
    name = "latent_feedback"
    doc = "Blend each frame's latents with the previous frame's (an EMA before decoding)."
    default_order = 40
    params = (
        param("latent_feedback", "strength", "float", 0.3,
              "How much of the previous frame's latents to keep: 0 none, 0.9 a long trail.",
              minimum=0.0, maximum=0.95),
    )

    def on_latents(self, latents: Any, ctx: PluginContext) -> Any:
        previous = ctx.state.get("latents")
        strength = float(ctx.params["strength"])
        if previous is not None and previous.shape == latents.shape and previous.device == latents.device:
            latents = previous * strength + latents * (1.0 - strength)
            ctx.state["latents"] = latents  # a new tensor of its own
        else:
            # A copy: ``latents`` is a view of the engine's batch, which under CUDA graphs lives in the graph's
            # pool and is overwritten by the next replay (QA 63): the next frame would blend with that.
            ctx.state["latents"] = latents.clone()
        return latents
