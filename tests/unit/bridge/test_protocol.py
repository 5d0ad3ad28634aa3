"""The v1 frame header: golden bytes, round trips, one test per error, and property tests."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdbridge.bridge.protocol import (HEADER_SIZE, MAGIC, MAX_DIMENSION, Flags, FrameHeader, PixelFormat,
                                      pack_frame, sniff)
from sdbridge.errors import ProtocolError

DATA = Path(__file__).resolve().parents[2] / "data"
GOLDEN = (DATA / "frame_rgba8_2x2_bottom_up.bin").read_bytes()


def header(**overrides) -> FrameHeader:
    values = dict(version=1, pixel_format=PixelFormat.RGB8, flags=Flags.NONE, channel=0,
                  reply_format=PixelFormat.JPEG, frame_id=1, client_ts_us=2, width=4, height=2, payload_length=24)
    values.update(overrides)
    return FrameHeader(**values)


def test_golden_rgba8_bottom_up():
    parsed, payload = FrameHeader.parse(GOLDEN)
    assert parsed == FrameHeader(1, PixelFormat.RGBA8, Flags.BOTTOM_UP, 0, PixelFormat.RGBA8, 7, 1_000_000, 2, 2, 16)
    assert bytes(payload) == GOLDEN[HEADER_SIZE:]
    assert isinstance(payload, memoryview)  # no copy
    assert parsed.serialize() == GOLDEN[:HEADER_SIZE]
    assert HEADER_SIZE == 32


def test_literal_bytes_of_a_jpeg_header():
    data = bytes.fromhex("53444246 01 00 00 00 01 000000 2a000000 e803000000000000 0000 0000 04000000") + b"\xff\xd8\xff\xd9"
    parsed, payload = FrameHeader.parse(data)
    assert (parsed.pixel_format, parsed.reply_format, parsed.frame_id, parsed.client_ts_us) == \
        (PixelFormat.JPEG, PixelFormat.RGB8, 42, 1000)
    assert bytes(payload) == b"\xff\xd8\xff\xd9"


def test_reply_keeps_id_timestamp_and_row_order():
    parsed, _ = FrameHeader.parse(GOLDEN)
    reply = parsed.reply(PixelFormat.JPEG, 512, 512, 1234)
    assert (reply.frame_id, reply.client_ts_us, reply.flags, reply.channel) == (7, 1_000_000, Flags.BOTTOM_UP, 0)
    assert (reply.pixel_format, reply.width, reply.height, reply.payload_length) == (PixelFormat.JPEG, 512, 512, 1234)


def test_str_is_one_line():
    text = str(FrameHeader.parse(GOLDEN)[0])
    assert "\n" not in text and "frame 7" in text and "bottom-up" in text


def test_sniff():
    assert sniff(GOLDEN) == "header"
    assert sniff(b"\xff\xd8\xff\xe0rest") == "jpeg"
    assert sniff(b"\x89PNG\r\n\x1a\nrest") == "png"
    assert sniff(b"GIF89a") == "unknown" and sniff(b"") == "unknown"


@pytest.mark.parametrize("data, message", [
    (GOLDEN[:10], "shorter than the 32-byte header"),
    (b"XXXX" + GOLDEN[4:], "bad magic"),
    (GOLDEN[:4] + b"\x03" + GOLDEN[5:], "unsupported version 3 (expected 1)"),
    (GOLDEN[:5] + b"\x09" + GOLDEN[6:], "unknown pixel_format 9"),
    (GOLDEN[:6] + b"\x82" + GOLDEN[7:], "unknown flags 0x82"),
    (GOLDEN[:8] + b"\x07" + GOLDEN[9:], "unknown reply_format 7"),
    (GOLDEN + b"extra", "payload is 21 bytes but the header says 16"),
    (GOLDEN[:-1], "payload is 15 bytes but the header says 16"),
])
def test_each_error(data, message):
    with pytest.raises(ProtocolError, match=message.replace("(", r"\(").replace(")", r"\)")):
        FrameHeader.parse(data)


def test_raw_size_must_match_dimensions():
    lying = header(width=4, height=4, payload_length=24)
    with pytest.raises(ProtocolError, match="RGB8 frame 4x4 needs 48 payload bytes, got 24"):
        FrameHeader.parse(lying.serialize() + bytes(24))


def test_zero_and_huge_dimensions():
    with pytest.raises(ProtocolError, match="needs a width and height"):
        FrameHeader.parse(header(width=0, height=0, payload_length=0).serialize())
    with pytest.raises(ProtocolError, match=f"width 9000 exceeds {MAX_DIMENSION}"):
        header(width=9000).check()
    with pytest.raises(ProtocolError, match="empty payload"):
        FrameHeader.parse(header(pixel_format=PixelFormat.JPEG, width=0, height=0, payload_length=0).serialize())


def test_pack_frame_round_trip():
    h = header()
    parsed, payload = FrameHeader.parse(pack_frame(h, bytes(range(24))))
    assert parsed == h and bytes(payload) == bytes(range(24))


headers = st.builds(
    FrameHeader, version=st.just(1), pixel_format=st.sampled_from([PixelFormat.JPEG, PixelFormat.PNG]),
    flags=st.sampled_from([Flags.NONE, Flags.BOTTOM_UP]), channel=st.integers(0, 255),
    reply_format=st.sampled_from(list(PixelFormat)), frame_id=st.integers(0, 2**32 - 1),
    client_ts_us=st.integers(0, 2**64 - 1), width=st.integers(0, MAX_DIMENSION),
    height=st.integers(0, MAX_DIMENSION), payload_length=st.integers(1, 64))


@given(headers)
def test_round_trip_any_valid_header(h):
    data = h.serialize() + bytes(h.payload_length)
    assert FrameHeader.parse(data)[0] == h


@settings(max_examples=500)
@given(st.binary(max_size=80))
def test_arbitrary_bytes_raise_only_protocol_error(data):
    try:
        FrameHeader.parse(data)
    except ProtocolError:
        pass


@settings(max_examples=500)
@given(st.integers(0, HEADER_SIZE - 1), st.integers(0, 255))
def test_single_byte_mutations_of_golden(index, value):
    mutated = bytearray(GOLDEN)
    mutated[index] = value
    try:
        FrameHeader.parse(bytes(mutated))
    except ProtocolError:
        pass


def test_docs_python_snippet_builds_the_golden_header():
    """docs/protocol.md's Python snippet, run as written, gives the golden bytes."""
    docs = (DATA.parents[1] / "docs" / "protocol.md").read_text(encoding="utf-8")
    snippet = docs.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {"struct": struct}
    exec(snippet, scope)  # noqa: S102 - our own documentation
    assert scope["frame"] == GOLDEN
    assert MAGIC == b"SDBF"
