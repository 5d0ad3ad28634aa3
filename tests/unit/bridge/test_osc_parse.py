"""OSC parsing and mapping, sans-I/O: literal packets, every malformed case, mapping rules, property tests."""

from __future__ import annotations

import logging
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pythonosc.osc_message_builder import OscMessageBuilder

from sdbridge.bridge.osc_parse import (ARG_SIZES, MAX_BUNDLE_DEPTH, MAX_DATAGRAM, OscActions, OscCall, calls_to_updates,
                                       encode_bundles, encode_message, in_order, parse_datagram)
from sdbridge.errors import ParamError, ProtocolError
from sdbridge.params import ParamSpec, Schema

SCHEMA = Schema()
SCHEMA.add(ParamSpec("plugin.flow.enabled", "bool", False, "on/off", group="plugin"))
SCHEMA.add(ParamSpec("plugin.flow.amount", "float", 0.0, "how much", minimum=0.0, maximum=2.0, group="plugin"))

# --- golden packets, byte by byte -------------------------------------------------------------------
# What a TouchDesigner OSC Out CHOP sends for strength 0.5: address padded to 16, ",f" padded to 4, float32.
TD_FLOAT = b"/sd/strength\x00\x00\x00\x00" + b",f\x00\x00" + b"\x3f\x00\x00\x00"
PROMPT = b"/sd/prompt\x00\x00" + b",s\x00\x00" + b"a cat\x00\x00\x00"
SEED_I = b"/sd/seed\x00\x00\x00\x00" + b",f\x00\x00" + b"\x40\xe0\x00\x00"  # 7.0 as float32
IMMEDIATE = b"\x00\x00\x00\x00\x00\x00\x00\x01"  # NTP time tag 1: "immediately"
FAR_FUTURE = b"\xff\xff\xff\xff\x00\x00\x00\x00"  # year 2036, the end of NTP era 0


def element(data: bytes) -> bytes:
    return struct.pack(">i", len(data)) + data


def bundle(*elements: bytes, time_tag: bytes = IMMEDIATE) -> bytes:
    return b"#bundle\x00" + time_tag + b"".join(element(e) for e in elements)


def message(address: str, *args, types: str | None = None) -> bytes:
    builder = OscMessageBuilder(address)
    for index, value in enumerate(args):
        builder.add_arg(value, types[index] if types else None)
    return builder.build().dgram


def updates(*elements: bytes, schema: Schema = SCHEMA) -> OscActions:
    data = elements[0] if len(elements) == 1 else bundle(*elements)
    return calls_to_updates(parse_datagram(data), schema)


def test_touchdesigner_float():
    assert parse_datagram(TD_FLOAT) == [OscCall("/sd/strength", (0.5,))]
    assert updates(TD_FLOAT).updates == {"strength": 0.5}


def test_string_prompt():
    assert parse_datagram(PROMPT) == [OscCall("/sd/prompt", ("a cat",))]


def test_bundle_of_two_in_order():
    data = b"#bundle\x00" + IMMEDIATE + b"\x00\x00\x00\x18" + PROMPT + b"\x00\x00\x00\x14" + SEED_I
    assert data == bundle(PROMPT, SEED_I)
    assert parse_datagram(data) == [OscCall("/sd/prompt", ("a cat",)), OscCall("/sd/seed", (7.0,))]
    assert updates(data).updates == {"prompt": "a cat", "seed": 7}


def test_nested_bundle_is_flattened_in_document_order():
    data = bundle(TD_FLOAT, bundle(PROMPT, bundle(SEED_I)), message("/sd/steps", 3.0))
    assert [c.address for c in parse_datagram(data)] == ["/sd/strength", "/sd/prompt", "/sd/seed", "/sd/steps"]


def test_far_future_time_tag_is_ignored():
    # Parsing is synchronous and never looks at the tag: the values come back now.
    data = bundle(PROMPT, TD_FLOAT, time_tag=FAR_FUTURE)
    assert updates(data).updates == {"prompt": "a cat", "strength": 0.5}


