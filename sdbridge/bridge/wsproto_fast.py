"""wsproto's two per-message costs that grow with the frame, done in C.

The daemon serves WebSockets through wsproto for its conformance (config.py: the other implementations fail
Autobahn cases). wsproto unmasks a client's frame in Python, eight strided slice passes over it (4 ms for a
1024x576 RGBA frame, 2.4 MB, on 2 cores), and copies a server's frame three times to build it
(``bytearray(payload)``, ``header + payload``, ``bytearray(...)``) (QA 35). Here the unmasking is websockets'
C ``apply_mask`` (websockets is installed with uvicorn's other WebSocket implementation) and a server's frame
without extensions is built with one copy. The bytes on the wire are the same.

These replace two methods of wsproto's classes, process-wide. So that a wsproto release that changes them
cannot be broken by it, :func:`install` first runs both replacements against wsproto's own methods on sample
frames and installs nothing unless every result is identical.
"""

from __future__ import annotations

import logging
import os
import struct
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

_installed = False


def install() -> bool:
    """Replace wsproto's masker and server frame builder, once; False (wsproto's own kept) where websockets'
    C speedups are missing or the replacements do not give wsproto's own results."""
    global _installed
    if _installed:
        return True
    try:
        from websockets.speedups import apply_mask
        from wsproto import frame_protocol
    except ImportError as exc:
        log.debug("wsproto fast path not installed: %s", exc)
        return False
    process, serialize = _fast_process(apply_mask), _fast_serialize(frame_protocol)
    try:
        _check_same(frame_protocol, process, serialize)
    except Exception as exc:  # any difference or a changed internal: keep wsproto's own
        log.warning("wsproto fast path not installed (wsproto %s differs from what it was made for: %s)",
                    _version(), exc)
        return False
    frame_protocol.XorMaskerSimple.process = process  # type: ignore[method-assign]
    frame_protocol.FrameProtocol._serialize_frame = serialize  # type: ignore[method-assign]
    _installed = True
    return True


def _fast_process(apply_mask: Callable[[bytes, bytes], bytes]) -> Callable[[Any, bytes | bytearray], bytearray]:
    def process(self: Any, data: bytes | bytearray) -> bytearray:
        if not data:
            return bytearray()
        key = bytes(self._masking_key)
        rotation = len(data) % 4  # the frame's next chunk goes on with the next byte of the key
        self._masking_key = key[rotation:] + key[:rotation]
        return bytearray(apply_mask(data, key))

    return process


def _fast_serialize(frame_protocol: Any) -> Callable[..., bytearray]:
    original = frame_protocol.FrameProtocol._serialize_frame
    no_rsv = frame_protocol.RsvBits(False, False, False)

    def serialize(self: Any, opcode: Any, payload: bytes | bytearray = b"", fin: bool = True) -> bytearray:
        if self.client or self.extensions or opcode.iscontrol():
            return original(self, opcode, payload, fin)  # masked, compressed or control: wsproto's own way
        length = len(payload)
        first = self._make_fin_rsv_opcode(fin, no_rsv, opcode)
        if length <= frame_protocol.MAX_PAYLOAD_NORMAL:
            frame = bytearray((first, length))
        elif length <= frame_protocol.MAX_PAYLOAD_TWO_BYTE:
            frame = bytearray((first, frame_protocol.PAYLOAD_LENGTH_TWO_BYTE)) + struct.pack("!H", length)
        else:
            frame = bytearray((first, frame_protocol.PAYLOAD_LENGTH_EIGHT_BYTE)) + struct.pack("!Q", length)
        frame += payload
        return frame

    return serialize


def _check_same(frame_protocol: Any, process: Callable[..., bytearray], serialize: Callable[..., bytearray]) -> None:
    """Raise unless both replacements give what wsproto's own methods give, on frames of every length class, a
    payload unmasked in uneven chunks and both fin values."""
    for length in (0, 1, 3, 125, 126, 127, 65535, 65536, 70001):
        payload = os.urandom(length)
        key = os.urandom(4)
        theirs, ours = frame_protocol.XorMaskerSimple(key), frame_protocol.XorMaskerSimple(key)
        for start, end in ((0, length // 3), (length // 3, length // 3 + 5), (length // 3 + 5, length)):
            expected = frame_protocol.XorMaskerSimple.process(theirs, payload[start:end])
            if process(ours, payload[start:end]) != expected:
                raise ValueError(f"unmasking {length} bytes differs")
        server = frame_protocol.FrameProtocol(client=False, extensions=[])
        for opcode in (frame_protocol.Opcode.BINARY, frame_protocol.Opcode.TEXT):
            for fin in (True, False):
                if serialize(server, opcode, payload, fin) != frame_protocol.FrameProtocol._serialize_frame(
                        server, opcode, payload, fin):
                    raise ValueError(f"a {length}-byte {opcode.name} frame differs")


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("wsproto")
    except Exception:
        return "?"
