"""Images in and out of bytes: JPEG/PNG with OpenCV, raw RGB8/RGBA8, and fitting to a size.

OpenCV's libjpeg-turbo is as fast as simplejpeg and PyTurboJPEG on these machines (RECIPES.md),
and it is already a dependency. Every array here is RGB uint8 ``[H, W, 3]``. Runs in the
worker's CPU pool (OpenCV releases the GIL), never on the event loop.
"""

from __future__ import annotations

import os

import cv2
import numpy as np

from sdbridge.bridge.protocol import JPEG_MAGIC, MAX_DIMENSION, PNG_MAGIC, FrameHeader, PixelFormat, sniff
from sdbridge.errors import CodecError

RESIZE_MODES = ("crop", "fit", "stretch")
_JPEG_END = b"\xff\xd9"
# A camera's JPEG has a dozen segments before its frame header, a long ICC profile a few dozen (64 KiB each).
MAX_JPEG_MARKERS = 1000
_PNG_END = b"IEND\xaeB`\x82"  # the IEND chunk's type and its (fixed) CRC
# A JPEG decoded straight to RGB (OpenCV >= 4.10), EXIF orientation unapplied as IMREAD_UNCHANGED leaves it.
_JPEG_TO_RGB = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION if hasattr(cv2, "IMREAD_COLOR_RGB") else None


def _quiet_opencv_log() -> None:
    """OpenCV's own logger down to errors, once, unless the user set OPENCV_LOG_LEVEL. A malformed PNG otherwise
    writes an unstructured line into the daemon's log ("[ WARN:1@58.440] global grfmt_png.cpp:834 read_chunk user
    chunk data is too large", QA 9 #8c) for a frame that is already answered ``bad_image`` and counted. libjpeg's
    "Corrupt JPEG data" lines do not pass through this logger and stay (see decode_image)."""
    if "OPENCV_LOG_LEVEL" in os.environ:
        return
    logging_module = getattr(getattr(cv2, "utils", None), "logging", None)  # cv2.utils.logging: 4.5 and later
    if logging_module is not None:
        logging_module.setLogLevel(logging_module.LOG_LEVEL_ERROR)


_quiet_opencv_log()


def check_size(width: int, height: int, what: str) -> None:
    if width > MAX_DIMENSION or height > MAX_DIMENSION:
        raise CodecError(f"{what} is {width}x{height}, larger than {MAX_DIMENSION} per side")


