"""OSC datagrams to parameter updates, and values to OSC bytes (docs/protocol.md, "OSC"). Sans-I/O.

python-osc 1.10's parsing classes decode the values, but only after this module has checked the
layout, because on malformed packets they (measured, python-osc 1.10.2):

- let ``UnicodeDecodeError`` escape on a non-UTF-8 address or string, and ``RecursionError`` on
  deeply nested bundles (``OscBundle`` recurses once per level);
- loop forever on a bundle element whose size is negative (``OscBundle._parse_contents`` steps
  back to the same size field and logs a root-logger warning each turn): one 24-byte datagram
  hangs the loop;
- pad a truncated ``f`` argument with zeros (a Reaktor quirk) and accept trailing bytes, so a cut
  packet applies a wrong value instead of being refused;
- skip type tags they do not decode (``c``, ``I``, ``q``...) with a root-logger warning, so the
  arguments silently shift;
- decode ``i`` as a signed int32: 4294967295 sent as ``i`` arrives as -1; ``h`` is a signed int64.

So bundles are walked here, iteratively and with a depth bound, every message's type tags and
argument sizes are checked to cover its bytes exactly, and only then is ``OscMessage`` run, inside
a guard that turns any exception into :class:`ProtocolError` (code ``bad_osc``). Time tags are
ignored on purpose: a bundle applies at the next frame boundary, never later (DESIGN.md, The wire).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message import OscMessage
from pythonosc.osc_message_builder import OscMessageBuilder

from sdbridge.errors import ParamError, ProtocolError
from sdbridge.params import FLOAT32_EXACT_INT_MAX, Schema, shown_value

BUNDLE_TAG = b"#bundle\x00"
BUNDLE_HEAD_SIZE = 16  # "#bundle\0" + 8-byte NTP time tag
MAX_DATAGRAM = 65507  # the largest UDP payload over IPv4
MAX_BUNDLE_DEPTH = 8
MAX_MESSAGES = 1024
INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Bytes each type tag takes, for the tags python-osc 1.10 decodes (not 'S', 'c', 'I': it skips
# them with a warning, so they are refused); None: a string or a blob, sized from the packet.
ARG_SIZES: dict[str, int | None] = {"i": 4, "f": 4, "r": 4, "m": 4, "h": 8, "d": 8, "t": 8,
                                    "s": None, "b": None,
                                    "T": 0, "F": 0, "N": 0, "[": 0, "]": 0}
# Addresses under the prefix that are requests, not parameters: handed to the caller's on_command.
COMMANDS = ("preset", "get", "query", "status")


@dataclass(frozen=True)
class OscCall:
    """One OSC message: its address and its arguments as python-osc decodes them."""

    address: str
    args: tuple[Any, ...]
    # The type tags without the comma: python-osc decodes 'r' (an RGBA colour) as a plain int, so only the
    # tag tells a colour from a number. Not compared: a call is its address and values.
    tags: str = field(default="", compare=False)


@dataclass
class OscActions:
    """What one datagram asks for: updates to apply together, errors, and non-parameter commands."""

    updates: dict[str, Any] = field(default_factory=dict)
    addresses: dict[str, str] = field(default_factory=dict)  # each update's parameter -> the address it came on
    errors: list[ParamError] = field(default_factory=list)
    commands: list[OscCall] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)  # addresses not under the prefix: nothing applied

    @property
    def ignored(self) -> int:
        return len(self.outside)


# --- parsing --------------------------------------------------------------------------------------


def _bad(reason: str, data: bytes) -> ProtocolError:
    return ProtocolError(f"malformed OSC packet of {len(data)} bytes: {reason}", code="bad_osc")


def _padded_string_end(data: bytes, start: int, what: str, whole: bytes) -> int:
    """Index just past the NUL-terminated, 4-byte-padded string starting at ``start``."""
    stop = data.find(b"\x00", start)
    if stop == -1:
        raise _bad(f"{what} is not terminated", whole)
    end = (stop // 4 + 1) * 4
    if end > len(data):
        raise _bad(f"{what} is not padded to 4 bytes", whole)
    return end


def _check_message(data: bytes, whole: bytes) -> str:
    """Address, type tags and argument sizes must cover the message's bytes exactly; returns the tags."""
    if not data.startswith(b"/"):
        raise _bad(f"element does not start with '/' or '#bundle' (starts with {data[:8]!r})", whole)
    index = _padded_string_end(data, 0, "address", whole)
    if index == len(data):
        return ""  # no type tags: an old-style message without arguments
    if data[index:index + 1] != b",":
        raise _bad(f"type tags do not start with ',' (got {data[index:index + 4]!r})", whole)
    tags_end = _padded_string_end(data, index, "type tag string", whole)
    tags = data[index + 1:data.index(b"\x00", index)].decode("latin-1")
    index = tags_end
    depth = 0
    for tag in tags:
        if tag not in ARG_SIZES:
            raise _bad(f"unsupported type tag {tag!r} in ',{tags}'", whole)
        depth += {"[": 1, "]": -1}.get(tag, 0)
        if depth < 0:
            raise _bad(f"']' without '[' in type tags ',{tags}'", whole)
        size = ARG_SIZES[tag]
        if size is None and tag == "b":
            if index + 4 > len(data):
                raise _bad("blob size is truncated", whole)
            (blob_size,) = struct.unpack_from(">i", data, index)
            if blob_size < 0:
                raise _bad(f"blob size {blob_size} is negative", whole)
            size = 4 + blob_size + (-blob_size % 4)
        elif size is None:
            size = _padded_string_end(data, index, f"'{tag}' argument", whole) - index
        if index + size > len(data):
            raise _bad(f"'{tag}' argument needs {size} bytes, {len(data) - index} left", whole)
        index += size
    if depth:
        raise _bad(f"'[' without ']' in type tags ',{tags}'", whole)
    if index != len(data):
        raise _bad(f"{len(data) - index} bytes after the last argument", whole)
    return tags


