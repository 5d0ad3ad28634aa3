"""The v1 frame header: golden bytes, round trips, one test per error, property tests, and the docs."""

from __future__ import annotations

import importlib.util
import json
import re
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdbridge.bridge.protocol import (HEADER_SIZE, MAGIC, MAX_DIMENSION, MAX_PAYLOAD, VERSION, Flags, FrameHeader,
                                      PixelFormat, pack_frame, sniff)
from sdbridge.errors import ProtocolError

DATA = Path(__file__).resolve().parents[2] / "data"
DOCS = DATA.parents[1] / "docs" / "protocol.md"
GOLDEN = (DATA / "frame_rgba8_2x2_bottom_up.bin").read_bytes()
GOLDEN_REPLY = (DATA / "reply_rgba8_512x512_bottom_up_header.bin").read_bytes()
GOLDEN_JPEG = (DATA / "frame_jpeg_header.bin").read_bytes()


def header(**overrides) -> FrameHeader:
    values = dict(version=1, pixel_format=PixelFormat.RGB8, flags=Flags.NONE, channel=0,
                  reply_format=PixelFormat.JPEG, frame_id=1, client_ts_us=2, width=4, height=2, payload_length=24)
    values.update(overrides)
    return FrameHeader(**values)


def patched(data: bytes, offset: int, value: bytes) -> bytes:
    return data[:offset] + value + data[offset + len(value):]


# Golden bytes


def test_constants():
    assert (MAGIC, VERSION, HEADER_SIZE, MAX_DIMENSION, MAX_PAYLOAD) == (b"SDBF", 1, 32, 8192, 8192 * 8192 * 4)
    assert [PixelFormat(n).channels for n in range(4)] == [None, 3, 4, None]
    assert [PixelFormat(n).is_raw for n in range(4)] == [False, True, True, False]


def test_golden_rgba8_bottom_up():
    parsed, payload = FrameHeader.parse(GOLDEN)
    assert parsed == FrameHeader(1, PixelFormat.RGBA8, Flags.BOTTOM_UP, 0, PixelFormat.RGBA8, 7, 1_000_000, 2, 2, 16)
    assert bytes(payload) == GOLDEN[HEADER_SIZE:]
    assert isinstance(payload, memoryview) and payload.obj is GOLDEN  # a view into the message, no copy
    assert parsed.bottom_up


def test_golden_rgba8_serializes_back():
    header_ = FrameHeader(1, PixelFormat.RGBA8, Flags.BOTTOM_UP, 0, PixelFormat.RGBA8, 7, 1_000_000, 2, 2, 16)
    assert header_.serialize() == GOLDEN[:HEADER_SIZE]
    assert pack_frame(header_, GOLDEN[HEADER_SIZE:]) == GOLDEN


def test_golden_jpeg_header():
    parsed, payload = FrameHeader.parse(GOLDEN_JPEG)
    assert parsed == FrameHeader(1, PixelFormat.JPEG, Flags.NONE, 0, PixelFormat.RGB8, 42, 1000, 0, 0, 4)
    assert bytes(payload) == b"\xff\xd8\xff\xd9"
    assert parsed.serialize() == GOLDEN_JPEG[:HEADER_SIZE]


def test_literal_bytes_of_a_jpeg_header():
    literal = bytes.fromhex("53444246 01 00 00 00 01 000000 2a000000 e803000000000000 0000 0000 04000000")
    assert literal + b"\xff\xd8\xff\xd9" == GOLDEN_JPEG


def test_golden_reply_header():
    parsed, _ = FrameHeader.parse(GOLDEN)
    reply = parsed.reply(PixelFormat.RGBA8, 512, 512, 512 * 512 * 4)
    assert reply.serialize() == GOLDEN_REPLY
    assert FrameHeader.parse(GOLDEN_REPLY + bytes(512 * 512 * 4))[0] == reply


