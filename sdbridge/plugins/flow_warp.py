"""Optical-flow warp: carry the previous output along the input's motion and blend it in.

The flow between the previous and the current input (OpenCV's DIS, on the CPU, at half size)
says where each pixel came from; the previous *output* is warped along it and blended with the
new output, so textures move with the scene instead of being re-rolled every frame. Where the
warped previous input does not match the current input (occlusions, cuts, fast motion), the new
output is kept as it is.
"""

from __future__ import annotations

import cv2
import numpy as np

from sdbridge.plugins.base import Plugin, PluginContext, param


class FlowWarp(Plugin):
    name = "flow_warp"
    doc = "Warp the previous output along the optical flow of the input and blend it in, with occlusion masking."
    default_order = 60
    params = (
        param("flow_warp", "strength", "float", 0.5, "Weight of the warped previous output where the flow holds.",
              minimum=0.0, maximum=0.95),
        param("flow_warp", "occlusion", "float", 24.0,
              "Mean colour error (0-255) above which a pixel counts as occluded and keeps the new output.",
              minimum=1.0, maximum=255.0),
    )

    def __init__(self) -> None:
        self._dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST)

    def after(self, ctx: PluginContext) -> np.ndarray | None:
        assert ctx.output is not None
        image = ctx.image if ctx.image is not None else ctx.output
        previous_input = ctx.state.get("input")
        previous_output = ctx.state.get("output")
        result = ctx.output
        if previous_input is not None and previous_input.shape == image.shape and \
                previous_output is not None and previous_output.shape == ctx.output.shape:
            result = self._blend(image, previous_input, previous_output, ctx.output, ctx.params)
        ctx.state["input"] = image
        ctx.state["output"] = result
        return result

    def _blend(self, image: np.ndarray, previous_input: np.ndarray, previous_output: np.ndarray,
               output: np.ndarray, params: dict) -> np.ndarray:
        height, width = image.shape[:2]
        # Flow from the current frame back to the previous one, at half size: where each pixel came from.
        current_grey = cv2.cvtColor(cv2.resize(image, (width // 2, height // 2)), cv2.COLOR_RGB2GRAY)
        previous_grey = cv2.cvtColor(cv2.resize(previous_input, (width // 2, height // 2)), cv2.COLOR_RGB2GRAY)
        flow = self._dis.calc(current_grey, previous_grey, None)
        flow = cv2.resize(flow, (width, height)) * 2.0
        grid_x, grid_y = np.meshgrid(np.arange(width, dtype=np.float32), np.arange(height, dtype=np.float32))
        map_x, map_y = grid_x + flow[..., 0], grid_y + flow[..., 1]
        warped_output = cv2.remap(previous_output, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        warped_input = cv2.remap(previous_input, map_x, map_y, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
        error = np.abs(warped_input.astype(np.int16) - image.astype(np.int16)).mean(axis=2)
        weight = (error < params["occlusion"]).astype(np.float32) * float(params["strength"])
        weight = cv2.GaussianBlur(weight, (0, 0), 2)[..., None]  # soft mask edges: no seams
        # Rounded: truncated, each frame lost half a level on average, fed back as the next previous output, and a
        # still scene went 9 levels darker at strength 0.95 (QA 71 F2).
        return (warped_output * weight + output * (1.0 - weight) + 0.5).astype(np.uint8)