def test_message_without_type_tags_and_empty_bundle():
    assert parse_datagram(b"/sd/get\x00") == [OscCall("/sd/get", ())]
    assert parse_datagram(bundle()) == []


def test_nesting_up_to_the_bound_is_fine():
    data = TD_FLOAT
    for _ in range(MAX_BUNDLE_DEPTH):
        data = bundle(data)
    assert parse_datagram(data) == [OscCall("/sd/strength", (0.5,))]
    with pytest.raises(ProtocolError, match="nested deeper than 8"):
        parse_datagram(bundle(data))


# --- malformed packets --------------------------------------------------------------------------------

NEGATIVE_SIZE = bundle() + struct.pack(">i", -4) + TD_FLOAT  # python-osc's OscBundle loops forever on this


def nested(depth: int) -> bytes:
    data = TD_FLOAT
    for _ in range(depth):
        data = bundle(data)
    return data


@pytest.mark.parametrize("data, reason", [
    (b"", "empty datagram"),
    (TD_FLOAT[:-1], r"'f' argument needs 4 bytes, 3 left"),
    (TD_FLOAT[:-2], r"'f' argument needs 4 bytes, 2 left"),  # python-osc would pad it to 0.5 and say nothing
    (TD_FLOAT[:10], "address is not terminated"),
    (TD_FLOAT[:18], "type tag string is not terminated"),
    (TD_FLOAT[:19], "type tag string is not padded"),
    (PROMPT[:-2], "'s' argument is not padded"),
    (TD_FLOAT + b"junk", "4 bytes after the last argument"),
    (b"/sd/strength\x00\x00\x00\x00,q\x00\x00\x00\x00\x00\x00", "unsupported type tag 'q'"),
    (b"/sd/strength\x00\x00\x00\x00,I\x00\x00", "unsupported type tag 'I'"),  # python-osc skips it silently
    (b"/sd/x\x00\x00\x00,S\x00\x00ab\x00\x00", "unsupported type tag 'S'"),
    (b"/sd/x\x00\x00\x00,c\x00\x00\x00\x00\x00a", "unsupported type tag 'c'"),
    (b"/sd/strength\x00\x00\x00\x00xf\x00\x00\x3f\x00\x00\x00", "type tags do not start with ','"),
    (b"/sd/x\x00\x00\x00,]\x00\x00", r"'\]' without '\['"),
    (b"/sd/x\x00\x00\x00,[f\x00\x00\x00\x00\x00", r"'\[' without '\]'"),
    (b"/sd/x\x00\x00\x00,b\x00\x00" + struct.pack(">i", 1000) + b"ab\x00\x00", "'b' argument needs 1004 bytes"),
    (b"/sd/x\x00\x00\x00,b\x00\x00" + struct.pack(">i", -8) + b"abcd", "blob size -8 is negative"),
    (b"/sd/\xff\xfe\x00\x00,f\x00\x00\x3f\x00\x00\x00", "not valid UTF-8"),  # UnicodeDecodeError in python-osc
    (b"/sd/prompt\x00\x00,s\x00\x00\xff\xfe\x00\x00", "not valid UTF-8"),
    (b"#bundle\x00" + bytes(4), "shorter than its 16-byte head"),
    (bundle() + b"\x00\x00", "element size is truncated"),
    (bundle() + struct.pack(">i", 400) + TD_FLOAT, "element size 400 does not fit the 24 bytes left"),
    (NEGATIVE_SIZE, "element size -4 does not fit"),
    (bundle() + struct.pack(">i", 0), "element size 0"),
    (bundle() + struct.pack(">i", 6) + TD_FLOAT, "element size 6"),
    (nested(500), "nested deeper than 8"),  # python-osc: RecursionError
    (b"garbage", "does not start with '/' or '#bundle'"),
    (bundle(b"xyz\x00"), "does not start with '/'"),
    (bytes(MAX_DATAGRAM + 1), "larger than 65507 bytes"),
    (bundle(*[b"/a\x00\x00"] * 1025), "more than 1024 messages"),
])
def test_malformed(data, reason, caplog):
    with caplog.at_level(logging.DEBUG), pytest.raises(ProtocolError, match=reason) as info:
        parse_datagram(data)
    assert info.value.code == "bad_osc"
    assert f"malformed OSC packet of {len(data)} bytes: " in str(info.value)
    assert not caplog.records  # python-osc's root-logger warnings never run


