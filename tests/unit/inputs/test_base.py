"""--input specs: what parses, and what each malformed one is told."""

from __future__ import annotations

import pytest

from sdbridge.bridge.protocol import PixelFormat
from sdbridge.inputs.base import InputError, InputSpec, create_input, parse_spec


def test_specs_parse_with_options_session_and_channel() -> None:
    assert parse_spec("file:clips/a.mp4") == InputSpec("file", "clips/a.mp4")
    assert parse_spec("file:clips/a.mp4").session_name == "file"  # no @SESSION: the kind's name
    assert parse_spec("camera") == InputSpec("camera")
    assert parse_spec("shm:td_out@cam1") == InputSpec("shm", "td_out", "cam1")
    assert parse_spec("ndi:STUDIO (TD)@cam1#2") == InputSpec("ndi", "STUDIO (TD)", "cam1", 2)
    spec = parse_spec("file:C:\\clips\\a b.mov?fps=12.5&loop=off&reply=png@s1")
    assert spec == InputSpec("file", "C:\\clips\\a b.mov", "s1", 0, fps=12.5, loop=False, reply=PixelFormat.PNG)
    assert parse_spec("camera:1?width=1280&height=720&fps=30").width == 1280
    assert str(parse_spec("shm@s2#3")) == "shm@s2#3"


@pytest.mark.parametrize("text, message", [
    ("hdmi:1", "unknown input 'hdmi'"),
    ("file", "file needs a path"),
    ("file:", "empty target"),
    ("File:x", "is not KIND"),
    ("file:x@bad session!", "session 'bad session!' is not"),
    ("file:x@s1#256", "channel 256 not in"),
    ("file:x@s1#", "session 's1#' is not"),
    ("file:x?fps=0", "fps '0' is not a number"),
    ("file:x?fps=nan", "fps 'nan' is not a number"),
    ("file:x?fps", "option 'fps' is not NAME=VALUE"),
    ("file:x?loop=maybe", "loop 'maybe' is not true or false"),
    ("file:x?reply=gif", "reply 'gif' is not one of"),
    ("shm:x?fps=30", "unknown option 'fps' for shm"),
    ("camera:0?width=0", "width '0' is not a whole number"),
])
def test_a_malformed_spec_says_which_part_is_wrong(text: str, message: str) -> None:
    with pytest.raises(InputError, match=message) as error:
        parse_spec(text)
    assert error.value.code == "bad_input"
    assert repr(text) in str(error.value)  # the sentence quotes the whole value given


def test_a_file_that_is_not_there_is_a_start_up_error(tmp_path) -> None:
    with pytest.raises(InputError, match="does not exist") as error:
        create_input(parse_spec(f"file:{tmp_path / 'nope.mp4'}")).check()
    assert error.value.code == "bad_input"
    with pytest.raises(InputError, match="holds no images"):
        create_input(parse_spec(f"file:{tmp_path}")).check()