def _jpeg_size(data: memoryview) -> tuple[int, int] | None:
    """Width and height from a JPEG's SOF marker, without decoding (bounds memory before decode).

    Walks the marker segments by their lengths (a few steps, whatever the file's size); None when
    no SOF comes before the image data, which no decodable JPEG does. The walk runs on the event loop,
    so it stops at MAX_JPEG_MARKERS: 64 MiB of two-byte markers took 3.5 s there, stalling every client (QA 51).
    """
    index = 2
    for _ in range(MAX_JPEG_MARKERS):
        if index + 9 >= len(data):
            return None
        if data[index] != 0xFF:
            return None
        marker = data[index + 1]
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            index += 2
            continue
        length = int.from_bytes(data[index + 2:index + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            height = int.from_bytes(data[index + 5:index + 7], "big")
            width = int.from_bytes(data[index + 7:index + 9], "big")
            return width, height
        index += 2 + length
    raise CodecError(f"JPEG data has more than {MAX_JPEG_MARKERS} marker segments before its frame header "
                     f"({len(data)} bytes)")


# Zero padding read past after a JPEG's end marker: a capture card's or hardware encoder's buffer (4 KiB-aligned, a
# frame's worth at most). More is a cut or hostile file, and reading it held the loop (64 MiB: 1 s).
MAX_JPEG_PADDING = 1 << 20


def _ends_whole(data: bytes | bytearray | memoryview) -> bool:
    """Whether ``data`` ends with the end-of-image marker, or with it and up to MAX_JPEG_PADDING zeros: only 62
    bytes of padding were read past, and a JPEG padded to its buffer was refused as cut (QA 62 F4)."""
    if bytes(data[-len(_JPEG_END):]) == _JPEG_END:
        return True
    tail = bytes(data[-(MAX_JPEG_PADDING + len(_JPEG_END)):])
    end = tail.rfind(_JPEG_END) + len(_JPEG_END)
    return end >= len(_JPEG_END) and tail.count(0, end) == len(tail) - end


def check_encoded(data: bytes | bytearray | memoryview) -> str:
    """"jpeg" or "png" when ``data`` is a whole file of a size we accept; CodecError otherwise.

    Byte checks only, no decoding: cheap enough for the event loop, so that a cut or oversized
    file is answered when it arrives, even if a newer frame replaces it before the worker decodes.
    Truncation is caught before OpenCV sees the data: libjpeg decodes a cut JPEG "successfully"
    into a grey lower half, and both libraries print warnings to stderr about it.
    """
    kind = sniff(data)
    if kind == "jpeg":
        # Encoders may pad after the end-of-image marker with zeros; anything else is a cut file.
        if not _ends_whole(data):
            raise CodecError(f"JPEG data is truncated ({len(data)} bytes, no end-of-image marker)")
        size = _jpeg_size(memoryview(data))
        if size is None:
            raise CodecError(f"JPEG data could not be decoded ({len(data)} bytes, no frame header before "
                             f"the image data)")
        check_size(size[0], size[1], "JPEG")
    elif kind == "png":
        if not bytes(data[-len(_PNG_END):]) == _PNG_END:
            raise CodecError(f"PNG data is truncated ({len(data)} bytes, no IEND chunk at the end)")
        size = encoded_size(data)
        if size is not None:
            check_size(size[0], size[1], "PNG")
    else:
        raise CodecError(f"{len(data)} bytes are neither a JPEG nor a PNG file (first bytes "
                         f"{bytes(data[:4]).hex(' ') or 'none'})")
    return kind


def encoded_size(data: bytes | bytearray | memoryview) -> tuple[int, int] | None:
    """(width, height) of a JPEG or PNG file from its header bytes (no decoding); None if they do not say."""
    kind = sniff(data)
    if kind == "jpeg":
        return _jpeg_size(memoryview(data))
    if kind == "png" and len(data) >= 24:  # IHDR: width and height, big-endian, at bytes 16..24
        return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    return None


def decode_image(data: bytes | bytearray | memoryview) -> np.ndarray:
    """A JPEG or PNG file -> RGB uint8 ``[H, W, 3]``, contiguous; CodecError unless it decodes in full.

    A file that ends well but is corrupt inside still decodes (with libjpeg's "Corrupt JPEG data"
    line on stderr, which OpenCV gives no per-call way to silence).
    """
    kind = check_encoded(data)
    buffer = np.frombuffer(data, np.uint8)  # no copy of a memoryview payload
    # libjpeg writes RGB itself: no BGR -> RGB pass over the frame after it (QA 35)
    to_rgb = kind == "jpeg" and _JPEG_TO_RGB is not None
    try:
        image = cv2.imdecode(buffer, _JPEG_TO_RGB if to_rgb else cv2.IMREAD_UNCHANGED)
    except cv2.error as exc:
        raise CodecError(f"{kind.upper()} data could not be decoded ({len(buffer)} bytes): "
                         f"{str(exc).strip().splitlines()[-1][:200]}") from exc
    if image is None or image.size == 0:
        raise CodecError(f"{kind.upper()} data could not be decoded ({len(buffer)} bytes)")
    check_size(image.shape[1], image.shape[0], kind.upper())  # the headers above may not have said
    if image.dtype != np.uint8:  # 16-bit PNG
        image = (image >> 8).astype(np.uint8)
    if to_rgb:
        return image
    if image.ndim == 2:
        return cv2.cvtColor(image, cv2.COLOR_GRAY2RGB)
    if image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2RGB)
    if image.shape[2] == 2:  # grey + alpha, should OpenCV ever keep it
        return cv2.cvtColor(np.ascontiguousarray(image[:, :, 0]), cv2.COLOR_GRAY2RGB)
    return cv2.cvtColor(image, cv2.COLOR_BGR2RGB)


def decode_raw(payload: bytes | memoryview, width: int, height: int, pixel_format: PixelFormat,
               bottom_up: bool = False) -> np.ndarray:
    """Raw RGB8/RGBA8 rows -> RGB uint8 ``[H, W, 3]`` (top-down)."""
    channels = pixel_format.channels
    if channels is None:
        raise CodecError(f"{pixel_format.name} is not a raw pixel format")
    check_size(width, height, f"{pixel_format.name} frame")
    expected = width * height * channels
    if len(payload) != expected:
        raise CodecError(f"{pixel_format.name} frame {width}x{height} needs {expected} bytes, got {len(payload)}")
    rows = np.frombuffer(payload, np.uint8).reshape(height, width, channels)
    if channels == 4:
        # One pass to a contiguous RGB array: the strided [..., :3] view (flipped too) made the batch's np.stack
        # copy it byte by byte, 1.4 ms a frame at 512x512 and 2.8 ms at 1024x576 (QA 35).
        image = cv2.cvtColor(rows, cv2.COLOR_RGBA2RGB)
        return cv2.flip(image, 0, dst=image) if bottom_up else image
    return cv2.flip(rows, 0) if bottom_up else rows


def decode_frame(header: FrameHeader | None, payload: bytes | memoryview) -> np.ndarray:
    """A received frame (bare file when ``header`` is None) -> RGB uint8 ``[H, W, 3]``.

    For JPEG/PNG the file's own size wins over the header's width and height (0 or a claim).
    ``BOTTOM_UP`` flips any format, so that a flipped reply matches a flipped input.
    """
    if header is None or not header.pixel_format.is_raw:
        image = decode_image(payload)
        if header is not None and header.bottom_up:
            image = image[::-1]
        return image
    return decode_raw(payload, header.width, header.height, header.pixel_format, header.bottom_up)


def _check_rgb(image: np.ndarray) -> None:
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, (image.dtype, image.shape)


def encode_jpeg(image: np.ndarray, quality: int = 85) -> bytes:
    """RGB -> JPEG, 4:2:0 set explicitly (library defaults differ; 4:4:4 makes 50 % larger files)."""
    _check_rgb(image)
    bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(quality),
                                          cv2.IMWRITE_JPEG_SAMPLING_FACTOR, cv2.IMWRITE_JPEG_SAMPLING_FACTOR_420])
    if not ok:
        raise CodecError(f"JPEG encoding of a {image.shape} image failed")
    return data.tobytes()