def test_every_accepted_type_tag_is_decoded_by_python_osc_without_a_warning(caplog):
    tags = "".join(tag for tag in ARG_SIZES if tag not in "[]")
    payload = {"i": b"\x00\x00\x00\x01", "f": b"\x3f\x80\x00\x00", "r": b"\x01\x02\x03\x04",
               "m": b"\x00\x90\x40\x7f", "h": bytes(7) + b"\x02", "d": b"\x3f\xf0" + bytes(6),
               "t": bytes(7) + b"\x01", "s": b"ab\x00\x00", "b": b"\x00\x00\x00\x01z\x00\x00\x00"}
    tag_string = b",[" + tags.encode() + b"]\x00"
    data = b"/sd/x\x00\x00\x00" + tag_string + bytes(-len(tag_string) % 4)
    data += b"".join(payload.get(tag, b"") for tag in tags)
    with caplog.at_level(logging.DEBUG):
        [call] = parse_datagram(data)
    assert len(call.args[0]) == len(tags) and not caplog.records


# --- mapping onto parameters ------------------------------------------------------------------------


def test_int_parameter_from_integral_float():
    result = updates(message("/sd/steps", 4.0))
    assert result.updates == {"steps": 4} and type(result.updates["steps"]) is int


@pytest.mark.parametrize("value, expected", [(4.5, 5), (2.37, 2), (2.9999998, 3), (-0.4, 0), (1.5, 2)])
def test_a_float_for_an_int_parameter_is_the_nearest_whole_number(value, expected):
    """A fader or an OSC Out CHOP sends every number as a float: a steps slider at 2.37 or a Math CHOP's
    2.9999998 was refused at every cook (QA 41). Over OSC it is the nearest whole number; JSON keeps to integers."""
    result = updates(message("/sd/seed", value), message("/sd/resize_mode", 1.9999999))
    assert result.updates == {"seed": expected, "resize_mode": "stretch"} and not result.errors
    assert type(result.updates["seed"]) is int
    [error] = updates(message("/sd/steps", 0.4)).errors  # rounded, then out of range: said as sent
    assert error.code == "bad_param" and "not in [1, 50]" in str(error)
    with pytest.raises(ParamError, match="is not an integer"):
        Schema().get("steps").validate(4.5)


@pytest.mark.parametrize("address, value, expected", [
    ("/sd/strength", 1.0000001, 1.0), ("/sd/strength", -1e-7, 0.0), ("/sd/guidance", 30.00001, 30.0),
    ("/sd/norm/strength", 1.0000001, 1.0), ("/sd/norm/strength", -1e-7, 0.0)])
def test_a_fader_a_rounding_past_its_end_is_at_its_end(address, value, expected):
    """float32 rounding from a Lag or Math CHOP leaves a fader just past 1: refused at every cook, the fader stuck
    short of its end (QA 41). Within a millionth of the range it is the end; further out it is refused."""
    assert updates(message(address, value)).updates == {"strength" if "strength" in address else "guidance": expected}
    [error] = updates(message(address, 1.001 if "strength" in address else 30.1)).errors
    assert error.code == "bad_param" and "not in" in str(error)


@pytest.mark.parametrize("value, expected", [(0.0, False), (1.0, True), (0, False), (1, True), (True, True),
                                             (False, False), ("on", True)])
def test_bool_from_zero_one_and_true_false(value, expected):
    assert updates(message("/sd/plugin/flow/enabled", value)).updates == {"plugin.flow.enabled": expected}


def test_bool_out_of_range_is_an_error():
    [error] = updates(message("/sd/plugin/flow/enabled", 0.5)).errors
    assert "/sd/plugin/flow/enabled: plugin.flow.enabled 0.5 is not a boolean" in str(error)


