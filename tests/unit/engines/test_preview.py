"""The preview engine: each effect's shape, dtype and blend, and the live txt2img pattern.

Correctness only; frames/s go to benchmarks/bench_preview.py.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sdbridge.engines.base import StreamState, create_engine
from sdbridge.engines.preview import EFFECTS, PreviewEngine
from sdbridge.params import PREVIEW_EFFECTS

WIDTH, HEIGHT = 96, 64  # not square, not a multiple of the reduced sizes: catches swapped axes


def frames(batch: int = 2) -> torch.Tensor:
    """uint8 ``[B, H, W, 3]``: gradients with a bright disc, different per image."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    images = []
    for index in range(batch):
        image = np.stack([x * 255 // WIDTH, y * 255 // HEIGHT, np.full_like(x, 60 * index)], axis=-1)
        image[(x - 30 - 10 * index) ** 2 + (y - 32) ** 2 < 15**2] = (250, 240, 20)
        images.append(np.clip(image + rng.integers(0, 8, image.shape), 0, 255))
    return torch.from_numpy(np.stack(images).astype(np.uint8))


def engine(effect: str = "cartoon", strength: float = 1.0, **kwargs) -> PreviewEngine:
    made = PreviewEngine(**kwargs)
    made.prepare({"width": WIDTH, "height": HEIGHT, "effect": effect, "strength": strength})
    return made


def states(count: int) -> list[StreamState]:
    return [StreamState(f"s{index}") for index in range(count)]


def test_effects_match_the_parameter_schema():
    assert tuple(EFFECTS) == PREVIEW_EFFECTS
    assert isinstance(create_engine("preview"), PreviewEngine) and PreviewEngine.name == "preview"
    assert not PreviewEngine.needs_model


@pytest.mark.parametrize("effect", list(EFFECTS))
def test_full_strength_changes_the_image(effect):
    inputs = frames()
    out = engine(effect, 1.0).step(inputs, states(2))
    assert out.shape == inputs.shape and out.dtype == torch.uint8 and out.device.type == "cpu"
    for image, original in zip(out, inputs):
        assert (image.int() - original.int()).abs().float().mean() > 5, effect


@pytest.mark.parametrize("effect", list(EFFECTS))
def test_zero_strength_is_the_input(effect):
    inputs = frames()
    assert torch.equal(engine(effect, 0.0).step(inputs, states(2)), inputs)


@pytest.mark.parametrize("effect", list(EFFECTS))
def test_half_strength_lies_between(effect):
    inputs = frames(1)
    full = engine(effect, 1.0).step(inputs, states(1)).int()
    half = engine(effect, 0.5).step(inputs, states(1)).int()
    expected = (inputs.int() + full) / 2
    assert (half - expected).abs().max() <= 1


def test_the_input_is_not_modified():
    inputs = frames()
    copy = inputs.clone()
    for effect in EFFECTS:
        engine(effect, 0.7).step(inputs, states(2))
    assert torch.equal(inputs, copy)


def test_images_in_a_batch_are_processed_separately():
    inputs = frames(2)
    together = engine("edges").step(inputs, states(2))
    alone = engine("edges").step(inputs[1:], states(1))
    assert torch.equal(together[1], alone[0])


def test_prepare_switches_the_effect():
    made = engine("grade")
    graded = made.step(frames(1), states(1))
    made.prepare({"width": WIDTH, "height": HEIGHT, "effect": "sketch", "strength": 1.0})
    sketched = made.step(frames(1), states(1))
    assert not torch.equal(graded, sketched)
    assert torch.all(sketched[..., 0] == sketched[..., 1])  # pencil is grey


def test_txt2img_pattern_moves_with_time():
    now = [100.0]
    made = engine(clock=lambda: now[0])
    first = made.step(None, states(2))
    assert first.shape == (2, HEIGHT, WIDTH, 3) and first.dtype == torch.uint8
    assert torch.equal(made.step(None, states(2)), first)  # same time, same frame
    now[0] += 0.5
    later = made.step(None, states(2))
    assert (later.int() - first.int()).abs().float().mean() > 3
    assert not torch.equal(first[0], first[1])  # sessions get their own phase


def test_txt2img_keeps_a_session_pattern_whatever_its_place_in_the_batch():
    made = engine(clock=lambda: 5.0)
    a, b = StreamState("a"), StreamState("b")
    assert torch.equal(made.step(None, [a, b])[0], made.step(None, [b, a])[1])


def test_txt2img_follows_the_resolution():
    made = PreviewEngine()
    made.prepare({"width": 64, "height": 128, "effect": "cartoon", "strength": 1.0})
    assert made.step(None, states(1)).shape == (1, 128, 64, 3)
