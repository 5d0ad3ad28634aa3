"""ControlNet slot sources: fitted to the engine's resolution when it moves (QA 63 F5), and a condition frame held
preprocessed once (QA 63 F4)."""

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


class Counted:
    """A preprocessor that counts its runs."""

    def __init__(self, real) -> None:
        self.real = real
        self.calls = 0

    def __call__(self, image, options):
        self.calls += 1
        return self.real(image, options)


def test_a_condition_frame_held_is_preprocessed_once(parts, controlnet_dir):
    """One channel-1 frame, then input frames: canny runs once for it (it ran at every frame: QA 63 F4, 70 ms at
    1024²), and again for a new frame, a changed option or size; the input frame (channel 0) at every frame. Each
    session keeps its own, in its own data."""
    values = dict(controlnet_1_model="edges", controlnet_1_channel=1, controlnet_1_preprocessor="canny",
                  controlnet_2_model="depth", controlnet_2_channel=0, controlnet_2_preprocessor="invert")
    engine = make_engine("diffusion", parts, controlnet_dir, engine_params(**values))
    controlnets = engine.controlnets
    canny = controlnets.preprocessors.table["canny"] = Counted(controlnets.preprocessors.table["canny"])
    invert = controlnets.preprocessors.table["invert"] = Counted(controlnets.preprocessors.table["invert"])
    rng = np.random.default_rng(0)
    held = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    a, b = {CONDITIONS: {1: held}}, {CONDITIONS: {1: held.copy()}}
    first = None
    for _ in range(5):
        controlnets.condition(a, rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
        first = a[SLOT_IMAGES][0] if first is None else first
        assert a[SLOT_IMAGES][0] is first
    assert (canny.calls, invert.calls) == (1, 5)
    assert np.array_equal(first, canny.real(held, controlnets.slots[0].options))
    controlnets.condition(b, held)
    assert canny.calls == 2  # another session: its own
    a[CONDITIONS][1] = held.copy()  # a new frame on the channel, even with the same pixels
    controlnets.condition(a, held)
    controlnets.condition(a, held)
    assert canny.calls == 3
    engine.prepare(engine_params(**{**values, "controlnet_1_low_threshold": 50}))
    controlnets.condition(a, held)
    controlnets.condition(a, held)
    assert canny.calls == 4
    engine.prepare(engine_params(**{**values, "width": 96}))
    controlnets.condition(a, None)
    controlnets.condition(a, None)
    assert canny.calls == 5 and a[SLOT_IMAGES][0].shape == (64, 96, 3)
    engine.prepare(engine_params(**{**values, "controlnet_1_model": ""}))
    controlnets.condition(a, held)
    assert "controlnet.prepared" not in a  # a slot turned off lets go of its image
