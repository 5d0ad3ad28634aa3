"""A1111's Extras upscale (bridge/a1111_extras.py): sizes, resamplers and crops as A1111's own steps make them."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdbridge.bridge.a1111_extras import ExtrasOptions, UpscaleError, upscale


def picture(width: int, height: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_none_leaves_the_image_as_it_is_even_with_a_second_upscaler():
    image = picture(40, 24)
    out, info = upscale(image, ExtrasOptions(upscaler_1="None", upscaler_2="Lanczos", extras_upscaler_2_visibility=1))
    assert out is image and info == {}


def test_nearest_by_an_integer_factor_repeats_each_pixel():
    image = picture(16, 8)
    out, info = upscale(image, ExtrasOptions(upscaler_1="Nearest", upscaling_resize=2))
    assert np.array_equal(out, image.repeat(2, axis=0).repeat(2, axis=1))
    assert info == {"Postprocess upscale by": 2.0, "Postprocess upscaler": "Nearest"}


def test_the_size_rounds_down_to_a_multiple_of_8_as_a1111s_upscaler_does():
    """50x30 by 1.5 is 75x45, then Lanczos to 72x40 (A1111's Upscaler.upscale: dest = (w * scale) // 8 * 8)."""
    image = picture(50, 30)
    out, _ = upscale(image, ExtrasOptions(upscaler_1="Lanczos", upscaling_resize=1.5))
    assert out.shape == (40, 72, 3)
    once = Image.fromarray(image).resize((75, 45), Image.Resampling.LANCZOS)
    assert np.array_equal(out, np.asarray(once.resize((72, 40), Image.Resampling.LANCZOS)))


def test_scale_to_covers_the_target_then_crops_it_centred():
    """To 100x100 from 50x30: scale 100/30, 166x100 rounded down to 160x96, pasted centred on black: 2 rows of
    black above and below, the sides cropped."""
    image = picture(50, 30)
    options = ExtrasOptions(upscaler_1="Lanczos", resize_mode=1, upscaling_resize_w=100, upscaling_resize_h=100)
    out, info = upscale(image, options)
    assert out.shape == (100, 100, 3)
    assert not out[:2].any() and not out[-2:].any() and out[2:-2].any()
    assert info["Postprocess upscale to"] == "100x100" and info["Postprocess crop to"] == "100x100"
    uncropped, _ = upscale(image, options.model_copy(update={"upscaling_crop": False}))
    assert uncropped.shape == (96, 160, 3)


def test_the_second_upscaler_blends_in_by_its_visibility():
    image = picture(16, 16)
    first, _ = upscale(image, ExtrasOptions(upscaler_1="Nearest"))
    second, _ = upscale(image, ExtrasOptions(upscaler_1="Lanczos"))
    both, info = upscale(image, ExtrasOptions(upscaler_1="Nearest", upscaler_2="Lanczos",
                                              extras_upscaler_2_visibility=0.5))
    expected = (first.astype(float) + second.astype(float)) / 2
    assert np.abs(both.astype(float) - expected).max() <= 1
    assert info["Postprocess upscaler 2"] == "Lanczos"


@pytest.mark.parametrize("fields, words", [
    ({"upscaler_1": "R-ESRGAN 4x+"}, "upscaler_1: unknown upscaler 'R-ESRGAN 4x+'"),
    ({"upscaler_1": "Lanczos", "upscaler_2": "SwinIR"}, "upscaler_2: unknown upscaler 'SwinIR'"),
    ({"upscaler_1": "Lanczos", "gfpgan_visibility": 0.5}, "gfpgan_visibility 0.5: no face restorer"),
    ({"upscaler_1": "Lanczos", "upscaling_resize": 8}, "would be 4096x8200: each side must be within 8..8192"),
])
def test_what_cannot_be_done_is_refused_with_the_value(fields, words):
    image = picture(512, 1025)
    with pytest.raises(UpscaleError) as caught:
        upscale(image, ExtrasOptions(**fields))
    assert words in str(caught.value)
