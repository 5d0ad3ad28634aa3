import pytest

from sdbridge.outputs.base import OutputError, OutputSpec, parse_interpolate, parse_spec


@pytest.mark.parametrize("text, factor", [
    ("record:rec?interpolate=2X", 2), ("record:rec?interpolate=OFF", 1), ("record:rec?interpolate=Off@live", 1),
])
def test_interpolate_is_read_in_any_case(text: str, factor: int) -> None:
    assert parse_spec(text).interpolate == factor


@pytest.mark.parametrize("value", [" 2x", "2x ", " off", "\t3"])
def test_spaces_around_interpolate_are_refused(value: str) -> None:
    text = f"record:rec?interpolate={value}@live"
    with pytest.raises(OutputError, match="has spaces around it; write '") as error:
        parse_spec(text)
    assert error.value.code == "bad_output"
    assert str(error.value).startswith(f"output {text!r}: interpolate {value!r}")


def test_parse_interpolate_names_where_the_value_came_from() -> None:
    assert parse_interpolate("4x", "--interpolate") == 4 and parse_interpolate(3, "x") == 3
    with pytest.raises(OutputError, match=r"^--interpolate: interpolate ' 2x' has spaces around it; write '2x'$"):
        parse_interpolate(" 2x", "--interpolate")
    with pytest.raises(OutputError, match=r"^here: interpolate '5x' is not off, 1-4 or 2x-4x$"):
        parse_interpolate("5x", "here")
    assert parse_spec("record:rec") == OutputSpec("record", "rec")
