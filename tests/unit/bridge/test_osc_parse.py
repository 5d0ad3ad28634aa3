"""OSC parsing and mapping, sans-I/O: literal packets, every malformed case, property tests."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pythonosc.osc_bundle_builder import IMMEDIATELY, OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder

from sdbridge.bridge.osc_parse import OscCall, calls_to_updates, encode_bundles, encode_message, parse_datagram
from sdbridge.errors import ProtocolError
from sdbridge.params import Schema

SCHEMA = Schema()
# What a TouchDesigner CHOP sends for strength 0.5: "/sd/strength", ",f", float32 0.5.
TD_FLOAT = b"/sd/strength\x00\x00\x00\x00,f\x00\x00\x3f\x00\x00\x00"


def message(address: str, *args, types: str | None = None) -> bytes:
    builder = OscMessageBuilder(address)
    for index, value in enumerate(args):
        builder.add_arg(value, types[index] if types else None)
    return builder.build().dgram


def bundle(*elements: bytes, timestamp: float = IMMEDIATELY) -> bytes:
    data = b"#bundle\x00" + struct.pack(">Q", 1 if timestamp == IMMEDIATELY else int(timestamp))
    for element in elements:
        data += struct.pack(">i", len(element)) + element
    return data


def updates(data: bytes):
    return calls_to_updates(parse_datagram(data), SCHEMA)


def test_touchdesigner_float():
    assert parse_datagram(TD_FLOAT) == [OscCall("/sd/strength", (0.5,))]
    assert updates(TD_FLOAT).updates == {"strength": 0.5}


def test_string_and_bundle_in_order():
    data = bundle(message("/sd/prompt", "a cat"), message("/sd/seed", 7.0))
    assert [c.address for c in parse_datagram(data)] == ["/sd/prompt", "/sd/seed"]
    assert updates(data).updates == {"prompt": "a cat", "seed": 7}


def test_nested_bundle_and_far_future_time_tag_apply_now():
    far_future = (0xFFFF0000 << 32)  # NTP seconds near the end of the era: parsing never waits on it
    data = bundle(bundle(message("/sd/steps", 3.0)), message("/sd/strength", 0.2), timestamp=far_future)
    assert updates(data).updates == {"steps": 3, "strength": pytest.approx(0.2)}


@pytest.mark.parametrize("data, reason", [
    (b"", "empty datagram"),
    (TD_FLOAT[:13], "malformed"),
    (b"/sd/strength\x00\x00\x00\x00,q\x00\x00\x00\x00\x00\x00", "malformed"),   # unknown type tag
    (b"/sd/\xff\xfe\x00\x00,f\x00\x00\x3f\x00\x00\x00", "malformed"),          # bad UTF-8 address
    (b"/sd/prompt\x00\x00,s\x00\x00\xff\xfe\x00\x00", "malformed"),              # bad UTF-8 string
    (b"#bundle\x00" + bytes(4), "shorter than its 16-byte head"),
    (b"#bundle\x00" + bytes(8) + struct.pack(">i", 400) + TD_FLOAT, "does not fit"),
    (b"#bundle\x00" + bytes(8) + struct.pack(">i", -4) + TD_FLOAT, "does not fit"),
    (b"garbage", "does not start with '/'"),
    (bytes(70000), "larger than"),
])
def test_malformed(data, reason):
    with pytest.raises(ProtocolError, match=reason) as info:
        parse_datagram(data)
    assert info.value.code == "bad_osc"


def test_deeply_nested_bundle_is_refused_not_recursed():
    data = message("/sd/steps", 2.0)
    for _ in range(500):
        data = bundle(data)
    with pytest.raises(ProtocolError, match="nested deeper"):
        parse_datagram(data)


def test_int_parameters_from_floats():
    result = updates(message("/sd/steps", 4.0))
    assert result.updates == {"steps": 4} and isinstance(result.updates["steps"], int)
    result = updates(message("/sd/steps", 4.5))
    assert not result.updates and "steps 4.5 is not an integer" in str(result.errors[0])


def test_seed_beyond_float32_and_int32():
    assert updates(message("/sd/seed", 4294967295, types="h")).updates == {"seed": 4294967295}
    assert updates(message("/sd/seed", "4294967295")).updates == {"seed": 4294967295}
    # An int32 sender wraps 2^32-1 to -1: that is refused, never silently used.
    wrapped = updates(message("/sd/seed", -1, types="i"))
    assert not wrapped.updates and "seed -1 not in" in str(wrapped.errors[0])


def test_bool_enum_norm_and_plugin_paths():
    from sdbridge.params import ParamSpec

    schema = Schema()
    schema.add(ParamSpec("plugin.flow.enabled", "bool", False, "on/off", group="plugin"))
    calls = parse_datagram(bundle(message("/sd/plugin/flow/enabled", 1.0), message("/sd/resize_mode", 1.0),
                                  message("/sd/engine", "preview"), message("/sd/norm/strength", 0.25),
                                  message("/sd/norm/steps", 1.0)))
    result = calls_to_updates(calls, schema)
    assert result.updates == {"plugin.flow.enabled": True, "resize_mode": "fit", "engine": "preview",
                              "strength": 0.25, "steps": 50}
    assert not result.errors


def test_errors_name_address_and_value_and_others_still_apply():
    result = updates(bundle(message("/sd/nope", 1.0), message("/sd/strength", 4.0), message("/sd/guidance", 2.0),
                            message("/sd/prompt"), message("/sd/norm/strength", 3.0)))
    assert result.updates == {"guidance": 2.0}
    texts = [str(error) for error in result.errors]
    assert any("unknown parameter 'nope'" in t for t in texts)
    assert any("strength 4.0 not in [0, 1]" in t for t in texts)
    assert any("/sd/prompt needs exactly one argument, got 0" in t for t in texts)
    assert any("norm/strength 3.0 not in [0, 1]" in t for t in texts)


def test_other_prefixes_ignored_commands_kept():
    result = updates(bundle(message("/other/strength", 0.1), message("/sd/status/ping", 1.0)))
    assert result.ignored == 1 and result.commands == [OscCall("/sd/status/ping", (1.0,))]


def test_encode_round_trip():
    data = encode_message("/sd/seed", 4294967295, 0.5, "text", True)
    assert parse_datagram(data) == [OscCall("/sd/seed", (4294967295, 0.5, "text", True))]
    many = [(f"/sd/status/v{i}", (float(i),)) for i in range(200)]
    datagrams = encode_bundles(many, max_size=1400)
    assert len(datagrams) > 1 and all(len(d) <= 1400 for d in datagrams)
    assert [c.address for d in datagrams for c in parse_datagram(d)] == [a for a, _ in many]


@settings(max_examples=1000)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_raise_only_protocol_error(data):
    try:
        parse_datagram(data)
    except ProtocolError:
        pass


VALID = [TD_FLOAT, message("/sd/prompt", "a cat"), bundle(message("/sd/seed", 7.0), message("/sd/prompt", "x")),
         bundle(bundle(message("/sd/steps", 2.0)))]


@settings(max_examples=1000)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       st.integers(0, 200))
def test_mutated_valid_packets_raise_only_protocol_error(packet, flips, cut):
    data = bytearray(packet)
    for index, value in flips:
        if index < len(data):
            data[index] = value
    try:
        calls_to_updates(parse_datagram(bytes(data[: max(cut, 1)] if cut < len(data) else data)), SCHEMA)
    except ProtocolError:
        pass
