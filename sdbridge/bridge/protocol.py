"""The binary frame header, version 1 (docs/protocol.md, "Frames"). Sans-I/O.

32 bytes, little-endian, followed by the payload::

    offset size field
    0      4    magic          b"SDBF"
    4      1    version        1
    5      1    pixel_format   PixelFormat: 0 JPEG, 1 RGB8, 2 RGBA8, 3 PNG
    6      1    flags          Flags: bit 0 BOTTOM_UP (rows bottom-up, as TouchDesigner's raw TOP bytes)
    7      1    channel        0 = the image; 1..255 condition streams (a depth pass for ControlNet)
    8      1    reply_format   PixelFormat of the reply
    9      3    reserved       zero (anything else is refused, so a future use cannot be misread as v1)
    12     4    frame_id       u32, echoed in the reply
    16     8    client_ts_us   u64, echoed in the reply
    24     2    width          u16; raw formats 1..8192, encoded formats 0 (read from the file) or the size
    26     2    height         u16
    28     4    payload_length u32, the bytes after the header
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from sdbridge.errors import ProtocolError

MAGIC = b"SDBF"
VERSION = 1
_LAYOUT = struct.Struct("<4sBBBBB3xIQHHI")
_FRAME_ID_OFFSET, _FRAME_ID = 12, struct.Struct("<I")  # the frame_id field alone, for errors (peek_frame_id)
HEADER_SIZE = _LAYOUT.size  # 32
MAX_DIMENSION = 8192
MAX_PAYLOAD = MAX_DIMENSION * MAX_DIMENSION * 4

# A session's name (``/ws?session=NAME``, ``/whip/NAME``, ``--input ...@NAME``, ``--output ...@NAME``): 1-64 of
# A-Z a-z 0-9 _ . -, but not "." or "..", which URLs resolve as path segments (a WHIP resource at /whip/../ID
# could not be deleted: QA 6). A pattern to embed, without anchors.
SESSION_NAME = r"(?!\.\.?(?![A-Za-z0-9_.-]))[A-Za-z0-9_.-]{1,64}"
SESSION_NAME_RULE = "1-64 of A-Z a-z 0-9 _ . -, not . or .."

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class PixelFormat(enum.IntEnum):
    JPEG = 0
    RGB8 = 1
    RGBA8 = 2
    PNG = 3

    @property
    def channels(self) -> int | None:
        return {PixelFormat.RGB8: 3, PixelFormat.RGBA8: 4}.get(self)

    @property
    def is_raw(self) -> bool:
        return self.channels is not None


class Flags(enum.IntFlag):
    NONE = 0
    BOTTOM_UP = 1


_KNOWN_FLAGS = int(Flags.BOTTOM_UP)
_PIXEL_FORMAT_VALUES = frozenset(int(value) for value in PixelFormat)
# The integer fields and their widths on the wire (u8, u32, u64, u16).
_FIELD_BITS = {"channel": 8, "frame_id": 32, "client_ts_us": 64, "width": 16, "height": 16, "payload_length": 32}


def _pixel_format(field: str, value: int) -> PixelFormat:
    try:
        return PixelFormat(value)
    except ValueError:
        raise ProtocolError(f"unknown {field} {value} (expected 0 JPEG, 1 RGB8, 2 RGBA8 or 3 PNG)") from None


@dataclass(frozen=True)
class FrameHeader:
    """One frame's header, fields in wire order."""

    version: int
    pixel_format: PixelFormat
    flags: Flags
    channel: int
    reply_format: PixelFormat
    frame_id: int
    client_ts_us: int
    width: int
    height: int
    payload_length: int

    def __post_init__(self) -> None:
        # Plain ints from callers become the enums, so ``str`` and ``is_raw`` work. Unknown values stay as
        # given, so that ``check``/``serialize`` can quote them in their ProtocolError.
        for name in ("pixel_format", "reply_format"):
            value = getattr(self, name)
            if type(value) is int and value in _PIXEL_FORMAT_VALUES:
                object.__setattr__(self, name, PixelFormat(value))
        if type(self.flags) is int and 0 <= self.flags <= _KNOWN_FLAGS:
            object.__setattr__(self, "flags", Flags(self.flags))

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview) -> tuple[FrameHeader, memoryview]:
        """The header and the payload (a view into ``data``, no copy); ProtocolError if anything is off."""
        view = memoryview(data)
        if len(view) < HEADER_SIZE:
            raise ProtocolError(f"frame of {len(view)} bytes is shorter than the {HEADER_SIZE}-byte header")
        magic, version, pixel_format, flags, channel, reply_format, frame_id, client_ts_us, width, height, \
            payload_length = _LAYOUT.unpack_from(view)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {magic!r} (expected {MAGIC!r})")
        if version != VERSION:
            raise ProtocolError(f"unsupported version {version} (expected {VERSION})")
        if flags & ~_KNOWN_FLAGS:
            raise ProtocolError(f"unknown flags 0x{flags:02x} (only bit 0, BOTTOM_UP, is defined)")
        reserved = bytes(view[9:12])
        if reserved != bytes(3):
            # Refused rather than ignored: a later header revision may give these bytes a meaning, and a
            # v1 daemon must not silently misread such a frame.
            raise ProtocolError(f"reserved header bytes 9-11 are {reserved.hex(' ')} (must be 00 00 00)")
        header = cls(version, _pixel_format("pixel_format", pixel_format), Flags(flags), channel,
                     _pixel_format("reply_format", reply_format), frame_id, client_ts_us, width, height,
                     payload_length)
        payload = view[HEADER_SIZE:]
        if len(payload) != payload_length:
            raise ProtocolError(f"payload is {len(payload)} bytes but the header says {payload_length}")
        header.check()
        return header, payload

    @staticmethod
    def peek_frame_id(data: bytes | bytearray | memoryview) -> int | None:
        """The frame_id of a header frame at the start of ``data``, whatever else is wrong with it (so that its error
        can name it, docs/protocol.md "Errors"): bytes 12-15 after the magic, in any version (a later version keeps
        them there so that this error can still be matched to its frame) and in a header cut short past them. None
        where there is no magic, or too few bytes to hold the frame_id."""
        view = memoryview(data)
        if len(view) < _FRAME_ID.size + _FRAME_ID_OFFSET or bytes(view[:4]) != MAGIC:
            return None
        return int(_FRAME_ID.unpack_from(view, _FRAME_ID_OFFSET)[0])

    def check(self) -> None:
        """Rules across fields (``parse`` calls it; ``serialize`` does not, so tests can build bad frames)."""
        self._check_ranges()
        for name in ("width", "height"):
            value = getattr(self, name)
            if value > MAX_DIMENSION:
                raise ProtocolError(f"{name} {value} exceeds {MAX_DIMENSION}")
        if self.payload_length > MAX_PAYLOAD:
            raise ProtocolError(f"payload_length {self.payload_length} exceeds {MAX_PAYLOAD}")
        if self.pixel_format.is_raw:
            for name in ("width", "height"):
                if getattr(self, name) == 0:
                    raise ProtocolError(f"{name} 0 is not allowed for {self.pixel_format.name} frames "
                                        f"(1..{MAX_DIMENSION}; only JPEG/PNG may send 0)")
            needed = self.width * self.height * (self.pixel_format.channels or 0)
            if self.payload_length != needed:
                raise ProtocolError(f"{self.pixel_format.name} frame {self.width}x{self.height} needs {needed} "
                                    f"payload bytes, got {self.payload_length}")
        elif self.payload_length == 0:
            raise ProtocolError(f"{self.pixel_format.name} frame has an empty payload")

    def _check_ranges(self) -> None:
        """Each field fits its wire type, so ``serialize`` never lets a ``struct.error`` out."""
        if self.version != VERSION:
            raise ProtocolError(f"unsupported version {self.version} (expected {VERSION})")
        for name in ("pixel_format", "reply_format"):
            if not isinstance(getattr(self, name), PixelFormat):
                _pixel_format(name, getattr(self, name))
        if not isinstance(self.flags, int) or self.flags & ~_KNOWN_FLAGS or self.flags < 0:
            raise ProtocolError(f"unknown flags {self.flags!r} (only bit 0, BOTTOM_UP, is defined)")
        for name, bits in _FIELD_BITS.items():
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < 1 << bits:
                raise ProtocolError(f"{name} {value!r} is not a u{bits} (0..{(1 << bits) - 1})")

    def serialize(self) -> bytes:
        """The 32 header bytes. Checks that each field fits its wire type, not the rules across fields."""
        self._check_ranges()
        return _LAYOUT.pack(MAGIC, self.version, int(self.pixel_format), int(self.flags), self.channel,
                            int(self.reply_format), self.frame_id, self.client_ts_us, self.width, self.height,
                            self.payload_length)

    def reply(self, pixel_format: PixelFormat, width: int, height: int, payload_length: int) -> FrameHeader:
        """The reply's header: same frame id, timestamp and row order; channel 0."""
        return FrameHeader(VERSION, pixel_format, self.flags, 0, pixel_format, self.frame_id, self.client_ts_us,
                           width, height, payload_length)

    @property
    def bottom_up(self) -> bool:
        return bool(self.flags & Flags.BOTTOM_UP)

    def __str__(self) -> str:
        # getattr: a header built with an unknown format still logs (check() is what refuses it).
        pixel_format, reply_format = (getattr(value, "name", value) for value in (self.pixel_format,
                                                                                  self.reply_format))
        return (f"frame {self.frame_id} {pixel_format} {self.width}x{self.height} "
                f"{self.payload_length} B ch{self.channel} reply {reply_format}"
                f"{' bottom-up' if self.bottom_up else ''} ts {self.client_ts_us}")


def pack_frame(header: FrameHeader, payload: bytes | bytearray | memoryview) -> bytes:
    """Header and payload as one binary message."""
    return header.serialize() + bytes(payload)


def sniff(data: bytes | bytearray | memoryview) -> str:
    """What a binary message is, from its first bytes: header, jpeg, png or unknown."""
    head = bytes(data[:8])
    if head.startswith(MAGIC):
        return "header"
    if head.startswith(JPEG_MAGIC):
        return "jpeg"
    if head.startswith(PNG_MAGIC):
        return "png"
    return "unknown"


__all__ = ["HEADER_SIZE", "JPEG_MAGIC", "MAGIC", "MAX_DIMENSION", "MAX_PAYLOAD", "PNG_MAGIC", "VERSION", "Flags",
           "FrameHeader", "PixelFormat", "pack_frame", "sniff"]