def encode_png(image: np.ndarray, compression: int = 1) -> bytes:
    """RGB -> PNG; compression 1 because speed matters more than size on a live stream."""
    _check_rgb(image)
    bgr = cv2.cvtColor(np.ascontiguousarray(image), cv2.COLOR_RGB2BGR)
    ok, data = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, compression])
    if not ok:
        raise CodecError(f"PNG encoding of a {image.shape} image failed")
    return data.tobytes()


def encode_raw(image: np.ndarray, pixel_format: PixelFormat, bottom_up: bool = False,
               prefix: bytes = b"") -> bytearray:
    """RGB -> raw RGB8 or RGBA8 rows (alpha 255), bottom row first when ``bottom_up``, after ``prefix`` (a reply's
    header). The pixels are written once, into the message itself: the alpha fill, ``tobytes`` and the header's
    concatenation each copied the frame again, 1.6 ms at 512x512 and 3.6 ms at 1024x576 (QA 35)."""
    _check_rgb(image)
    channels = pixel_format.channels
    if channels is None:
        raise CodecError(f"{pixel_format.name} is not a raw pixel format")
    height, width = image.shape[:2]
    message = bytearray(len(prefix) + height * width * channels)
    message[:len(prefix)] = prefix
    out = np.frombuffer(message, np.uint8, offset=len(prefix)).reshape(height, width, channels)
    image = np.ascontiguousarray(image)
    if channels == 4:
        cv2.cvtColor(image, cv2.COLOR_RGB2RGBA, dst=out)  # alpha 255
        if bottom_up:
            cv2.flip(out, 0, dst=out)
    elif bottom_up:
        cv2.flip(image, 0, dst=out)
    else:
        out[...] = image
    return message


def encode_reply(image: np.ndarray, pixel_format: PixelFormat | int, quality: int = 85,
                 bottom_up: bool = False) -> bytes | bytearray:
    """The reply payload in the format the sender asked for; rows bottom-up if it sent them so."""
    pixel_format = PixelFormat(pixel_format)
    if pixel_format.is_raw:
        return encode_raw(image, pixel_format, bottom_up)
    if bottom_up:
        image = np.ascontiguousarray(image[::-1])
    if pixel_format == PixelFormat.PNG:
        return encode_png(image)
    return encode_jpeg(image, quality)


