"""ControlNet slot sources: fitted to the engine's resolution when it moves (QA 63 F5)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from sdbridge.engines.base import CONDITIONS, LAST_OUTPUT, SLOT_IMAGES, StreamState
from sdbridge.engines.compiled import CompiledEngine
from sdbridge.engines.diffusion import DiffusionEngine
from tests.support.controlnets import controlnet_folder
from tests.unit.engines.common import engine_params


@pytest.fixture(scope="module")
def controlnet_dir(parts, tmp_path_factory) -> Path:
    return controlnet_folder(tmp_path_factory.mktemp("controlnet"), parts.unet, edges=1, depth=2)


def make_engine(kind: str, parts, controlnet_dir: Path, values: dict):
    engine = DiffusionEngine.from_parts(parts) if kind == "diffusion" else CompiledEngine.from_parts(parts)
    engine.controlnet_dir = str(controlnet_dir)
    if isinstance(engine, CompiledEngine):
        engine.compile_backend = None  # its eager path (the CPU's)
    engine.prepare(values)
    engine.controlnets.wait()
    return engine


def frame_of(engine, state: StreamState) -> np.ndarray:
    """One txt2img frame as the worker makes it: condition, step, keep the output for channel -1."""
    engine.controlnets.condition(state.data, None)
    out = engine.step(None, [state]).cpu().numpy()[0]
    state.data[LAST_OUTPUT] = out
    return out


@pytest.mark.parametrize("kind", ["diffusion", "compiled"])
def test_txt2img_slots_on_past_frames_follow_a_resolution_change(parts, controlnet_dir, kind):
    """Slot 1 on the session's last output (channel -1), slot 2 on a channel-1 frame decoded at 64²: after a move
    to 96x64 (the quality ladder makes one by itself) frames keep coming, at the new size, each slot acting. The old
    code added a 64² condition to the new latents: a RuntimeError at every frame, for good (QA 63 F5)."""
    slots = dict(mode="txt2img", steps=2, controlnet_1_model="edges", controlnet_1_channel=-1,
                 controlnet_2_model="depth", controlnet_2_channel=1)
    engine = make_engine(kind, parts, controlnet_dir, engine_params(**slots))
    state = StreamState("s")
    condition = np.zeros((64, 64, 3), np.uint8)
    condition[16:48, 16:48] = 255
    state.data[CONDITIONS] = {1: condition}
    for _ in range(2):
        assert frame_of(engine, state).shape == (64, 64, 3)
    engine.prepare(engine_params(width=96, height=64, **slots))
    for _ in range(3):
        assert frame_of(engine, state).shape == (64, 96, 3)
        images = state.data[SLOT_IMAGES]
        assert sorted(images) == [0, 1] and all(image.shape == (64, 96, 3) for image in images.values())
    # Fitted with the stream's resize mode, crop (the default): the middle 64x43 of the 64² frame, scaled by 1.5,
    # puts the square at x 24-72, y 8-56 (stretched, it would be at y 16-48).
    crop = state.data[SLOT_IMAGES][1]
    assert crop[:, :20].max() == 0 and crop[12:52, 28:68].min() == 255 and crop[:, 76:].max() == 0


def test_a_source_is_fitted_with_the_streams_resize_mode(parts, controlnet_dir):
    """fit: the 64² condition as a 64x64 picture between black bars in 96x64; stretch: the square stretched."""
    engine = make_engine("diffusion", parts, controlnet_dir, engine_params(controlnet_1_model="edges",
                                                                           controlnet_1_channel=1))
    condition = np.full((64, 64, 3), 255, np.uint8)
    for mode, bars in (("fit", True), ("stretch", False)):
        engine.prepare(engine_params(width=96, height=64, resize_mode=mode, controlnet_1_model="edges",
                                     controlnet_1_channel=1))
        data = {CONDITIONS: {1: condition}}
        engine.controlnets.condition(data, None)
        image = data[SLOT_IMAGES][0]
        assert image.shape == (64, 96, 3)
        assert (image[:, :16].max() == 0) == bars and image[:, 16:80].min() == 255