@pytest.mark.parametrize("value, expected", [(0.9999999, True), (1.0000001, True), (-1e-7, False), (1e-7, False)])
def test_a_switch_a_float_rounding_from_0_or_1_is_that_switch(value, expected):
    """A Math or Lag CHOP leaves a toggle at 0.9999999: refused as "not a boolean" at every cook, the switch stuck
    (QA 42), where integers, choices and faders took the rounding (QA 41)."""
    assert updates(message("/sd/plugin/flow/enabled", value)).updates == {"plugin.flow.enabled": expected}


def test_a_double_seed_past_float32s_whole_numbers_is_rounded_too():
    """A double holds a seed past 2^24 exactly: with a fraction it is the nearest whole number, as below 2^24."""
    assert updates(message("/sd/seed", 123456789.7, types="d")).updates == {"seed": 123456790}


def test_enum_by_index_and_by_name():
    assert updates(message("/sd/resize_mode", 1.0)).updates == {"resize_mode": "fit"}
    assert updates(message("/sd/resize_mode", 2)).updates == {"resize_mode": "stretch"}
    assert updates(message("/sd/resize_mode", "fit")).updates == {"resize_mode": "fit"}
    [error] = updates(message("/sd/resize_mode", 3.0)).errors
    assert "is not an index into" in str(error)


def test_seed_at_2_to_the_32_minus_1_via_int64_and_string():
    assert updates(message("/sd/seed", 4294967295, types="h")).updates == {"seed": 4294967295}
    assert updates(message("/sd/seed", "4294967295")).updates == {"seed": 4294967295}


def test_seed_wrapped_by_an_int32_sender_is_refused_not_used():
    # 4294967295 packed as 'i' is ff ff ff ff; python-osc decodes 'i' signed, so it arrives as -1.
    packet = b"/sd/seed\x00\x00\x00\x00,i\x00\x00\xff\xff\xff\xff"
    assert parse_datagram(packet) == [OscCall("/sd/seed", (-1,))]
    result = updates(packet)
    assert not result.updates
    assert "int32 ('i') wraps values above 2147483647 (was it 4294967295?)" in str(result.errors[0])
    # Seeds up to 2^31-1 fit an int32 and are fine.
    assert updates(message("/sd/seed", 2**31 - 1, types="i")).updates == {"seed": 2**31 - 1}


def test_seed_beyond_float32_exact_integers_is_refused():
    # 123456789 as float32 is 123456792.0: an integral float, but not what was meant.
    result = updates(message("/sd/seed", 123456789.0, types="f"))
    assert not result.updates and "beyond float32's exact integers" in str(result.errors[0])
    assert "OSC Out CHOP sends float32 only" in str(result.errors[0])
    assert updates(message("/sd/seed", float(2**24), types="f")).updates == {"seed": 2**24}


def test_norm_maps_onto_the_range():
    result = updates(message("/sd/norm/strength", 0.25), message("/sd/norm/steps", 1.0),
                     message("/sd/norm/guidance", 0.5), message("/sd/norm/plugin/flow/amount", 0.5))
    assert result.updates == {"strength": 0.25, "steps": 50, "guidance": 15.0, "plugin.flow.amount": 1.0}
    assert not result.errors
    errors = updates(message("/sd/norm/strength", 1.5), message("/sd/norm/prompt", 0.5),
                     message("/sd/norm/strength", "half"), message("/sd/norm/strength", True)).errors
    assert [str(e) for e in errors] == ["/sd/norm/strength: norm/strength 1.5 not in [0, 1]",
                                        "/sd/norm/prompt: prompt has no range to map a fader onto",
                                        "/sd/norm/strength: norm/strength 'half' is not a number in [0, 1]",
                                        "/sd/norm/strength: norm/strength True is not a number in [0, 1]"]
    # A number sent as text, as /sd/strength takes one (QA 6): the same rules every way in.
    assert updates(message("/sd/norm/strength", "0.9"), message("/sd/norm/steps", " 0.5 ")).updates == {
        "strength": 0.9, "steps": 26}  # steps 1-50: 1 + 0.5 × 49 = 25.5, rounded
    assert updates(message("/sd/norm/strength", "０.9")).errors