def _parse_message(data: bytes, whole: bytes) -> OscCall:
    tags = _check_message(data, whole)
    try:
        message = OscMessage(data)
        address = message.address
        args = tuple(message.params)
    except UnicodeDecodeError:
        raise _bad("address or string argument is not valid UTF-8", whole) from None
    except Exception as exc:  # python-osc raises many types on bad bytes; all mean "malformed"
        raise _bad(f"{type(exc).__name__}: {str(exc)[:120]}", whole) from None
    return OscCall(address, args, tags)


def parse_datagram(data: bytes) -> list[OscCall]:
    """All messages of a datagram in order, bundles flattened and their time tags ignored.

    Raises :class:`ProtocolError` (code ``bad_osc``) naming the fault and the packet's size.
    """
    if not data:
        raise _bad("empty datagram", data)
    if len(data) > MAX_DATAGRAM:
        raise _bad(f"larger than {MAX_DATAGRAM} bytes", data)
    data = bytes(data)
    calls: list[OscCall] = []
    # A stack of (element, depth) walked iteratively: no recursion, bounded depth, document order.
    stack: list[tuple[bytes, int]] = [(data, 0)]
    while stack:
        element, depth = stack.pop()
        if not element.startswith(BUNDLE_TAG):
            calls.append(_parse_message(element, data))
            if len(calls) > MAX_MESSAGES:
                raise _bad(f"more than {MAX_MESSAGES} messages", data)
            continue
        if depth >= MAX_BUNDLE_DEPTH:
            raise _bad(f"bundles nested deeper than {MAX_BUNDLE_DEPTH}", data)
        if len(element) < BUNDLE_HEAD_SIZE:
            raise _bad(f"bundle shorter than its {BUNDLE_HEAD_SIZE}-byte head", data)
        children: list[bytes] = []
        index = BUNDLE_HEAD_SIZE  # the time tag is skipped on purpose: never wait for it
        while index < len(element):
            if index + 4 > len(element):
                raise _bad("bundle element size is truncated", data)
            (size,) = struct.unpack_from(">i", element, index)
            index += 4
            if size <= 0 or size % 4 or index + size > len(element):
                raise _bad(f"bundle element size {size} does not fit the {len(element) - index} bytes left", data)
            children.append(element[index:index + size])
            index += size
        stack.extend((child, depth + 1) for child in reversed(children))
    return calls


