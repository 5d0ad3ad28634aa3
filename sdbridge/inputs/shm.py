"""Shared memory as the input: another process writes raw frames, sdbridge reads them, nothing is encoded.

The segment is a :mod:`multiprocessing.shared_memory` block (a named file mapping on Windows, a
``/dev/shm`` file on Linux, POSIX shared memory on macOS): a 32-byte little-endian header, then the
pixels (docs/inputs.md, "Shared memory layout")::

    offset size field
    0      4    magic         b"SDBM"
    4      1    version       1
    5      1    channels      3 (RGB) or 4 (RGBA; the alpha is dropped)
    6      1    flags         bit 0 BOTTOM_UP: rows bottom first, as TouchDesigner's numpyArray() gives them
    7      1    reserved      0
    8      2    width         u16, 1..8192
    10     2    height        u16, 1..8192
    12     4    capacity      u32, the pixel bytes the segment holds after the header
    16     8    sequence      u64, odd while a frame is being written, even when it is whole; frame n is 2n
    24     8    timestamp_us  u64, the writer's clock when the frame was finished (for its own use)
    32     ...  pixels        width * height * channels bytes, rows packed

A writer makes ``sequence`` odd, writes the size and the pixels, then makes it even. The reader
copies the pixels and reads ``sequence`` again: a frame written over while it was copied is
skipped (a seqlock), never shown torn. :class:`ShmWriter` does the writer's side.
"""

from __future__ import annotations

import logging
import os
import struct
import sys
import threading
import time
from dataclasses import dataclass
from multiprocessing import shared_memory

import numpy as np

from sdbridge.inputs.base import Input, InputError, InputSpec

log = logging.getLogger(__name__)

MAGIC = b"SDBM"
VERSION = 1
_LAYOUT = struct.Struct("<4sBBBBHHIQQ")
HEADER_SIZE = _LAYOUT.size  # 32
_SEQUENCE = struct.Struct("<Q")
SEQUENCE_OFFSET = 16
BOTTOM_UP = 1
MAX_DIMENSION = 8192
DEFAULT_NAME = "sdbridge"
POLL_S = 0.002       # how often the reader looks for a new frame: 500 times a second, a few µs each
REATTACH_S = 2.0     # no new frame for this long: open the name again (the writer may have made a new segment)


@dataclass(frozen=True)
class ShmHeader:
    """The segment's header, fields in layout order."""

    version: int
    channels: int
    flags: int
    width: int
    height: int
    capacity: int
    sequence: int
    timestamp_us: int = 0

    @property
    def frame_bytes(self) -> int:
        return self.width * self.height * self.channels

    @property
    def bottom_up(self) -> bool:
        return bool(self.flags & BOTTOM_UP)

    @classmethod
    def parse(cls, data: bytes | bytearray | memoryview, room: int | None = None) -> ShmHeader | None:
        """The header at the start of ``data``; None while it is all zero (a writer that has not written yet);
        InputError for anything else that is not a v1 header. ``room``: the pixel bytes the segment has,
        when ``data`` is not the whole segment (default: all of ``data`` after the header)."""
        if len(data) < HEADER_SIZE:
            raise InputError(f"shared memory segment of {len(data)} bytes is shorter than the {HEADER_SIZE}-byte "
                             f"header")
        magic, version, channels, flags, _, width, height, capacity, sequence, timestamp_us = \
            _LAYOUT.unpack_from(data)
        if magic == bytes(4):
            return None
        if magic != MAGIC:
            raise InputError(f"shared memory segment starts with {magic!r}, not {MAGIC!r}: not an sdbridge frame "
                             f"segment")
        if version != VERSION:
            raise InputError(f"shared memory segment version {version} (this sdbridge reads {VERSION})")
        header = cls(version, channels, flags, width, height, capacity, sequence, timestamp_us)
        header.check(len(data) - HEADER_SIZE if room is None else room)
        return header

    def check(self, room: int | None = None) -> None:
        if self.channels not in (3, 4):
            raise InputError(f"shared memory frame has {self.channels} channels (3 RGB or 4 RGBA)")
        if self.flags & ~BOTTOM_UP:
            raise InputError(f"shared memory frame has unknown flags 0x{self.flags:02x} (only bit 0, BOTTOM_UP)")
        for name in ("width", "height"):
            value = getattr(self, name)
            if not 1 <= value <= MAX_DIMENSION:
                raise InputError(f"shared memory frame {name} {value} not in [1, {MAX_DIMENSION}]")
        if self.frame_bytes > self.capacity:
            raise InputError(f"shared memory frame {self.width}x{self.height}x{self.channels} needs "
                             f"{self.frame_bytes} bytes but the header says the segment holds {self.capacity}")
        if room is not None and self.capacity > room:
            raise InputError(f"shared memory header says {self.capacity} pixel bytes but the segment has {room}")

    def serialize(self) -> bytes:
        return _LAYOUT.pack(MAGIC, self.version, self.channels, self.flags, 0, self.width, self.height,
                            self.capacity, self.sequence, self.timestamp_us)