def test_plugin_path():
    assert updates(message("/sd/plugin/flow/amount", 1.5)).updates == {"plugin.flow.amount": 1.5}


def test_unknown_parameter_is_an_error_with_its_name():
    [error] = updates(message("/sd/strenght", 0.5)).errors
    assert str(error) == "/sd/strenght: unknown parameter 'strenght'" and error.name == "strenght"
    [error] = updates(message("/sd/norm/nope", 0.5)).errors
    assert "unknown parameter 'nope'" in str(error)


def test_out_of_range_names_address_and_value():
    [error] = updates(message("/sd/strength", 4.0)).errors
    assert str(error) == "/sd/strength: strength 4.0 not in [0, 1]"
    assert error.code == "bad_param" and error.value == 4.0


def test_wrong_arity_and_type():
    errors = updates(message("/sd/prompt"), message("/sd/strength", 0.1, "x"), message("/sd/strength", None),
                     message("/sd/strength", b"\x01", types="b"), message("/sd/strength", float("nan"))).errors
    texts = [str(e) for e in errors]
    assert texts[0] == "/sd/prompt needs exactly one argument, got 0"
    assert texts[1] == "/sd/strength needs exactly one argument, got 2"
    assert texts[2] == "/sd/strength None is a NoneType, expected a number or a string"
    assert texts[3] == "/sd/strength b'\\x01' is a bytes, expected a number or a string"
    assert texts[4] == "/sd/strength: strength nan is not a finite number"
    assert all(e.code == "bad_param" for e in errors)


def test_several_samples_in_one_message_are_the_newest_one():
    # An OSC Out CHOP on Format: Time Slice sends every sample of the cook's slice; the last is the fader now.
    result = updates(message("/sd/strength", 0.1, 0.2, 0.3), message("/sd/norm/guidance", 0.0, 0.5),
                     message("/sd/steps", 2.0, 3.2), message("/sd/seed", 7, 4294967295, types="ih"))
    assert result.updates == {"strength": 0.3, "guidance": 15.0, "steps": 3, "seed": 4294967295}
    assert not result.errors
    # The newest sample is checked as a single one would be: past the range, or a float32 seed beyond 2^24.
    [error] = updates(message("/sd/strength", 0.5, 2.0)).errors
    assert str(error) == "/sd/strength: strength 2.0 not in [0, 1]"
    [error] = updates(message("/sd/seed", 1.0, 123456789.0)).errors
    assert "beyond float32's exact integers" in str(error)
    # Strings are not samples: two prompts, or a number beside a string, stay refused.
    errors = updates(message("/sd/prompt", "a", "b"), message("/sd/strength", "0.5", 0.6)).errors
    assert [str(e) for e in errors] == ["/sd/prompt needs exactly one argument, got 2",
                                        "/sd/strength needs exactly one argument, got 2"]


def test_a_norm_fader_s_float32_is_the_decimal_it_showed():
    # QA 49 F6: /sd/norm/strength f 0.37 read back 0.3700000047683716 where /sd/strength f 0.37 reads 0.37.
    assert updates(message("/sd/norm/strength", 0.37)).updates == {"strength": 0.37}
    assert updates(message("/sd/norm/strength", 0.37)).updates == updates(message("/sd/strength", 0.37)).updates


def test_bad_values_do_not_stop_the_good_ones():
    result = updates(message("/sd/nope", 1.0), message("/sd/strength", 4.0), message("/sd/guidance", 2.0),
                     message("/sd/prompt", "a fox"))
    assert result.updates == {"guidance": 2.0, "prompt": "a fox"}
    assert len(result.errors) == 2


def test_a_double_carries_every_seed_exactly():
    # A double holds every integer to 2^53: the float32 rule is for 'f' alone (QA 17: 'd' 4294967295.0 was refused).
    assert updates(message("/sd/seed", 4294967295.0, types="d")).updates == {"seed": 4294967295}
    assert updates(message("/sd/seed", 123456789.0, types="d")).updates == {"seed": 123456789}


