"""Writes the golden frame-header files in this folder. Run once: python tests/data/make_golden.py

The bytes are built here with ``struct`` and literal values, not with sdbridge's own code, so the
tests compare the protocol module against an independent statement of the layout (docs/protocol.md,
"Frames"). Rerunning it must leave the files unchanged (tests/unit/bridge/test_protocol.py checks).
"""

from __future__ import annotations

import struct
from pathlib import Path

LAYOUT = "<4sBBBBB3xIQHHI"  # magic, version, pixel_format, flags, channel, reply_format, 3 reserved,
#                             frame_id, client_ts_us, width, height, payload_length
HERE = Path(__file__).resolve().parent

RGBA8_PIXELS = bytes([255, 0, 0, 255, 0, 255, 0, 255,      # first row sent = bottom row: red, green
                      0, 0, 255, 255, 255, 255, 255, 255])  # second row sent = top row: blue, white


def golden_files() -> dict[str, bytes]:
    return {
        # A 2x2 RGBA8 frame, rows bottom-up, frame 7, ts 1000000 us, reply wanted as RGBA8.
        "frame_rgba8_2x2_bottom_up.bin":
            struct.pack(LAYOUT, b"SDBF", 1, 2, 1, 0, 2, 7, 1_000_000, 2, 2, 16) + RGBA8_PIXELS,
        # The reply header to that frame from an engine at 512x512: same frame id, timestamp and
        # BOTTOM_UP flag, channel 0, pixel_format = the requested RGBA8, 512*512*4 payload bytes.
        "reply_rgba8_512x512_bottom_up_header.bin":
            struct.pack(LAYOUT, b"SDBF", 1, 2, 1, 0, 2, 7, 1_000_000, 512, 512, 512 * 512 * 4),
        # A JPEG frame with size 0x0 (read from the file), frame 42, ts 1000 us, reply wanted as RGB8;
        # the 4-byte payload is a stand-in (SOI + EOI markers), enough for the header's tests.
        "frame_jpeg_header.bin":
            struct.pack(LAYOUT, b"SDBF", 1, 0, 0, 0, 1, 42, 1000, 0, 0, 4) + b"\xff\xd8\xff\xd9",
    }


if __name__ == "__main__":
    for name, data in golden_files().items():
        (HERE / name).write_bytes(data)
        print(f"{name}: {len(data)} bytes")