# --- mapping onto parameters ----------------------------------------------------------------------


NUMBER_TAGS = frozenset("fdih")


def newest_sample(call: OscCall) -> OscCall:
    """A message of several numbers as its last one, the others being older samples of the same control.

    An OSC Out CHOP whose Format is Time Slice sends every sample of the cook's time slice in one message: several
    whenever TouchDesigner skips a frame or the CHOP runs faster than the timeline. The last is where the fader is
    now, as the newest frame wins; a message mixing strings or blobs with numbers keeps all its arguments (and is
    refused by the parameter it names).
    """
    if len(call.args) > 1 and len(call.tags) == len(call.args) and set(call.tags) <= NUMBER_TAGS:
        return OscCall(call.address, call.args[-1:], call.tags[-1])
    return call


def _one_value(call: OscCall, name: str) -> Any:
    if len(call.args) != 1:
        raise ParamError(f"{call.address} needs exactly one argument, got {len(call.args)}", name=name,
                         value=list(call.args)[:4])
    value = call.args[0]
    if call.tags == "r":
        # A colour is four bytes, not a count: /sd/seed ,r ffffffff would set 4294967295 without a word.
        raise ParamError(f"{call.address} is an RGBA colour ('r'), expected a number or a string", name=name,
                         value=value)
    if value is None or isinstance(value, (bytes, bytearray, tuple, list)):
        raise ParamError(f"{call.address} {_shown(value)} is a {type(value).__name__}, expected a number or a string",
                         name=name, value=value)
    return value


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def as_typed(value: float) -> float:
    """The shortest decimal that is the same float32 as ``value``: what the sender typed, or its fader showed.

    A float32 cannot hold 0.2: it arrives as 0.20000000298023224, past a range that ends at 0.2, and a sender could
    not set a parameter's own bound (QA 26: ``safety_filter.sensitivity`` 0.2 was refused over OSC alone).
    """
    if value != value or value in (float("inf"), float("-inf")):
        return value
    packed = struct.pack(">f", value)
    for digits in range(1, 10):  # 9 significant digits always round-trip a float32
        candidate = float(f"{value:.{digits}g}")
        if struct.pack(">f", candidate) == packed:
            return candidate
    return value


# How far past a range's end a float from a fader still counts as the end, as a fraction of the range: float32
# rounding from a Math or Lag CHOP leaves a fader at 1.0000001 (QA 41: refused at every cook, the fader stuck).
FADER_SLACK = 1e-6


def at_range_end(value: float, low: float | None, high: float | None) -> float:
    """``value`` snapped onto ``low`` or ``high`` when it misses it by float rounding (:data:`FADER_SLACK`);
    anything further out is left for the range check to refuse."""
    span = (high - low) if low is not None and high is not None else max(1.0, abs(low or 0.0), abs(high or 0.0))
    slack = span * FADER_SLACK
    if low is not None and low - slack <= value < low:
        return low
    if high is not None and high < value <= high + slack:
        return high
    return value


