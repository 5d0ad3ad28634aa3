"""A1111 infotext: written as its web UI writes it, read back as its PNG Info tab reads it."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from sdbridge.bridge import pnginfo
from sdbridge.errors import CodecError

# Written by AUTOMATIC1111 1.10 (its docs' example image), byte for byte.
A1111_TEXT = (
    "masterpiece, best quality, (a cat:1.2) in a hat\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 3735928559, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.7, "
    'Lora hashes: "add_detail: 7c6bad76eb54, more_art: 1a2b3c", Version: v1.10.1'
)


def test_a1111_text_parses() -> None:
    parsed = pnginfo.parse_infotext(A1111_TEXT)
    assert parsed["Prompt"] == "masterpiece, best quality, (a cat:1.2) in a hat"
    assert parsed["Negative prompt"] == "lowres, bad anatomy"
    assert parsed["Steps"] == "20"
    assert parsed["Sampler"] == "DPM++ 2M"
    assert parsed["Schedule type"] == "Karras"
    assert parsed["Seed"] == "3735928559"
    assert (parsed["Size-1"], parsed["Size-2"]) == ("512", "768")
    assert parsed["Lora hashes"] == "add_detail: 7c6bad76eb54, more_art: 1a2b3c"
    assert parsed["Version"] == "v1.10.1"


def test_written_text_round_trips() -> None:
    params = {"Steps": 4, "Sampler": "Euler a", "CFG scale": 1.5, "Seed": 42, "Size": "64x64", "Model": "a, b",
              "Denoising strength": None}
    text = pnginfo.infotext("a cat\non two lines", "blurry, dark", params)
    assert "Denoising strength" not in text
    parsed = pnginfo.parse_infotext(text)
    assert parsed["Prompt"] == "a cat\non two lines"
    assert parsed["Negative prompt"] == "blurry, dark"
    assert parsed["Model"] == "a, b"           # a comma in a value is quoted, as A1111 does
    assert parsed["CFG scale"] == "1.5"
    assert parsed["Seed"] == "42"


def test_a_prompt_alone_is_all_prompt() -> None:
    parsed = pnginfo.parse_infotext("just a prompt, with: a colon")
    assert parsed["Prompt"] == "just a prompt, with: a colon"
    assert parsed["Negative prompt"] == ""


def test_a_long_line_without_pairs_is_read_in_linear_time() -> None:
    """A1111's pair pattern tried every start of a colon-less line to its end: 1.9 s for 20 kB, on the event loop
    (QA 53 F0). 60 kB now take tens of milliseconds; the bound is 50 times that, for a loaded machine."""
    import time

    text = "a cat\n" + "a " * 30_000
    started = time.perf_counter()
    parsed = pnginfo.parse_infotext(text)
    assert time.perf_counter() - started < 2.0
    assert parsed["Prompt"] == text.strip()


def test_a_settings_line_past_the_bound_is_prompt() -> None:
    pairs = "Steps: 20, Sampler: Euler, Seed: 1, "
    long_line = pairs * (pnginfo.MAX_SETTINGS_LINE // len(pairs) + 1)
    parsed = pnginfo.parse_infotext("a cat\n" + long_line)
    assert "Steps" not in parsed and parsed["Prompt"] == "a cat\n" + long_line.strip()
    assert pnginfo.parse_infotext("a cat\n" + pairs)["Seed"] == "1"


def test_png_carries_the_parameters_chunk() -> None:
    image = np.random.default_rng(0).integers(0, 255, (16, 24, 3), dtype=np.uint8)
    data = pnginfo.encode_png(image, A1111_TEXT)
    opened = Image.open(io.BytesIO(data))
    assert opened.info["parameters"] == A1111_TEXT          # the chunk A1111 and its readers use
    assert np.array_equal(np.asarray(opened.convert("RGB")), image)
    text, items = pnginfo.read_info(data)
    assert text == A1111_TEXT and items == {}


def test_a_png_without_parameters_and_a_bad_file() -> None:
    plain = pnginfo.encode_png(np.zeros((4, 4, 3), np.uint8))
    assert pnginfo.read_info(plain) == (None, {})
    with pytest.raises(CodecError):
        pnginfo.read_info(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)


def test_keys_with_hyphens_and_slashes() -> None:
    # Extension keys as ADetailer and CFG Rescale write them; A1111's re_param_code takes '-' and '/'.
    text = ("a cat\nSteps: 20, ADetailer x-offset: 0, CFG-Rescale phi: 0.7, Hires/upscaler: Latent, "
            "Seed: 1")
    parsed = pnginfo.parse_infotext(text)
    assert parsed["ADetailer x-offset"] == "0"
    assert parsed["CFG-Rescale phi"] == "0.7"
    assert parsed["Hires/upscaler"] == "Latent"
    assert "offset" not in parsed and "Rescale phi" not in parsed
    assert parsed["Seed"] == "1"


@pytest.mark.parametrize("form, magic", [("jpg", b"\xff\xd8\xff"), ("JPEG", b"\xff\xd8\xff"), ("webp", b"RIFF")])
def test_a_jpeg_or_webp_sample_carries_its_parameters_in_the_exif_user_comment(form, magic) -> None:
    """As A1111 writes them (piexif's UserComment, UTF-16 behind "UNICODE"), so its png-info reads them back."""
    image = np.full((16, 24, 3), 120, np.uint8)
    data = pnginfo.encode_sample(image, A1111_TEXT + ", Note: café ✓", form, 90)
    assert data.startswith(magic) and Image.open(io.BytesIO(data)).size == (24, 16)
    comment = Image.open(io.BytesIO(data)).getexif().get_ifd(0x8769)[0x9286]
    assert comment.startswith(b"UNICODE\x00")
    assert pnginfo.read_info(data) == (A1111_TEXT + ", Note: café ✓", {})


def test_sample_quality_and_format() -> None:
    noisy = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    assert len(pnginfo.encode_sample(noisy, "a", "jpg", 95)) > len(pnginfo.encode_sample(noisy, "a", "jpg", 20))
    assert pnginfo.encode_sample(noisy, "a", "png") == pnginfo.encode_png(noisy, "a")
    with pytest.raises(CodecError, match="image format 'gif' is not one of png, jpg, jpeg, webp"):
        pnginfo.encode_sample(noisy, "a", "gif")
