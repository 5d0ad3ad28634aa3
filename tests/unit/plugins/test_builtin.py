"""The built-in temporal plugins, each on frames made in code."""

from __future__ import annotations

import numpy as np
import torch

from sdbridge.params import ParamStore, Schema
from sdbridge.plugins.flow_warp import FlowWarp
from sdbridge.plugins.latent_feedback import LatentFeedback
from sdbridge.plugins.manager import PluginManager
from sdbridge.plugins.similarity import SimilarityFilter


def texture(shift: int = 0, size: int = 128) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (size, size + 32, 3), dtype=np.uint8)
    import cv2

    base = cv2.GaussianBlur(base, (0, 0), 2)
    return np.ascontiguousarray(base[:, 16 - shift:16 - shift + size])


def manager_with(cls, **values):
    store = ParamStore(Schema())
    manager = PluginManager(store, {cls.name: cls})
    store.update({f"plugin.{cls.name}.enabled": True, **{f"plugin.{cls.name}.{k}": v for k, v in values.items()}})
    manager.prepare(store.snapshot()[1])
    return manager


def test_similarity_skips_a_still_input_and_runs_on_change():
    manager = manager_with(SimilarityFilter, threshold=0.98, max_skips=3)
    state: dict = {}
    still = texture()
    assert manager.before("s", state, still)[0] is None       # first frame runs
    manager.after("s", state, still, still + 1)               # its output is remembered
    skipped, _ = manager.before("s", state, still.copy())
    assert skipped is not None and (skipped == still + 1).all()
    assert manager.before("s", state, 255 - still)[0] is None  # a real change runs
    # A still input is refreshed after max_skips frames.
    manager.after("s", state, still, still)
    results = [manager.before("s", state, 255 - still)[0] is None for _ in range(5)]
    assert results == [False, False, False, True, False]


def test_latent_feedback_blends_with_the_previous_frame():
    manager = manager_with(LatentFeedback, strength=0.25)
    state: dict = {}
    first = manager.on_latents(torch.zeros(1, 4, 2, 2), ["s"], [state])
    assert torch.equal(first, torch.zeros(1, 4, 2, 2))
    second = manager.on_latents(torch.ones(1, 4, 2, 2), ["s"], [state])
    assert torch.allclose(second, torch.full((1, 4, 2, 2), 0.75))


def test_latent_feedback_keeps_a_copy_of_the_first_frame():
    """The first frame's latents are kept as a copy: the engine's batch they are a view of is written again
    afterwards (under CUDA graphs the next replay overwrites the graph's outputs)."""
    manager = manager_with(LatentFeedback, strength=0.25)
    states: list[dict] = [{}, {}]
    batch = torch.zeros(2, 4, 2, 2)
    manager.on_latents(batch, ["s", "t"], states)
    batch.fill_(5.0)  # the graph's output buffer, written by the next replay
    second = manager.on_latents(torch.ones(2, 4, 2, 2), ["s", "t"], states)
    assert torch.allclose(second, torch.full((2, 4, 2, 2), 0.75))


def test_flow_warp_carries_the_previous_output_along_the_motion():
    manager = manager_with(FlowWarp, strength=0.9, occlusion=40.0)
    state: dict = {}
    previous_input, current_input = texture(0), texture(4)       # the scene pans right by 4 px
    previous_output = 255 - previous_input                       # some stylised output
    manager.after("s", state, previous_input, previous_output)
    fresh_output = np.full_like(previous_output, 128)            # a new output that ignores the past
    out = manager.after("s", state, current_input, fresh_output)
    expected = 255 - current_input                               # the old output, moved with the scene
    inner = (slice(16, -16), slice(16, -16))
    error_moved = np.abs(out[inner].astype(int) - (0.9 * expected[inner] + 0.1 * 128)).mean()
    error_unmoved = np.abs(out[inner].astype(int) - (0.9 * previous_output[inner] + 0.1 * 128)).mean()
    assert error_moved < error_unmoved / 2


def test_flow_warp_keeps_the_new_output_where_the_scene_cut():
    manager = manager_with(FlowWarp, strength=0.9, occlusion=10.0)
    state: dict = {}
    manager.after("s", state, texture(0), np.zeros((128, 128, 3), np.uint8))
    cut = np.full((128, 128, 3), 255, np.uint8)                  # a hard cut: nothing matches
    new_output = np.full((128, 128, 3), 200, np.uint8)
    out = manager.after("s", state, cut, new_output)
    assert np.abs(out.astype(int) - 200).mean() < 5


def test_feedback_loop_mixes_the_transformed_last_output_into_the_input():
    from sdbridge.engines.base import LAST_OUTPUT
    from sdbridge.plugins.feedback_loop import FeedbackLoop, transform

    manager = manager_with(FeedbackLoop, strength=0.5, zoom=1.0)
    state: dict = {}
    camera = texture()
    skipped, first = manager.before("s", state, camera)
    assert skipped is None and first is camera                 # a first frame: nothing to feed back yet
    state[LAST_OUTPUT] = output = 255 - camera
    _, mixed = manager.before("s", state, camera)
    assert np.abs(mixed.astype(int) - 127).max() <= 1           # half the input, half its negative
    manager = manager_with(FeedbackLoop, strength=1.0, zoom=1.0, shift_x=0.25)
    _, moved = manager.before("s", {LAST_OUTPUT: output}, camera)
    assert np.array_equal(moved[:, 40:], output[:, 8:-32])      # the output alone, 32 px (a quarter) right
    square = np.zeros((64, 64, 3), np.uint8)
    square[24:40, 24:40] = 255
    area = int((transform(square, 2.0, 0.0, 0.0, 0.0) > 127).sum())
    assert abs(area / (4 * int((square > 127).sum())) - 1) < 0.1   # zoom 2: 4x the area (to a pixel's edge)
    turned = transform(square, 1.0, 45.0, 0.0, 0.0)
    assert turned[32, 32].min() == 255 and turned[24, 24].max() < 128   # a diamond: its old corner is outside