def _value_for(call: OscCall, schema: Schema, name: str) -> Any:
    spec = schema.get(name)  # unknown parameter: ParamError naming it (code unknown_param)
    value = _one_value(call, name)
    if call.tags in ("f", "d") and isinstance(value, float) and math.isfinite(value):
        if spec.kind == "float":
            value = at_range_end(as_typed(value) if call.tags == "f" else value, spec.minimum, spec.maximum)
        elif spec.kind in ("int", "enum"):
            # A fader or a CHOP sends every number as a float (TouchDesigner's OSC Out CHOP has no other type): a
            # steps slider at 2.37, or a Math CHOP's 2.9999998, is the nearest whole number (QA 41: refused). A
            # float32 past 2^24 is whole already, and a seed there is refused below.
            value = float(math.floor(value + 0.5))
        elif spec.kind == "bool" and abs(value - round(value)) <= FADER_SLACK and round(value) in (0, 1):
            value = float(round(value))  # a switch from a Math or Lag CHOP at 0.9999999 (QA 42); 0.5 is refused
    if spec.kind == "int" and not isinstance(value, bool):
        big = spec.maximum is not None and spec.maximum > FLOAT32_EXACT_INT_MAX
        if isinstance(value, float) and call.tags != "d" and big and abs(value) > FLOAT32_EXACT_INT_MAX:
            # A float32 cannot hold every integer above 2^24: 123456789 arrives as 123456792. A double ('d') holds
            # every seed exactly (QA 17).
            raise ParamError(f"{call.address} {value!r} is beyond float32's exact integers (2^24); send it as int64 "
                             "('h') or a string (an OSC Out CHOP sends float32 only: send it from an OSC Out DAT)",
                             name=name, value=value)
        if isinstance(value, int) and INT32_MIN <= value < 0 and (spec.minimum or 0) >= 0 \
                and spec.maximum is not None and spec.maximum > INT32_MAX:
            # python-osc decodes 'i' as a signed int32: a sender that packs 4294967295 as 'i' gives -1.
            raise ParamError(f"{call.address} {value} is negative; an int32 ('i') wraps values above {INT32_MAX} "
                             f"(was it {value + 2**32}?): send int64 ('h') or a string", name=name, value=value)
    return spec.validate(value)


def in_order(calls: Sequence[OscCall], schema: Schema, prefix: str = "/sd") -> list[list[OscCall]]:
    """A datagram's messages in runs to handle one after another: each command (a preset recall) on its own, between
    the parameter messages before and after it. OSC handles a bundle's messages in order: "recall a preset, then set
    strength" keeps that strength, where handling commands last let the preset overwrite it (QA 17)."""
    runs: list[list[OscCall]] = [[]]
    head = prefix.rstrip("/") + "/"
    for call in calls:
        path = call.address[len(head):] if call.address.startswith(head) else ""
        if path and _is_command(path, schema):
            runs += [[call], []]
        else:
            runs[-1].append(call)
    return [run for run in runs if run]


def _is_command(path: str, schema: Schema) -> bool:
    """Whether ``path`` (under the prefix) is a request such as ``preset`` rather than a parameter."""
    return Schema.name_from_osc_path(path) not in schema and path.split("/", 1)[0] in COMMANDS


def calls_to_updates(calls: Iterable[OscCall], schema: Schema, prefix: str = "/sd") -> OscActions:
    """Map messages under ``prefix`` onto validated parameter updates.

    ``<prefix>/<param>``, ``<prefix>/plugin/<name>/<param>`` (``plugin.<name>.<param>``) and
    ``<prefix>/norm/<param>`` (0–1 onto the range) become ``updates``, to be applied in one
    ``ParamStore.update`` (a later message for the same parameter wins); bad ones become
    ``errors`` naming address and value while the rest still apply; ``<prefix>/preset``,
    ``/get``, ``/query``, ``/status`` become ``commands``; addresses outside the prefix go to ``outside``.
    """
    actions = OscActions()
    head = prefix.rstrip("/") + "/"
    for call in calls:
        if not call.address.startswith(head):
            actions.outside.append(call.address)
            continue
        path = call.address[len(head):]
        try:
            if _is_command(path, schema):
                actions.commands.append(call)
                continue
            call = newest_sample(call)
            if path.startswith("norm/"):
                name = Schema.name_from_osc_path(path[len("norm/"):])
                spec = schema.get(name)
                fraction = _one_value(call, name)
                if call.tags in ("f", "d") and isinstance(fraction, float) and math.isfinite(fraction):
                    # The fader's 0.37, not float32's 0.3700000047683716 (QA 49 F6), as for a value sent itself.
                    fraction = at_range_end(as_typed(fraction) if call.tags == "f" else fraction, 0.0, 1.0)
                actions.updates[name] = spec.validate(spec.denormalize(fraction))
                actions.addresses[name] = call.address
                continue
            name = Schema.name_from_osc_path(path)
            actions.updates[name] = _value_for(call, schema, name)
            actions.addresses[name] = call.address
        except ParamError as exc:
            actions.errors.append(at_address(call.address, exc))
    return actions