def _attach(name: str) -> shared_memory.SharedMemory:
    """Open an existing segment without letting this process's resource tracker remove it at exit
    (before Python 3.13 attaching registers it, and the reader's exit would unlink the writer's segment)."""
    if sys.version_info >= (3, 13):
        return shared_memory.SharedMemory(name=name, track=False)
    segment = shared_memory.SharedMemory(name=name)
    if sys.platform != "win32":
        from multiprocessing import resource_tracker

        resource_tracker.unregister(segment._name, "shared_memory")  # type: ignore[attr-defined]
    return segment


def _readable_fd(segment: shared_memory.SharedMemory) -> int:
    """The segment's file descriptor where ``os.pread`` reads it (Linux: a /dev/shm file), else -1.

    Reading through the file, not the mapping, is what keeps the reader alive when a writer shrinks the
    block in place (``ftruncate``): a read past the file's end comes back short, where touching the
    mapping there is SIGBUS, which kills the whole daemon. Without one the mapping is read: Windows has
    no descriptor and its file mappings keep their size; macOS cannot read() a shm object, and sizes one
    only once, so its mapping cannot outlive the block's end either."""
    fd = getattr(segment, "_fd", -1)
    if fd < 0:
        return -1
    try:
        os.pread(fd, 1, 0)
    except OSError:
        return -1
    return fd


def _identity(segment: shared_memory.SharedMemory) -> tuple[int, int] | None:
    """(device, inode) of a POSIX segment: a writer's new block under the same name has another one.
    None where there is no file descriptor (Windows)."""
    fd = getattr(segment, "_fd", -1)
    if fd < 0:
        return None
    try:
        info = os.fstat(fd)
    except OSError:
        return None
    return info.st_dev, info.st_ino


