import numpy as np
import pytest

from sdbridge.bridge import codec
from sdbridge.bridge.protocol import Flags, FrameHeader, PixelFormat
from sdbridge.errors import CodecError


def gradient(width: int = 64, height: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 4 % 256, y * 5 % 256, (x + y) % 256], axis=-1).astype(np.uint8)


def test_jpeg_round_trip_is_close_and_420():
    image = gradient()
    data = codec.encode_jpeg(image, 95)
    assert data[:3] == b"\xff\xd8\xff"
    decoded = codec.decode_image(data)
    assert decoded.shape == image.shape and np.abs(decoded.astype(int) - image).mean() < 4
    # 4:2:0: the SOF0 marker lists the first component with sampling factors 2x2 (0x22).
    sof = data.index(b"\xff\xc0")
    assert data[sof + 11] == 0x22


def test_png_round_trip_exact_and_alpha_dropped():
    import cv2

    image = gradient()
    assert np.array_equal(codec.decode_image(codec.encode_png(image)), image)
    rgba = np.dstack([image, np.full(image.shape[:2], 7, np.uint8)])
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    assert np.array_equal(codec.decode_image(data.tobytes()), image)
    ok, grey = cv2.imencode(".png", image[:, :, 0])
    assert codec.decode_image(grey.tobytes()).shape == image.shape


@pytest.mark.parametrize("data, message", [
    (b"", "neither a JPEG nor a PNG"),
    (b"hello world", "neither a JPEG nor a PNG"),
    (b"\xff\xd8\xff\xe0" + bytes(50) + b"\xff\xd9", "could not be decoded"),
    (b"\x89PNG\r\n\x1a\n" + bytes(40), "could not be decoded"),
])
def test_bad_images(data, message):
    with pytest.raises(CodecError, match=message):
        codec.decode_image(data)


def test_truncated_jpeg_is_refused():
    data = codec.encode_jpeg(gradient(), 90)
    with pytest.raises(CodecError, match="truncated"):
        codec.decode_image(data[: len(data) // 2])


def test_oversized_jpeg_refused_before_decoding():
    data = bytearray(codec.encode_jpeg(gradient(16, 16), 90))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (9000).to_bytes(2, "big") + (16).to_bytes(2, "big")  # height 9000
    with pytest.raises(CodecError, match="larger than 8192"):
        codec.decode_image(bytes(data))


def test_raw_rgba_bottom_up():
    image = gradient(4, 3)
    rgba = np.dstack([image, np.full((3, 4), 255, np.uint8)])[::-1]
    decoded = codec.decode_raw(rgba.tobytes(), 4, 3, PixelFormat.RGBA8, bottom_up=True)
    assert np.array_equal(decoded, image)
    assert codec.encode_raw(image, PixelFormat.RGBA8, bottom_up=True) == np.ascontiguousarray(rgba).tobytes()
    with pytest.raises(CodecError, match="needs 48 bytes"):
        codec.decode_raw(bytes(10), 4, 3, PixelFormat.RGBA8)


def test_decode_frame_dispatch():
    image = gradient(4, 2)
    header = FrameHeader(1, PixelFormat.RGB8, Flags.NONE, 0, PixelFormat.JPEG, 1, 0, 4, 2, 24)
    assert np.array_equal(codec.decode_frame(header, image.tobytes()), image)
    assert codec.decode_frame(None, codec.encode_png(image)).shape == (2, 4, 3)


@pytest.mark.parametrize("mode", ["crop", "fit", "stretch"])
def test_fit_sizes(mode):
    out = codec.fit(gradient(100, 50), 64, 64, mode)
    assert out.shape == (64, 64, 3)


def test_fit_bars_are_black_and_crop_keeps_centre():
    image = np.full((50, 100, 3), 200, np.uint8)
    image[:, 40:60] = 10  # a dark band in the centre
    fitted = codec.fit(image, 64, 64, "fit")
    assert fitted[0].max() == 0 and fitted[-1].max() == 0 and fitted[32, 32].max() < 50
    cropped = codec.fit(image, 64, 64, "crop")
    assert cropped[32, 32].max() < 50 and cropped[32, 2].min() > 150


def test_fit_same_size_is_a_no_op():
    image = gradient(64, 64)
    assert codec.fit(image, 64, 64, "crop") is image
    with pytest.raises(CodecError, match="resize mode"):
        codec.fit(image, 32, 32, "zoom")


def test_encode_reply_formats():
    image = gradient(8, 8)
    assert codec.encode_reply(image, PixelFormat.JPEG)[:3] == b"\xff\xd8\xff"
    assert codec.encode_reply(image, PixelFormat.PNG)[:4] == b"\x89PNG"
    assert len(codec.encode_reply(image, PixelFormat.RGB8)) == 8 * 8 * 3
    flipped = codec.decode_image(codec.encode_reply(image, PixelFormat.PNG, bottom_up=True))
    assert np.array_equal(flipped, image[::-1])
