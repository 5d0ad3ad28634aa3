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


def pack_top(rgba: np.ndarray, frame_id: int, client_ts_us: int, reply: int = RGBA8, channel: int = 0) -> bytes:
    """A TOP's pixels (float32 0-1 or uint8, [H, W, 4], bottom-up) as one sdbridge frame; channel 1
    sends a condition pass (depth, edges) for the ControlNet instead of a frame to stylise."""
    if rgba.dtype != np.uint8:
        rgba = (np.clip(rgba, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    height, width = rgba.shape[:2]
    payload = np.ascontiguousarray(rgba[:, :, :4]).tobytes()
    header = LAYOUT.pack(b"SDBF", 1, RGBA8, BOTTOM_UP, channel, reply, frame_id & 0xFFFFFFFF, client_ts_us, width, height,
                         len(payload))
    return header + payload


def unpack_reply(message: bytes) -> tuple[int, int, np.ndarray]:
    """(frame_id, client_ts_us, float32 RGBA [H, W, 4] bottom-up) from a raw RGBA8 reply,
    ready for ``scriptTOP.copyNumpyArray``."""
    magic, version, pixel_format, flags, _channel, _reply, frame_id, client_ts_us, width, height, length = \
        LAYOUT.unpack_from(message)
    if magic != b"SDBF" or pixel_format != RGBA8:
        raise ValueError(f"not a raw RGBA8 sdbridge reply (magic {magic!r}, format {pixel_format})")
    pixels = np.frombuffer(message, np.uint8, count=length, offset=LAYOUT.size).reshape(height, width, 4)
    return frame_id, client_ts_us, pixels.astype(np.float32) / 255.0
