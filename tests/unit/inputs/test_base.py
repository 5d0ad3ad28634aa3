"""--input specs: what parses, and what each malformed one is told."""

from __future__ import annotations

import pytest

from sdbridge.bridge.protocol import PixelFormat
from sdbridge.inputs.base import MAX_SHM_NAME_BYTES, InputError, InputSpec, create_input, parse_spec


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


@pytest.mark.parametrize("options_first, options_last", [
    ("file:frames/?fps=24@live", "file:frames/@live?fps=24"),
    ("file:C:\\clips\\a b.mov?fps=12.5&loop=off&reply=png@s1",
     "file:C:\\clips\\a b.mov@s1?fps=12.5&loop=off&reply=png"),
    ("camera:1?width=1280&height=720@cam#2", "camera:1@cam#2?width=1280&height=720"),
    ("file:/shows/a@b/clip.mp4?loop=false@s1", "file:/shows/a@b/clip.mp4@s1?loop=false"),  # a path with an '@'
    ("shm:td?reply=rgb8", "shm:td?reply=rgb8"),
])
def test_options_go_before_or_after_the_session_with_the_same_result(options_first: str, options_last: str) -> None:
    # Outputs take options after @SESSION and inputs documented them before it; a rig writes both on one line.
    assert parse_spec(options_last) == parse_spec(options_first)


def test_the_spec_read_back_names_every_option_that_is_not_the_default() -> None:
    # /stats shows str(spec): an input's options are part of what runs, as an output's interpolate is.
    assert str(parse_spec("file:frames/@live?fps=24")) == "file:frames/?fps=24@live"
    assert str(parse_spec("camera:1?reply=png&width=1280&height=720&fps=29.97@cam#2")) == \
        "camera:1?fps=29.97&width=1280&height=720&reply=png@cam#2"
    assert str(parse_spec("file:a.mp4?loop=no&reply=jpeg")) == "file:a.mp4?loop=false@file"  # defaults left out
    spec = parse_spec(str(parse_spec("file:a.mp4@s1?fps=12.5&loop=off&reply=rgba8")))  # the read-back parses
    assert spec == parse_spec("file:a.mp4?fps=12.5&loop=off&reply=rgba8@s1")


def test_a_shm_name_the_system_takes_is_accepted() -> None:
    assert parse_spec("shm:td_out-2.cam").target == "td_out-2.cam"
    assert parse_spec("shm:" + "n" * MAX_SHM_NAME_BYTES).target == "n" * MAX_SHM_NAME_BYTES


@pytest.mark.parametrize("text, message", [
    ("hdmi:1", "unknown input 'hdmi'"),
    ("file", "file needs a path"),
    ("file:", "empty target"),
    ("File:x", "is not KIND"),
    ("file:x@bad session!", "session 'bad session!' is not"),
    ("file:x@s1#256", "channel 256 not in"),
    ("file:x@s1#", "session 's1#' is not"),
    ("file:x@..", "session '..' is not 1-64 of A-Z a-z 0-9 _ . -, not . or .."),
    ("file:x@.#2", "session '.#2' is not"),
    ("file:x?fps=0", "fps '0' is not a number"),
    ("file:x?fps=nan", "fps 'nan' is not a number"),
    ("file:x?fps", "option 'fps' is not NAME=VALUE"),
    ("file:x?loop=maybe", "loop 'maybe' is not true or false"),
    ("file:x?reply=gif", "reply 'gif' is not one of"),
    ("shm:x?fps=30", r"\(shm\): unknown option 'fps' \(known: reply\)"),
    ("camera:0?width=0", "width '0' is not a whole number"),
    ("camera:0?width=\uff11", "width '\uff11' is not a whole number"),  # a full-width 1: int() would take it
    ("camera:0?width=\u00b2", "width '\u00b2' is not a whole number"),  # a superscript 2: isdigit() says yes
    ("file:x?fps=\uff12\uff14", "fps '\uff12\uff14' is not a number"),  # full-width 24: float() would take it
    ("file:x?fps=24&fps=30", "option 'fps' is given twice"),
    ("file:x@s1?fps=24&loop=no&fps=30", "option 'fps' is given twice"),
    ("file:x@s1?fps=fast", "fps 'fast' is not a number"),
    ("file:x@s1#2?loop=maybe", "loop 'maybe' is not true or false"),
    ("file:x@s1?", "option '' is not NAME=VALUE"),
    ("shm:bad/name@s1", "shared memory name 'bad/name' is not a name a segment can have"),
    ("shm:bad\\name", "is not a name a segment can have"),
    ("shm:..", "is not a name a segment can have"),
    ("shm:" + "n" * 300, "the shared memory name is 300 bytes long; at most"),
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
    assert repr(f"file:{tmp_path / 'nope.mp4'}") in str(error.value)  # quoted as typed, as every other spec error
    with pytest.raises(InputError, match="holds no images"):
        create_input(parse_spec(f"file:{tmp_path}")).check()


@pytest.mark.parametrize("text", ["file:frames/?fps=24?loop=true@live", "file:frames/@live?fps=24?loop=true",
                                  "camera:0?width=640?height=480"])
def test_options_joined_by_a_second_question_mark_are_refused_quoting_the_argument(text: str) -> None:
    # The last '?' starts the options, so the first one's option would be read into the path and the error would
    # be a missing file under a rewritten spec ('file:frames/?fps=24@live'), the documented valid form.
    with pytest.raises(InputError, match="options are joined by '&', not a second '\\?'") as error:
        parse_spec(text)
    assert str(error.value).startswith(f"input {text!r}: ")
    assert error.value.code == "bad_input"


def test_a_spec_keeps_the_argument_as_typed_for_later_errors() -> None:
    typed = "file:frames/@live?loop=FALSE&fps=24"
    spec = parse_spec(f"  {typed} ")
    assert spec.text == f"  {typed} " and str(spec) == "file:frames/?fps=24&loop=false@live"
    assert spec == parse_spec("file:frames/?fps=24&loop=false@live")  # the text does not change what it is