def test_a_plugin_that_sets_an_input_of_another_shape_is_turned_off():
    from sdbridge.plugins.base import Plugin

    class Broken(Plugin):
        name = "broken"

        def before(self, ctx):
            ctx.image = ctx.image[:8]
            return None

    reports = []
    store = ParamStore(Schema())
    manager = PluginManager(store, {"broken": Broken}, report=lambda session, message: reports.append(message))
    store.update({"plugin.broken.enabled": True})
    manager.prepare(store.snapshot()[1])
    camera = texture()
    skipped, image = manager.before("s", {}, camera)
    assert skipped is None and image is camera  # the input as it came: the plugin is off for this session
    assert reports and reports[0]["code"] == "plugin_failed"
    assert "expected an image of shape (128, 128, 3) uint8" in reports[0]["message"]


def test_similarity_sees_a_fade_and_a_held_flat_frame():
    """The pattern alone is blind to brightness: a texture fading to black kept being skipped, and a blackout
    held still (no pattern at all) was never skipped (QA 26)."""
    manager = manager_with(SimilarityFilter, threshold=0.98, max_skips=100)
    state: dict = {}
    still = texture()
    assert manager.before("s", state, still)[0] is None
    manager.after("s", state, still, still)
    ran = [manager.before("s", state, (still * (1 - step / 20)).astype(np.uint8))[0] is None for step in range(1, 11)]
    assert sum(ran) >= 4    # a fade to half in 10 frames: 2.5 % of brightness a frame runs the engine
    low_contrast = (128 + (still.astype(np.int16) - 128) * 0.9).astype(np.uint8)   # the same mean, 10 % less contrast
    state = {}
    assert manager.before("s", state, still)[0] is None
    manager.after("s", state, still, still)
    assert manager.before("s", state, low_contrast)[0] is None
    black, grey = np.zeros_like(still), np.full_like(still, 128)
    state = {}
    assert manager.before("s", state, black)[0] is None
    manager.after("s", state, black, black)
    assert manager.before("s", state, black.copy())[0] is not None   # a blackout held: skipped
    assert manager.before("s", state, grey)[0] is None                # then a flat grey: a change
    manager.after("s", state, grey, grey)
    assert manager.before("s", state, still)[0] is None               # and a picture after it


def test_similarity_at_threshold_one_skips_the_same_frame():
    manager = manager_with(SimilarityFilter, threshold=1.0, max_skips=5)
    state: dict = {}
    still = texture()
    assert manager.before("s", state, still)[0] is None
    manager.after("s", state, still, still)
    assert manager.before("s", state, still.copy())[0] is not None    # float32 rounding made it 0.99999994
    assert manager.before("s", state, texture(shift=1))[0] is None


def test_similarity_skips_no_frame_the_feedback_loop_mixed():
    """A skipped frame leaves the last output as it was, so the next mix was the same and the tunnel stood still
    for max_skips frames at a time (QA 26: 21 of 23 skipped)."""
    from sdbridge.engines.base import LAST_OUTPUT
    from sdbridge.plugins.feedback_loop import FeedbackLoop

    store = ParamStore(Schema())
    manager = PluginManager(store, {"feedback_loop": FeedbackLoop, "similarity": SimilarityFilter})
    store.update({"plugin.feedback_loop.enabled": True, "plugin.similarity.enabled": True})
    manager.prepare(store.snapshot()[1])
    state: dict = {}
    camera = texture()
    skipped = 0
    for _ in range(12):   # the identity engine: each output is the input it ran on
        output, image = manager.before("s", state, camera)
        skipped += output is not None
        state[LAST_OUTPUT] = manager.after("s", state, image, image if output is None else output)
    assert skipped == 0
    store.update({"plugin.feedback_loop.strength": 0.0})   # no mix: a still camera is skipped again
    manager.prepare(store.snapshot()[1])
    results = [manager.before("s", state, camera)[0] is not None for _ in range(3)]
    assert results[1:] == [True, True]


def test_flow_warp_keeps_a_still_scene_s_brightness():
    """The blend was truncated to uint8 and fed back as the next frame's previous output: a still scene under an
    engine output noisy around its mean went 0.5, 2 and 9.4 levels darker at strength 0.5, 0.8 and 0.95 (QA 71 F2)."""
    store = ParamStore(Schema())
    manager = PluginManager(store, {"flow_warp": FlowWarp})
    store.update({"plugin.flow_warp.enabled": True, "plugin.flow_warp.strength": 0.95})
    manager.prepare(store.snapshot()[1])
    rng = np.random.default_rng(1)
    still = np.full((64, 64, 3), 100, np.uint8)
    state: dict = {}
    engine_means, out_means = [], []
    for index in range(150):
        engine_out = np.clip(rng.normal(128, 6, still.shape), 0, 255).round().astype(np.uint8)
        out = manager.after("s", state, still, engine_out)
        if index >= 50:
            engine_means.append(engine_out.mean())
            out_means.append(out.mean())
    assert abs(np.mean(out_means) - np.mean(engine_means)) < 1.0