def test_in_order_splits_a_datagram_at_each_command():
    calls = parse_datagram(bundle(message("/sd/strength", 0.9), message("/sd/preset", "neon"),
                                  message("/sd/effect", "grade"), message("/sd/steps", 2.0), message("/other/x", 1.0),
                                  message("/sd/get/strength")))
    runs = in_order(calls, SCHEMA)
    assert [[call.address for call in run] for run in runs] == [
        ["/sd/strength"], ["/sd/preset"], ["/sd/effect", "/sd/steps", "/other/x"], ["/sd/get/strength"]]
    assert in_order([], SCHEMA) == []


def test_commands_and_other_prefixes():
    result = updates(message("/other/strength", 0.1), message("/sd/preset", "dusk"),
                     message("/sd/get/strength"), message("/sd"), message("/sdx/strength", 0.1))
    assert result.ignored == 3 and not result.updates and not result.errors
    assert result.outside == ["/other/strength", "/sd", "/sdx/strength"]
    assert result.commands == [OscCall("/sd/preset", ("dusk",)), OscCall("/sd/get/strength", ())]


def test_another_prefix():
    calls = parse_datagram(message("/live/strength", 0.75))
    assert calls_to_updates(calls, SCHEMA, prefix="/live").updates == {"strength": 0.75}
    assert calls_to_updates(calls, SCHEMA).ignored == 1


# --- encoding -------------------------------------------------------------------------------------


def test_encode_message_types():
    data = encode_message("/sd/status/x", 0.5, 7, 4294967295, "text", True, False, None)
    assert data == (b"/sd/status/x\x00\x00\x00\x00" + b",fihsTFN\x00\x00\x00\x00"
                    + b"\x3f\x00\x00\x00" + b"\x00\x00\x00\x07" + b"\x00\x00\x00\x00\xff\xff\xff\xff"
                    + b"text\x00\x00\x00\x00")
    assert parse_datagram(data) == [OscCall("/sd/status/x", (0.5, 7, 4294967295, "text", True, False, None))]
    assert parse_datagram(encode_message("/a", -(2**31) - 1, 2**70)) == [OscCall("/a", (-(2**31) - 1, str(2**70)))]
    with pytest.raises(ValueError, match="does not start with '/'"):
        encode_message("sd/strength", 1.0)


def test_encode_bundles_split_at_max_size_in_order():
    many = [(f"/sd/status/v{i}", (float(i),)) for i in range(200)]
    datagrams = encode_bundles(many, max_size=1400)
    assert len(datagrams) > 1 and all(len(d) <= 1400 for d in datagrams)
    assert [c.address for d in datagrams for c in parse_datagram(d)] == [a for a, _ in many]
    assert encode_bundles([]) == []
    [one] = encode_bundles([("/sd/prompt", ("x" * 2000,))])  # too big for max_size: a bundle of its own
    assert parse_datagram(one) == [OscCall("/sd/prompt", ("x" * 2000,))]


# --- properties: nothing but ProtocolError escapes ------------------------------------------------


def parse_only_protocol_errors(data: bytes) -> None:
    try:
        calls = parse_datagram(data)
    except ProtocolError as exc:
        assert exc.code == "bad_osc"
        return
    calls_to_updates(calls, SCHEMA)  # never raises: errors are collected


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_protocol_error(data):
    parse_only_protocol_errors(data)


@settings(max_examples=500, deadline=None)
@given(st.sampled_from([b"/sd/strength\x00\x00\x00\x00,", b"#bundle\x00" + IMMEDIATE, b"/sd/x\x00\x00\x00"]),
       st.binary(max_size=200))
def test_plausible_heads_with_arbitrary_tails_raise_only_protocol_error(head, tail):
    parse_only_protocol_errors(head + tail)


VALID = [TD_FLOAT, PROMPT, bundle(PROMPT, SEED_I), nested(3), bundle(message("/sd/x", b"blob", "s", 1, types="bsh")),
         message("/sd/m", [1.0, [2, "x"]], True)]


@settings(max_examples=1000, deadline=None)
@given(st.sampled_from(VALID), st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=6),
       st.integers(1, 200))
