"""OSC datagrams to parameter updates, and values to OSC bytes. Sans-I/O: no sockets, no loop.

python-osc's parsing classes do the byte work, inside a guard: on malformed packets they let
UnicodeDecodeError, IndexError, struct.error, OverflowError and more escape, and their bundle
parser recurses once per nesting level. So bundles are walked here, iteratively and with a depth
bound, and only single messages are handed to ``OscMessage``. Time tags are ignored on purpose:
a bundle applies at the next frame boundary, never later (DESIGN.md, The wire).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

from sdbridge.errors import ParamError, ProtocolError
from sdbridge.params import FLOAT32_EXACT_INT_MAX, Schema

BUNDLE_TAG = b"#bundle\x00"
MAX_DATAGRAM = 65507
MAX_BUNDLE_DEPTH = 8
MAX_MESSAGES = 1024
INT32_MAX = 2**31 - 1
# Type tags python-osc decodes; it only logs (on the root logger) and skips any other.
KNOWN_TYPE_TAGS = frozenset("ifdsbhtTFNIcrm[]")


@dataclass(frozen=True)
class OscCall:
    """One OSC message: its address and its arguments."""

    address: str
    args: tuple[Any, ...]


@dataclass
class OscActions:
    """What one datagram asks for: updates to apply together, errors, and non-parameter commands."""

    updates: dict[str, Any] = field(default_factory=dict)
    errors: list[ParamError] = field(default_factory=list)
    commands: list[OscCall] = field(default_factory=list)
    ignored: int = 0


def _bad(reason: str, data: bytes) -> ProtocolError:
    return ProtocolError(f"malformed OSC packet of {len(data)} bytes: {reason}", code="bad_osc")


def _type_tags(data: bytes, whole: bytes) -> bytes:
    """The message's type tag string (after the ','), checked before python-osc sees it."""
    end = data.find(b"\x00")
    if end == -1:
        raise _bad("address is not terminated", whole)
    start = (end // 4 + 1) * 4
    if start >= len(data):
        return b""  # no type tags: an old-style message without arguments
    if data[start:start + 1] != b",":
        raise _bad(f"type tags do not start with ',' (got {data[start:start + 4]!r})", whole)
    stop = data.find(b"\x00", start)
    if stop == -1:
        raise _bad("type tag string is not terminated", whole)
    tags = data[start + 1:stop]
    unknown = set(tags.decode("latin-1")) - KNOWN_TYPE_TAGS
    if unknown:
        raise _bad(f"unknown type tag(s) {''.join(sorted(unknown))!r}", whole)
    return tags


def _parse_message(data: bytes, whole: bytes) -> OscCall:
    if not data.startswith(b"/"):
        raise _bad(f"element does not start with '/' or '#bundle' (starts with {data[:8]!r})", whole)
    _type_tags(data, whole)
    try:
        message = OscMessage(data)
        address = message.address
        args = tuple(message.params)
    except Exception as exc:  # python-osc raises many types on bad bytes; all mean "malformed"
        raise _bad(f"{type(exc).__name__}: {str(exc)[:120]}", whole) from None
    return OscCall(address, args)


def parse_datagram(data: bytes) -> list[OscCall]:
    """All messages of a datagram in order, bundles flattened; ProtocolError (code bad_osc) if malformed."""
    if not data:
        raise _bad("empty datagram", data)
    if len(data) > MAX_DATAGRAM:
        raise _bad(f"larger than {MAX_DATAGRAM} bytes", data)
    calls: list[OscCall] = []
    # A stack of (element bytes, depth) walked iteratively: no recursion, bounded depth.
    stack: list[tuple[bytes, int]] = [(data, 0)]
    while stack:
        element, depth = stack.pop()
        if not element.startswith(BUNDLE_TAG):
            calls.append(_parse_message(element, data))
        else:
            if depth >= MAX_BUNDLE_DEPTH:
                raise _bad(f"bundles nested deeper than {MAX_BUNDLE_DEPTH}", data)
            if len(element) < 16:
                raise _bad("bundle shorter than its 16-byte head", data)
            children: list[bytes] = []
            index = 16  # "#bundle\0" + 8-byte time tag, ignored on purpose
            while index < len(element):
                if index + 4 > len(element):
                    raise _bad("bundle element size is truncated", data)
                (size,) = struct.unpack_from(">i", element, index)
                index += 4
                if size <= 0 or size % 4 or index + size > len(element):
                    raise _bad(f"bundle element size {size} does not fit the {len(element) - index} bytes left",
                               data)
                children.append(element[index:index + size])
                index += size
            stack.extend((child, depth + 1) for child in reversed(children))
        if len(calls) > MAX_MESSAGES:
            raise _bad(f"more than {MAX_MESSAGES} messages", data)
    return calls


def _value_of(call: OscCall, name: str) -> Any:
    if len(call.args) != 1:
        raise ParamError(f"{call.address} needs exactly one argument, got {len(call.args)}", name=name,
                         value=list(call.args)[:4])
    value = call.args[0]
    if isinstance(value, (bytes, bytearray)) or value is None or isinstance(value, (tuple, list)):
        raise ParamError(f"{call.address} got {type(value).__name__}, expected a number or a string", name=name,
                         value=value)
    if isinstance(value, float) and not math.isfinite(value):
        raise ParamError(f"{call.address} {value} is not a finite number", name=name, value=value)
    return value


def calls_to_updates(calls: Iterable[OscCall], schema: Schema, prefix: str = "/sd") -> OscActions:
    """Map messages under ``prefix`` onto parameter updates; the rest become commands or are ignored."""
    actions = OscActions()
    head = prefix.rstrip("/") + "/"
    for call in calls:
        if not call.address.startswith(head):
            actions.ignored += 1
            continue
        path = call.address[len(head):]
        try:
            if path.startswith("norm/"):
                name = Schema.name_from_osc_path(path[len("norm/"):])
                if name not in schema:
                    schema.get(name)  # raises unknown parameter
                fraction = _value_of(call, name)
                if isinstance(fraction, str) or isinstance(fraction, bool):
                    raise ParamError(f"{call.address} {fraction!r} is not a number in [0, 1]", name=name,
                                     value=fraction)
                actions.updates[name] = schema.get(name).denormalize(float(fraction))
                continue
            name = Schema.name_from_osc_path(path)
            if name not in schema:
                if path.split("/", 1)[0] in ("status", "get", "preset", "query"):
                    actions.commands.append(call)
                    continue
                schema.get(name)  # raises unknown parameter
            spec = schema.get(name)
            value = _value_of(call, name)
            if spec.kind == "int" and isinstance(value, float) and abs(value) > FLOAT32_EXACT_INT_MAX \
                    and not float(value).is_integer():
                raise ParamError(f"{call.address} {value} lost precision as a float; send int64 ('h') or a string",
                                 name=name, value=value)
            actions.updates[name] = spec.validate(value)
        except ParamError as exc:
            actions.errors.append(exc)
    return actions


def _add(builder: OscMessageBuilder, value: Any) -> None:
    if isinstance(value, bool):
        builder.add_arg(value, OscMessageBuilder.ARG_TYPE_TRUE if value else OscMessageBuilder.ARG_TYPE_FALSE)
    elif isinstance(value, int):
        in_int32 = -INT32_MAX - 1 <= value <= INT32_MAX
        builder.add_arg(value, OscMessageBuilder.ARG_TYPE_INT if in_int32 else OscMessageBuilder.ARG_TYPE_INT64)
    elif isinstance(value, float):
        builder.add_arg(value, OscMessageBuilder.ARG_TYPE_FLOAT)
    else:
        builder.add_arg(str(value), OscMessageBuilder.ARG_TYPE_STRING)


def encode_message(address: str, *args: Any) -> bytes:
    builder = OscMessageBuilder(address)
    for value in args:
        _add(builder, value)
    return builder.build().dgram


def encode_bundles(messages: Iterable[tuple[str, tuple[Any, ...]]], max_size: int = 1400) -> list[bytes]:
    """Messages packed into as few bundles as fit ``max_size`` bytes (one Ethernet MTU: no fragments)."""
    out: list[bytes] = []
    builder, size = OscBundleBuilder(IMMEDIATELY), 16
    for address, args in messages:
        message = OscMessageBuilder(address)
        for value in args:
            _add(message, value)
        built = message.build()
        if size + 4 + built.size > max_size and size > 16:
            out.append(builder.build().dgram)
            builder, size = OscBundleBuilder(IMMEDIATELY), 16
        builder.add_content(built)
        size += 4 + built.size
    if size > 16:
        out.append(builder.build().dgram)
    return out