class ShmWriter:
    """The writer's side: make the segment, write frames into it (``with ShmWriter("sdbridge", 640, 480) as w``).

    ``width``/``height``/``channels`` size the segment (or ``capacity`` bytes of pixels); frames of any size
    that fits may follow. Only numpy and the standard library: a TouchDesigner Script or any process can use it.
    """

    def __init__(self, name: str = DEFAULT_NAME, width: int = 512, height: int = 512, channels: int = 3, *,
                 capacity: int | None = None, bottom_up: bool = False) -> None:
        self.capacity = capacity or width * height * channels
        self.bottom_up = bottom_up
        self.sequence = 0
        self.segment = shared_memory.SharedMemory(name=name, create=True, size=HEADER_SIZE + self.capacity)
        self.name = self.segment.name

    def write(self, frame: np.ndarray, bottom_up: bool | None = None) -> int:
        """One uint8 frame ``[H, W, 3 or 4]``; returns its number (1, 2, ...)."""
        if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] not in (3, 4):
            raise InputError(f"ShmWriter.write takes uint8 [H, W, 3 or 4], got {frame.dtype} {list(frame.shape)}")
        height, width, channels = frame.shape
        flip = self.bottom_up if bottom_up is None else bottom_up
        header = ShmHeader(VERSION, channels, BOTTOM_UP if flip else 0, width, height, self.capacity,
                           self.sequence + 1)
        header.check()
        buf = self.segment.buf
        _SEQUENCE.pack_into(buf, SEQUENCE_OFFSET, self.sequence + 1)  # odd: being written
        buf[:SEQUENCE_OFFSET] = header.serialize()[:SEQUENCE_OFFSET]
        buf[HEADER_SIZE:HEADER_SIZE + header.frame_bytes] = np.ascontiguousarray(frame).reshape(-1)
        self.sequence += 2
        struct.pack_into("<Q", buf, SEQUENCE_OFFSET + 8, time.time_ns() // 1000)
        _SEQUENCE.pack_into(buf, SEQUENCE_OFFSET, self.sequence)  # even: whole
        return self.sequence // 2

    def close(self) -> None:
        """Close and remove the segment (readers see it go and wait for a new one)."""
        if self.segment is not None:
            self.segment.close()
            try:
                self.segment.unlink()
            except FileNotFoundError:
                pass  # already removed by someone else: what close is for
            self.segment = None  # type: ignore[assignment]

    def __enter__(self) -> ShmWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ShmInput(Input):
    kind = "shm"

    def __init__(self, spec: InputSpec) -> None:
        super().__init__(spec)
        self.name = spec.target or DEFAULT_NAME
        self.segment: shared_memory.SharedMemory | None = None
        self.last_sequence = 0
        self._block: tuple[int, int] | None = None  # the segment's identity (device, inode), where the OS tells it
        self.torn = 0  # frames written over while being copied, skipped
        self._pixels = bytearray()
        self._fd = -1  # the segment's descriptor when it is read through the file (_readable_fd), else -1

    def open(self) -> None:
        self.close()
        try:
            self.segment = _attach(self.name)
        except FileNotFoundError:
            self.last_sequence = 0  # gone: whatever comes under the name next is a new writer, counting afresh
            raise InputError(f"no shared memory segment {self.name!r} (is the writer running?)",
                             code="input_unavailable") from None
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot open shared memory segment {self.name!r}: {exc}") from exc
        block = _identity(self.segment)
        if block is not None and block != self._block:
            # A new block is a new writer, whose sequence counts from 1 again: its first frame is new even
            # when its sequence equals the old writer's last. (Without an identity: only a reattach after a
            # failed open, above, counts as new.)
            self.last_sequence = 0
        self._block = block
        self._fd = _readable_fd(self.segment)

    def read(self, stop: threading.Event) -> np.ndarray | None:
        quiet_since = time.monotonic()
        while not stop.is_set():
            image = self._try_read()
            if image is not None:
                return image
            if time.monotonic() - quiet_since > REATTACH_S:
                self.open()  # a restarted writer's new segment under the same name; InputError if it is gone
                quiet_since = time.monotonic()
            stop.wait(POLL_S)
        return None

    def _try_read(self) -> np.ndarray | None:
        """The newest whole frame if there is one the reader has not had, else None."""
        if self._fd < 0:
            assert self.segment is not None
            return self._try_read_mapped(self.segment.buf)
        fd = self._fd
        # Through the file, not the mapping (see _readable_fd): a poll costs about 3 µs instead of 1, a new
        # 1080p RGBA frame about 20 % more (the kernel's copy), the price of never faulting on a shrunk block.
        before = os.pread(fd, _SEQUENCE.size, SEQUENCE_OFFSET)
        if len(before) < _SEQUENCE.size:
            ShmHeader.parse(os.pread(fd, HEADER_SIZE, 0))  # raises its sentence: the block is shorter than it
        (sequence,) = _SEQUENCE.unpack(before)
        if sequence & 1 or sequence == self.last_sequence:
            return None
        try:
            header = ShmHeader.parse(os.pread(fd, HEADER_SIZE, 0), room=os.fstat(fd).st_size - HEADER_SIZE)
        except InputError:
            if os.pread(fd, _SEQUENCE.size, SEQUENCE_OFFSET) != before:
                return None  # a new frame being written (resized, say) since the sequence was read: not an error
            raise
        if header is None or header.sequence != sequence:  # written over since: the next poll takes it
            return None
        size = header.frame_bytes
        if len(self._pixels) != size:
            self._pixels = bytearray(size)
        got = os.preadv(fd, [self._pixels], HEADER_SIZE)
        if os.pread(fd, _SEQUENCE.size, SEQUENCE_OFFSET) != before:
            # Written over during the copy, maybe resized (then the copy came back short): skip it.
            self.torn += 1
            return None
        if got < size:  # shrunk under a whole frame: a writer that resizes must make the sequence odd first
            raise InputError(f"shared memory segment {self.name!r} ends {got} bytes into its "
                             f"{header.width}x{header.height}x{header.channels} frame of {size} bytes "
                             f"(made shorter while the frame was read)")
        self.last_sequence = sequence
        image = np.frombuffer(self._pixels, np.uint8).reshape(header.height, header.width, header.channels)
        return image[::-1] if header.bottom_up else image

    def _try_read_mapped(self, buf: memoryview) -> np.ndarray | None:
        """_try_read from the mapping, where the block cannot shrink under it (see _readable_fd)."""
        if len(buf) < HEADER_SIZE:
            ShmHeader.parse(buf)  # raises its sentence: the sequence below lies past the segment's end
        (sequence,) = _SEQUENCE.unpack_from(buf, SEQUENCE_OFFSET)
        if sequence & 1 or sequence == self.last_sequence:
            return None
        header = ShmHeader.parse(buf)
        if header is None:
            return None
        size = header.frame_bytes
        if len(self._pixels) != size:
            self._pixels = bytearray(size)
        self._pixels[:] = buf[HEADER_SIZE:HEADER_SIZE + size]
        (after,) = _SEQUENCE.unpack_from(buf, SEQUENCE_OFFSET)
        if after != sequence:  # written over during the copy: skip it, the next poll takes the newer one
            self.torn += 1
            return None
        self.last_sequence = sequence
        image = np.frombuffer(self._pixels, np.uint8).reshape(header.height, header.width, header.channels)
        return image[::-1] if header.bottom_up else image

    def close(self) -> None:
        if self.segment is not None:
            try:
                self.segment.close()
            except BufferError:  # a view still held; the mapping goes with the object
                log.debug("shared memory %s closed with a view still open", self.name)
            self.segment = None
        self._fd = -1
        # last_sequence stays: a reattach to the same writer (the same block) must not send its last frame again.
