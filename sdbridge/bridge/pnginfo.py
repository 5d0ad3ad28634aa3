"""Generation parameters in PNG files, in AUTOMATIC1111's "infotext" format.

A1111 writes a ``parameters`` text chunk::

    a cat in a hat
    Negative prompt: blurry
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1234, Size: 512x512, Model: sd-turbo, Version: ...

Other tools (its own PNG Info tab, Civitai, ComfyUI importers) read that format back, so ours
writes it byte for byte the same way and :func:`parse_infotext` reads it back as A1111 does:
values with commas are quoted JSON strings; ``Size: 512x512`` also gives ``Size-1``/``Size-2``.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from PIL import Image, PngImagePlugin

from sdbridge.errors import CodecError

# key: value, where value is a quoted string (with escapes) or runs to the next comma. A key starts
# with a word character and may hold spaces, '-' and '/' (extensions write "ADetailer x-offset",
# "CFG-Rescale phi"), as A1111's infotext_utils.re_param_code reads it, but at most 64 characters long: A1111's
# unbounded key tried every start of a long line without a colon to its end, O(n^2), 1.9 s for a 20 kB line on the
# event loop (QA 53 F0); bounded, 64 kB take 40 ms.
_PARAM = re.compile(r'\s*(\w[\w \-/]{1,63}):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
# A settings line longer than this is read as part of the prompt, unparsed; A1111's are a few kB at most.
MAX_SETTINGS_LINE = 64 * 1024
_SIZE = re.compile(r"^(\d+)x(\d+)$")


_EXIF_IFD, _USER_COMMENT = 0x8769, 0x9286  # EXIF's sub-IFD and its UserComment tag


def _quote(value: Any) -> str:
    text = str(value)
    if "," not in text and "\n" not in text and ":" not in text and '"' not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def infotext(prompt: str, negative_prompt: str, params: Mapping[str, Any]) -> str:
    """A1111's text: the prompt, the negative prompt line, then ``Key: value`` pairs (None skipped)."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    pairs = ", ".join(f"{key}: {_quote(value)}" for key, value in params.items() if value is not None)
    lines.append(pairs)
    return "\n".join(lines)


def parse_infotext(text: str) -> dict[str, Any]:
    """Infotext -> a dict of its fields (``Prompt``, ``Negative prompt`` and each pair), as A1111 reads it."""
    out: dict[str, Any] = {}
    lines = text.strip().split("\n")
    last = lines[-1] if lines else ""
    # A1111: a last line with fewer than 3 pairs is part of the prompt
    if len(last) > MAX_SETTINGS_LINE or len(_PARAM.findall(last)) < 3:
        lines.append(last := "")
    prompt_lines: list[str] = []
    negative_lines: list[str] = []
    in_negative = False
    for line in lines[:-1]:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative_lines if in_negative else prompt_lines).append(line)
    out["Prompt"] = "\n".join(prompt_lines)
    out["Negative prompt"] = "\n".join(negative_lines)
    for key, value in _PARAM.findall(last):
        key = key.strip()
        value = value.strip()
        if value.startswith('"') and value.endswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                value = value[1:-1]
        size = _SIZE.match(value) if isinstance(value, str) else None
        if size:
            out[f"{key}-1"], out[f"{key}-2"] = size.group(1), size.group(2)
        out[key] = value
    return out


def encode_png(image: np.ndarray, info: str | None = None, postprocessing: str | None = None) -> bytes:
    """RGB uint8 [H, W, 3] -> PNG bytes, with the ``parameters`` chunk when ``info`` is given, and A1111's
    ``postprocessing`` chunk (what its Extras tab did) when that is."""
    metadata = None
    if info is not None or postprocessing is not None:
        metadata = PngImagePlugin.PngInfo()
        if info is not None:
            metadata.add_text("parameters", info)
        if postprocessing is not None:
            metadata.add_text("postprocessing", postprocessing)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG", pnginfo=metadata, compress_level=4)
    return buffer.getvalue()


def encode_sample(image: np.ndarray, info: str | None, form: str = "png", quality: int = 80) -> bytes:
    """RGB uint8 [H, W, 3] -> a file as A1111 writes a sample (its ``samples_format``): a PNG with the
    ``parameters`` chunk, or a JPEG or WebP (``quality`` 1-100) with them in the EXIF UserComment, as UTF-16
    behind the ``UNICODE`` character code (piexif's ``UserComment.dump(..., encoding="unicode")``)."""
    form = form.lower()
    if form == "png":
        return encode_png(image, info)
    if form not in ("jpg", "jpeg", "webp"):
        raise CodecError(f"image format {form!r} is not one of png, jpg, jpeg, webp")
    exif = Image.Exif()
    exif.get_ifd(_EXIF_IFD)[_USER_COMMENT] = b"UNICODE\x00" + (info or "").encode("utf-16-be")
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="WEBP" if form == "webp" else "JPEG", quality=quality,
                                exif=exif.tobytes())
    return buffer.getvalue()


def read_info(data: bytes) -> tuple[str | None, dict[str, Any]]:
    """(the ``parameters`` text, the other text chunks) of a PNG, JPEG or WebP file's bytes."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # PIL raises many types for bad files
        raise CodecError(f"not a readable image ({len(data)} bytes): {exc}", code="bad_image") from exc
    items = {key: value for key, value in image.info.items() if isinstance(value, str)}
    text = items.pop("parameters", None)
    if text is None and "exif" in image.info:
        text = _exif_comment(image)
    return text, items


def _exif_comment(image: Image.Image) -> str | None:
    """A1111 stores JPEG/WebP parameters in the EXIF UserComment."""
    try:
        comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    except Exception:
        return None
    if isinstance(comment, bytes):
        body = comment[8:]  # the 8-byte character-code prefix
        for encoding in ("utf-16-be", "utf-8"):
            try:
                return body.decode(encoding).rstrip("\x00")
            except UnicodeDecodeError:
                continue
    return comment if isinstance(comment, str) else None