def fit(image: np.ndarray, width: int, height: int, mode: str = "crop") -> np.ndarray:
    """Fit ``image`` to ``width``×``height``: crop (cover, centred), fit (contain, black bars) or stretch.

    Returns ``image`` itself when it already has the size. INTER_AREA when shrinking (no aliasing),
    INTER_LINEAR when growing. Crop cuts the centred region in the input's own pixels before it resizes:
    resizing the whole input first would blow a 4096x1 frame up to 2097152x512 pixels (gigabytes and
    seconds, for every session waiting on the worker) only to throw nearly all of it away.
    """
    _check_target(width, height, mode)
    in_height, in_width = image.shape[:2]
    if (in_width, in_height) == (width, height):
        return image
    if mode == "stretch":
        return _resize(image, width, height)
    if mode == "crop":
        left, top, crop_width, crop_height = _crop_box(in_width, in_height, width, height)
        return _resize(image[top:top + crop_height, left:left + crop_width], width, height)
    left, top, new_width, new_height = _fit_box(in_width, in_height, width, height)
    out = np.zeros((height, width, 3), np.uint8)
    out[top:top + new_height, left:left + new_width] = _resize(image, new_width, new_height)
    return out


def unfit(image: np.ndarray, width: int, height: int, mode: str) -> np.ndarray:
    """Undo :func:`fit`: ``image`` (what a ``width``×``height`` input became, fitted with ``mode``) back at the
    input's size, each of its pixels where the input's pixel it was made from lies (``output_size=input``).

    Stretch stretches back. Fit cuts its bars off and scales the picture back. Crop puts the picture back over the
    region it was cut from; the sides crop cut off were never made, so they are black, as fit's bars are (scaling
    the square back over the whole input would draw a circle 1.8 times as wide as high from a 16:9 webcam: QA 16).
    """
    _check_target(width, height, mode)
    fitted_height, fitted_width = image.shape[:2]
    if (fitted_width, fitted_height) == (width, height):
        return image
    if mode == "stretch":
        return _resize(image, width, height)
    if mode == "fit":
        left, top, inner_width, inner_height = _fit_box(width, height, fitted_width, fitted_height)
        return _resize(image[top:top + inner_height, left:left + inner_width], width, height)
    left, top, crop_width, crop_height = _crop_box(width, height, fitted_width, fitted_height)
    out = np.zeros((height, width, *image.shape[2:]), image.dtype)
    out[top:top + crop_height, left:left + crop_width] = _resize(image, crop_width, crop_height)
    return out


def _check_target(width: int, height: int, mode: str) -> None:
    if mode not in RESIZE_MODES:
        raise CodecError(f"resize mode {mode!r} is not one of {list(RESIZE_MODES)}")
    if not (1 <= width <= MAX_DIMENSION and 1 <= height <= MAX_DIMENSION):
        raise CodecError(f"target size {width}x{height} is not within 1..{MAX_DIMENSION} per side")


def _crop_box(in_width: int, in_height: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, width, height) of the centred region of an ``in_width``×``in_height`` image that crop scales to
    ``width``×``height``: the largest of that aspect ratio."""
    scale = max(width / in_width, height / in_height)
    crop_width = min(in_width, max(1, round(width / scale)))
    crop_height = min(in_height, max(1, round(height / scale)))
    return (in_width - crop_width) // 2, (in_height - crop_height) // 2, crop_width, crop_height


def _fit_box(in_width: int, in_height: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(left, top, width, height) of where fit puts an ``in_width``×``in_height`` image in ``width``×``height``,
    centred between the bars."""
    scale = min(width / in_width, height / in_height)
    new_width, new_height = max(1, round(in_width * scale)), max(1, round(in_height * scale))
    return (width - new_width) // 2, (height - new_height) // 2, new_width, new_height


def _resize(image: np.ndarray, width: int, height: int) -> np.ndarray:
    shrinking = width * height < image.shape[0] * image.shape[1]
    return cv2.resize(np.ascontiguousarray(image), (width, height),
                      interpolation=cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR)


__all__ = ["JPEG_MAGIC", "PNG_MAGIC", "RESIZE_MODES", "check_encoded", "decode_frame", "decode_image", "decode_raw",
           "encode_jpeg", "encode_png", "encode_raw", "encode_reply", "encoded_size", "fit", "unfit"]
