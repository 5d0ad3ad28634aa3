"""sdbridge frames for TouchDesigner: numpy and struct only, so it runs in TouchDesigner's Python.

Put this file beside your .toe (or in a Text DAT named ``sdbridge_td``) and call it from the
WebSocket DAT callbacks (``websocket_callbacks.py``). TouchDesigner's ``TOP.numpyArray()`` gives
float32 RGBA with rows bottom-up; sdbridge takes that layout as it is (the BOTTOM_UP flag) and
answers in it, so nothing is flipped on either side. See docs/protocol.md, "Frames".
"""

from __future__ import annotations

import struct

import numpy as np

LAYOUT = struct.Struct("<4sBBBBB3xIQHHI")  # docs/protocol.md: the 32-byte v1 header
JPEG, RGB8, RGBA8, PNG = 0, 1, 2, 3
BOTTOM_UP = 1


def pack_top(pixels: np.ndarray, frame_id: int, client_ts_us: int, reply: int = RGBA8, channel: int = 0) -> bytes:
    """A TOP's pixels (float 0-1 or uint8, bottom-up) as one sdbridge frame; channel 1 sends a
    condition pass (depth, edges) for the ControlNet instead of a frame to stylise.

    [H, W, 4] goes as RGBA8, [H, W, 3] as RGB8; one channel ([H, W] or [H, W, 1], a depth pass
    from a single-channel TOP) goes as grey RGB8, the protocol having no one-channel format."""
    if not isinstance(pixels, np.ndarray):
        # TOP.numpyArray(delayed=True) gives None until its first download is done: skip that frame.
        raise ValueError(f"pixels are {type(pixels).__name__}, not a numpy array (numpyArray(delayed=True) is None "
                         f"on its first call: send nothing until it gives an array)")
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    if pixels.ndim != 3 or pixels.shape[2] not in (1, 3, 4):
        raise ValueError(f"pixels of shape {pixels.shape} are not [H, W], [H, W, 1], [H, W, 3] or [H, W, 4]")
    if 0 in pixels.shape[:2]:
        raise ValueError(f"pixels of shape {pixels.shape} hold no pixel (a TOP of zero width or height)")
    if pixels.dtype != np.uint8 and not np.issubdtype(pixels.dtype, np.floating):
        raise ValueError(f"pixels of dtype {pixels.dtype} are neither float (0-1) nor uint8")
    height, width, channels = pixels.shape
    pixel_format = RGBA8 if channels == 4 else RGB8
    length = height * width * (4 if channels == 4 else 3)
    # Written once, into the message after its header: this runs in TouchDesigner's main thread, where each
    # temporary array and copy of a 1080p frame cost ms of the show's frame (27 ms a frame before, 2 cores).
    message = bytearray(LAYOUT.size + length)
    LAYOUT.pack_into(message, 0, b"SDBF", 1, pixel_format, BOTTOM_UP, channel, reply, frame_id & 0xFFFFFFFF,
                     client_ts_us, width, height, length)
    out = np.frombuffer(message, np.uint8, count=length, offset=LAYOUT.size).reshape(height, width, -1)
    if pixels.dtype == np.uint8:
        out[...] = pixels  # one channel spreads to grey RGB
    else:
        scaled = np.multiply(pixels, 255.0)  # in the TOP's own float type (float32), as before
        scaled += 0.5
        np.clip(scaled, 0.0, 255.0, out=scaled)  # after the scaling, in place: the same bytes as clipping 0-1 first
        np.copyto(out, scaled, casting="unsafe")  # truncates: with the 0.5 above, rounds
    return bytes(message)


def unpack_reply(message: bytes) -> tuple[int, int, np.ndarray]:
    """(frame_id, client_ts_us, float32 RGBA [H, W, 4] bottom-up) from a raw RGBA8 reply,
    ready for ``scriptTOP.copyNumpyArray``."""
    magic, version, pixel_format, flags, _channel, _reply, frame_id, client_ts_us, width, height, length = \
        LAYOUT.unpack_from(message)
    if magic != b"SDBF" or pixel_format != RGBA8:
        raise ValueError(f"not a raw RGBA8 sdbridge reply (magic {magic!r}, format {pixel_format})")
    pixels = np.frombuffer(message, np.uint8, count=length, offset=LAYOUT.size).reshape(height, width, 4)
    return frame_id, client_ts_us, np.divide(pixels, 255.0, dtype=np.float32)  # one pass, no uint8 copy first