def test_mutated_valid_packets_raise_only_protocol_error(packet, flips, cut):
    data = bytearray(packet)
    for index, value in flips:
        if index < len(data):
            data[index] = value
    parse_only_protocol_errors(bytes(data[:cut]))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.builds(OscCall, st.sampled_from(["/sd/strength", "/sd/seed", "/sd/steps", "/sd/norm/width",
                                                    "/sd/engine", "/sd/plugin/flow/enabled", "/sd/norm/engine",
                                                    "/sd/nope", "/sd/preset", "/x"]),
                          st.lists(st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                                             st.floats(), st.text(max_size=10), st.binary(max_size=4)),
                                   max_size=2).map(tuple)), max_size=5))
def test_mapping_never_raises(calls):
    actions = calls_to_updates(calls, SCHEMA)
    # Each call ends up in exactly one place (a later update of the same parameter replaces an earlier one).
    assert len(actions.errors) + len(actions.commands) + actions.ignored + len(actions.updates) <= len(calls)
    good, errors = SCHEMA.validate(actions.updates)
    assert not errors and good == actions.updates  # what comes back is already valid


# --- the RGBA colour tag (QA 3, finding 13) ---------------------------------------------------------


def _raw(address: str, tags: str, payload: bytes) -> bytes:
    def padded(text: str) -> bytes:
        raw = text.encode() + b"\x00"
        return raw + bytes(-len(raw) % 4)

    return padded(address) + padded("," + tags) + payload


@pytest.mark.parametrize("address, name, payload", [
    ("/sd/steps", "steps", b"\x00\x00\x00\x05"),
    ("/sd/seed", "seed", b"\xff\xff\xff\xff"),
    ("/sd/strength", "strength", b"\x00\x00\x00\x00"),
    ("/sd/prompt", "prompt", b"\x00\x00\x00\x01"),
    ("/sd/norm/strength", "strength", b"\x00\x00\x00\x01"),
])
def test_an_rgba_colour_is_not_a_parameter_value(address, name, payload):
    # python-osc decodes 'r' as a plain int: /sd/steps ,r 00000005 set steps to 5, silently.
    result = updates(_raw(address, "r", payload))
    assert not result.updates
    [error] = result.errors
    assert error.code == "bad_param" and error.name == name
    assert str(error) == f"{address} is an RGBA colour ('r'), expected a number or a string"


def test_a_colour_still_parses_as_an_argument_of_other_addresses():
    # Not a parameter: a command or another prefix may carry one; parsing itself still accepts the tag.
    [call] = parse_datagram(_raw("/other/colour", "r", b"\x01\x02\x03\x04"))
    assert call == OscCall("/other/colour", (0x01020304,)) and call.tags == "r"


def test_a_float32_is_read_as_the_decimal_it_was_typed_as():
    """0.2 as float32 is 0.20000000298023224, past a range that ends at 0.2: a sender could not reach the bound
    (QA 26: safety_filter.sensitivity ±0.2 was refused over OSC alone)."""
    schema = Schema()
    schema.add(ParamSpec("plugin.safety.sensitivity", "float", 0.0, "bias", minimum=-0.2, maximum=0.2,
                         group="plugin"))
    for value in (0.2, -0.2):
        result = updates(message("/sd/plugin/safety/sensitivity", value), schema=schema)
        assert result.updates == {"plugin.safety.sensitivity": value} and not result.errors
    assert updates(message("/sd/strength", 0.7)).updates == {"strength": 0.7}   # not 0.699999988079071
    assert updates(message("/sd/strength", 1 / 3)).updates["strength"] == pytest.approx(1 / 3, abs=1e-7)
    # A float32 rounding past the end is the end (QA 41: test_a_fader_a_rounding_past_its_end_is_at_its_end); past
    # it by more is still past.
    result = updates(message("/sd/plugin/safety/sensitivity", 0.2000001), schema=schema)
    assert result.updates == {"plugin.safety.sensitivity": 0.2} and not result.errors
    result = updates(message("/sd/plugin/safety/sensitivity", 0.2001), schema=schema)
    assert not result.updates and "0.2001 not in [-0.2, 0.2]" in str(result.errors[0])