def test_golden_files_match_their_script():
    spec = importlib.util.spec_from_file_location("make_golden", DATA / "make_golden.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    for name, data in module.golden_files().items():
        assert (DATA / name).read_bytes() == data, f"{name} drifted from tests/data/make_golden.py"


def test_reply_keeps_id_timestamp_and_row_order():
    parsed, _ = FrameHeader.parse(patched(GOLDEN, 7, b"\x03"))  # sent on channel 3
    reply = parsed.reply(PixelFormat.JPEG, 512, 256, 1234)
    assert (reply.frame_id, reply.client_ts_us, reply.flags, reply.channel) == (7, 1_000_000, Flags.BOTTOM_UP, 0)
    assert (reply.pixel_format, reply.reply_format, reply.width, reply.height, reply.payload_length) == \
        (PixelFormat.JPEG, PixelFormat.JPEG, 512, 256, 1234)


def test_plain_ints_become_enums():
    made = header(pixel_format=2, reply_format=0, flags=1, width=1, height=1, payload_length=4)
    assert made.pixel_format is PixelFormat.RGBA8 and made.reply_format is PixelFormat.JPEG
    assert made.flags is Flags.BOTTOM_UP and "RGBA8" in str(made)


def test_str_is_one_line():
    text = str(FrameHeader.parse(GOLDEN)[0])
    assert "\n" not in text
    assert text == "frame 7 RGBA8 2x2 16 B ch0 reply RGBA8 bottom-up ts 1000000"
    assert str(header(pixel_format=9)).startswith("frame 1 9 4x2")  # logs even what check() refuses


def test_sniff():
    assert sniff(GOLDEN) == "header"
    assert sniff(memoryview(GOLDEN_JPEG)) == "header"
    assert sniff(b"\xff\xd8\xff\xe0rest") == "jpeg"
    assert sniff(bytearray(b"\x89PNG\r\n\x1a\nrest")) == "png"
    assert sniff(b"\x89PNG\r\n") == "unknown"  # too short to be sure
    assert sniff(b"GIF89a") == "unknown" and sniff(b"") == "unknown" and sniff(b"\xff\xd8") == "unknown"


# One test per error


@pytest.mark.parametrize("data, message", [
    pytest.param(GOLDEN[:10], "frame of 10 bytes is shorter than the 32-byte header", id="short"),
    pytest.param(b"", "frame of 0 bytes is shorter than the 32-byte header", id="empty"),
    pytest.param(patched(GOLDEN, 0, b"XXXX"), "bad magic b'XXXX' (expected b'SDBF')", id="magic"),
    pytest.param(patched(GOLDEN, 4, b"\x03"), "unsupported version 3 (expected 1)", id="version"),
    pytest.param(patched(GOLDEN, 5, b"\x09"), "unknown pixel_format 9", id="pixel_format"),
    pytest.param(patched(GOLDEN, 6, b"\x82"), "unknown flags 0x82", id="flags"),
    pytest.param(patched(GOLDEN, 8, b"\x07"), "unknown reply_format 7", id="reply_format"),
    pytest.param(patched(GOLDEN, 9, b"\xff\xff\xff"), "reserved header bytes 9-11 are ff ff ff (must be 00 00 00)",
                 id="reserved"),
    pytest.param(patched(GOLDEN, 11, b"\x01"), "reserved header bytes 9-11 are 00 00 01", id="reserved_last"),
    pytest.param(GOLDEN + b"extra", "payload is 21 bytes but the header says 16", id="payload_long"),
    pytest.param(GOLDEN[:-1], "payload is 15 bytes but the header says 16", id="payload_short"),
    pytest.param(patched(GOLDEN, 24, b"\x00\x00"), "width 0 is not allowed for RGBA8 frames", id="width_0"),
    pytest.param(patched(GOLDEN, 26, b"\x00\x00"), "height 0 is not allowed for RGBA8 frames", id="height_0"),
    pytest.param(patched(GOLDEN, 24, b"\x01\x00"), "RGBA8 frame 1x2 needs 8 payload bytes, got 16", id="raw_size"),
    pytest.param(patched(GOLDEN, 24, struct.pack("<H", 9000)), "width 9000 exceeds 8192", id="width_big"),
    pytest.param(patched(GOLDEN, 26, struct.pack("<H", 8193)), "height 8193 exceeds 8192", id="height_big"),
    pytest.param(patched(GOLDEN_JPEG, 28, bytes(4))[:HEADER_SIZE], "JPEG frame has an empty payload",
                 id="empty_jpeg"),
])
def test_each_parse_error(data, message):
    with pytest.raises(ProtocolError, match=re.escape(message)):
        FrameHeader.parse(data)


def test_payload_above_the_maximum():
    with pytest.raises(ProtocolError, match=f"payload_length {MAX_PAYLOAD + 1} exceeds {MAX_PAYLOAD}"):
        header(pixel_format=PixelFormat.JPEG, width=0, height=0, payload_length=MAX_PAYLOAD + 1).check()


@pytest.mark.parametrize("overrides, message", [
    pytest.param({"frame_id": 2**32}, "frame_id 4294967296 is not a u32 (0..4294967295)", id="frame_id"),
    pytest.param({"client_ts_us": -1}, "client_ts_us -1 is not a u64", id="client_ts_us"),
    pytest.param({"channel": 256}, "channel 256 is not a u8 (0..255)", id="channel"),
    pytest.param({"width": 70000}, "width 70000 is not a u16", id="width"),
    pytest.param({"pixel_format": 5}, "unknown pixel_format 5", id="pixel_format"),
    pytest.param({"reply_format": -1}, "unknown reply_format -1", id="reply_format"),
    pytest.param({"flags": 6}, "unknown flags 6", id="flags"),
    pytest.param({"version": 2}, "unsupported version 2 (expected 1)", id="version"),
])
def test_serialize_refuses_what_the_wire_cannot_carry(overrides, message):
    with pytest.raises(ProtocolError, match=re.escape(message)):
        header(**overrides).serialize()


def test_serialize_leaves_cross_field_rules_to_check():
    """Tests and clients can build a lying frame on purpose; the receiver's parse refuses it."""
    lying = header(width=4, height=4, payload_length=24)
    data = lying.serialize() + bytes(24)
    with pytest.raises(ProtocolError, match="RGB8 frame 4x4 needs 48 payload bytes, got 24"):
        FrameHeader.parse(data)


def test_pack_frame_round_trip():
    h = header()
    parsed, payload = FrameHeader.parse(pack_frame(h, bytes(range(24))))
    assert parsed == h and bytes(payload) == bytes(range(24))


def test_parse_takes_bytearray_and_memoryview():
    assert FrameHeader.parse(bytearray(GOLDEN))[0] == FrameHeader.parse(memoryview(GOLDEN))[0]


# Properties


@st.composite
def valid_headers(draw) -> FrameHeader:
    pixel_format = draw(st.sampled_from(list(PixelFormat)))
    if pixel_format.is_raw:
        width, height = draw(st.integers(1, 64)), draw(st.integers(1, 64))
        payload_length = width * height * pixel_format.channels
    else:
        width, height = draw(st.integers(0, MAX_DIMENSION)), draw(st.integers(0, MAX_DIMENSION))
        payload_length = draw(st.integers(1, 64))
    return FrameHeader(1, pixel_format, draw(st.sampled_from([Flags.NONE, Flags.BOTTOM_UP])),
                       draw(st.integers(0, 255)), draw(st.sampled_from(list(PixelFormat))),
                       draw(st.integers(0, 2**32 - 1)), draw(st.integers(0, 2**64 - 1)), width, height,
                       payload_length)


@given(valid_headers())
def test_parse_of_serialize_is_identity(h):
    data = h.serialize() + bytes(h.payload_length)
    parsed, payload = FrameHeader.parse(data)
    assert parsed == h and len(payload) == h.payload_length
    assert parsed.serialize() == data[:HEADER_SIZE]


@settings(max_examples=300)
@given(st.binary(min_size=HEADER_SIZE - 6, max_size=HEADER_SIZE + 40))
def test_serialize_of_parse_is_identity(tail):
    data = MAGIC + b"\x01" + tail  # past magic and version, so the other checks get exercised
    try:
        parsed, payload = FrameHeader.parse(data)
    except ProtocolError:
        return
    # Every byte is kept: a header that parses has zero reserved bytes.
    assert parsed.serialize() == data[:9] + bytes(3) + data[12:HEADER_SIZE]
    assert bytes(payload) == data[HEADER_SIZE:]


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


# docs/protocol.md does not drift from the code


def _docs_blocks(language: str) -> list[str]:
    """The fenced code blocks of the "Frames" section whose info string is ``language``."""
    docs = DOCS.read_text(encoding="utf-8")
    frames = docs.split("## Frames", 1)[1].split("\n## ", 1)[0]
    blocks, current, info = [], None, ""
    for line in frames.splitlines(keepends=True):
        if line.startswith("```"):
            if current is None:
                current, info = [], line[3:].strip()
            else:
                if info == language:
                    blocks.append("".join(current))
                current = None
        elif current is not None:
            current.append(line)
    return blocks


def _hex_dump(block: str) -> bytes:
    """The leading hex byte pairs of each line of a docs dump (the rest of the line is the comment)."""
    data = bytearray()
    for line in block.splitlines():
        for token in line.split():
            if not re.fullmatch(r"[0-9a-f]{2}", token):
                break
            data.append(int(token, 16))
    return bytes(data)


def test_docs_hex_dumps_are_the_golden_files():
    dumps = [_hex_dump(block) for block in _docs_blocks("")]
    assert dumps == [GOLDEN, GOLDEN_REPLY]


def test_docs_python_snippet_builds_the_golden_frame():
    """docs/protocol.md's Python snippet, run as written, gives the golden bytes."""
    (snippet,) = _docs_blocks("python")
    scope: dict = {}
    exec(snippet, scope)  # noqa: S102 - our own documentation
    assert scope["frame"] == GOLDEN


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed: the JavaScript snippet is not run")
def test_docs_javascript_snippet_builds_the_golden_header():
    (snippet,) = _docs_blocks("javascript")
    program = snippet + (
        "\nconst bytes = new Uint8Array(frameHeader({format: 2, flags: 1, channel: 0, reply: 2, frameId: 7,"
        " tsUs: 1000000, width: 2, height: 2, length: 16}));"
        "\nconsole.log(JSON.stringify(Array.from(bytes)));\n")
    result = subprocess.run(["node", "-e", program], capture_output=True, text=True, timeout=30, check=True)
    assert bytes(json.loads(result.stdout)) == GOLDEN[:HEADER_SIZE]


def test_peek_frame_id_reads_a_header_whatever_else_is_wrong():
    good = pack_frame(FrameHeader(1, PixelFormat.RGB8, Flags.NONE, 0, PixelFormat.JPEG, 77, 0, 2, 2, 12), bytes(12))
    assert FrameHeader.peek_frame_id(good) == 77
    assert FrameHeader.peek_frame_id(good[:HEADER_SIZE] + bytes(5)) == 77   # a payload of the wrong length
    assert FrameHeader.peek_frame_id(good[:HEADER_SIZE - 1]) == 77          # a header cut short past the frame_id
    assert FrameHeader.peek_frame_id(good[:16]) == 77
    assert FrameHeader.peek_frame_id(good[:15]) is None                     # too short to hold it
    assert FrameHeader.peek_frame_id(b"SDBF\x02" + good[5:]) == 77          # an unknown version (qa8 #12)
    assert FrameHeader.peek_frame_id(b"\xff\xd8\xff" + bytes(40)) is None    # a bare JPEG