def outside_prefix(address: str, prefix: str) -> ParamError:
    """The error for a message whose address is not under the prefix (a controller set up for another one)."""
    return ParamError(f"OSC address {shown_value(address, 120)} is not under the prefix {prefix!r}: nothing was "
                      f"applied; send {prefix.rstrip('/')}/<param> (the daemon's --osc-prefix)",
                      name="osc_address", value=address, code="unknown_address")


def at_address(address: str, exc: ParamError) -> ParamError:
    """The error with the OSC address in front, unless it already names it."""
    if str(exc).startswith(address):
        return exc
    error = ParamError(f"{address}: {exc}", name=exc.name, value=exc.value, code=exc.code)
    error.__cause__ = exc
    return error


# --- encoding -------------------------------------------------------------------------------------


def _add(builder: OscMessageBuilder, value: Any) -> None:
    if isinstance(value, bool):
        builder.add_arg(value, OscMessageBuilder.ARG_TYPE_TRUE if value else OscMessageBuilder.ARG_TYPE_FALSE)
    elif isinstance(value, int):
        if INT32_MIN <= value <= INT32_MAX:
            builder.add_arg(value, OscMessageBuilder.ARG_TYPE_INT)
        elif INT64_MIN <= value <= INT64_MAX:
            builder.add_arg(value, OscMessageBuilder.ARG_TYPE_INT64)
        else:
            builder.add_arg(str(value), OscMessageBuilder.ARG_TYPE_STRING)  # beyond int64: exact as text
    elif isinstance(value, float):
        builder.add_arg(value, OscMessageBuilder.ARG_TYPE_FLOAT)  # float32, as controllers expect
    elif value is None:
        builder.add_arg(None, OscMessageBuilder.ARG_TYPE_NIL)
    elif isinstance(value, (bytes, bytearray)):
        builder.add_arg(bytes(value), OscMessageBuilder.ARG_TYPE_BLOB)
    else:
        builder.add_arg(str(value), OscMessageBuilder.ARG_TYPE_STRING)


def _build(address: str, args: Iterable[Any]):
    if not address.startswith("/"):
        raise ValueError(f"OSC address {address!r} does not start with '/'")
    builder = OscMessageBuilder(address)
    for value in args:
        _add(builder, value)
    return builder.build()


def encode_message(address: str, *args: Any) -> bytes:
    """One OSC message: float → f (float32), int → i (h beyond int32), str → s, bool → T/F, None → N."""
    return _build(address, args).dgram


def encode_bundles(messages: Iterable[tuple[str, tuple[Any, ...]]], max_size: int = 1400) -> list[bytes]:
    """Messages packed in order into as few bundles as fit ``max_size`` bytes (default: one Ethernet
    MTU, so no IP fragments). A message too big for a bundle of ``max_size`` gets a bundle of its own."""
    out: list[bytes] = []
    builder, size = OscBundleBuilder(IMMEDIATELY), BUNDLE_HEAD_SIZE
    for address, args in messages:
        built = _build(address, args)
        if size + 4 + built.size > max_size and size > BUNDLE_HEAD_SIZE:
            out.append(builder.build().dgram)
            builder, size = OscBundleBuilder(IMMEDIATELY), BUNDLE_HEAD_SIZE
        builder.add_content(built)
        size += 4 + built.size
    if size > BUNDLE_HEAD_SIZE:
        out.append(builder.build().dgram)
    return out
