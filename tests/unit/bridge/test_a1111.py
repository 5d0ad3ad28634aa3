"""a1111.b64_bytes: base64 as A1111 reads it, decoded in pieces (made tiny here so every boundary is crossed)."""

from __future__ import annotations

import base64

import pytest
from fastapi import HTTPException
from hypothesis import given, settings
from hypothesis import strategies as st

from sdbridge.bridge import a1111


def decoded(text: str, piece: int = 8) -> bytes | str:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(a1111, "B64_PIECE", piece)
        try:
            return a1111.b64_bytes(text, "image")
        except HTTPException as exc:
            return exc.detail


@settings(max_examples=500, deadline=None)
@given(data=st.binary(min_size=1, max_size=64), cuts=st.lists(st.integers(0, 200), max_size=12),
       spaces=st.lists(st.sampled_from([" ", "\n", "\r\n", "\t"]), min_size=12, max_size=12))
def test_whitespace_anywhere_decodes_as_without_it(data, cuts, spaces):
    text = base64.b64encode(data).decode()
    for cut, space in zip(sorted(cuts, reverse=True), spaces):
        text = text[:cut] + space + text[cut:]
    assert decoded(text) == data


@pytest.mark.parametrize("text", [
    "QUI=QUJD",   # padding at the end of a piece, data after it (QA 56 F2: taken when it fell on the boundary)
    "QUI=" + "QUJD" * 3,
    "QUJD\u00a0",  # a no-break space is no ASCII whitespace: refused in any piece (QA 56 F3)
    "QU JD\u00a0",
    "QUJD!",
])
def test_what_a_whole_string_decode_refuses_is_refused_in_pieces(text):
    assert decoded(text, piece=4) == "image: not valid base64"
    assert decoded(text, piece=1024) == "image: not valid base64"


def test_padding_then_only_whitespace_ends_the_data():
    assert decoded("QUI=\n\n  ", piece=4) == b"AB"
    # padding that a piece's end splits, whitespace between (the property test's case, piece 8)
    assert decoded(" AAAAAAAAAAAAAA==") == bytes(10)
    assert decoded("AAAAAAA=\n=") == "image: not valid base64"  # "AAAAAAA==": bad padding, refused whole too


@settings(max_examples=500, deadline=None)
@given(data=st.binary(min_size=1, max_size=40), inserts=st.lists(
    st.tuples(st.integers(0, 100), st.sampled_from(["=", "==", "A", "!", " ", "\n", "\t"])), max_size=6),
    piece=st.sampled_from([4, 8, 12]))
def test_pieces_decide_as_one_whole_string_decode(data, inserts, piece):
    """Valid or not: the pieces' answer is the whole string's, whitespace aside (excess padding included, which
    Python's decode lets pass)."""
    text = base64.b64encode(data).decode()
    for at, inserted in inserts:
        text = text[:at] + inserted + text[at:]
    try:
        whole = base64.b64decode("".join(text.split()), validate=True) or "image: empty (no image data)"
    except ValueError:  # binascii.Error is one
        whole = "image: not valid base64"
    assert decoded(text, piece) == whole


@pytest.mark.parametrize("field", ["hr_prompt", "hr_negative_prompt"])
@pytest.mark.parametrize("text, kind", [("a \ud800 fox", "string_unicode"), ("x" * 20001, "string_too_long")])
def test_the_hires_prompts_have_the_prompt_s_bound_and_refuse_a_lone_surrogate(field, text, kind):
    """QA 72 F11: a lone surrogate reached the tokenizer (a TypeError, answered 500), and the length was unbounded."""
    from pydantic import ValidationError

    for name in ("prompt", field):
        with pytest.raises(ValidationError) as caught:
            a1111.Txt2ImgRequest(**{name: text})
        assert [(error["loc"], error["type"]) for error in caught.value.errors()] == [((name,), kind)]
    assert a1111.Txt2ImgRequest(**{field: "x" * 20000}).model_dump()[field] == "x" * 20000


@pytest.mark.parametrize(("prompt", "negative", "hires_steps", "words"), [
    # Weights inside a schedule's text that is never encoded: A1111 runs these (it encodes 'dog').
    ("[(cat:150):dog:0]", "", None, None),
    ("[(cat:1.2.3):dog:0]", "", None, None),
    ("a fox", "[(blur:150):fog:0]", None, None),
    # A text that is encoded at some step: its weight checked as the worker will (95.45 to the raw check).
    ("[dog:(cat:105):0.5]", "", None, "prompt: prompt weight 105 of 'cat' is out of range"),
    ("a fox AND [dog:(cat:105):0.5]:0.5", "", None, "prompt: prompt weight 105"),
    ("a fox", "[fog:(blur:105):0.5]", None, "negative_prompt: prompt weight 105"),
    ("(a fox:1.2.3)", "", None, "prompt: prompt weight '1.2.3'"),
    # 1.5: half-way through the hires pass, after the first pass's 10 steps; the empty hires prompt is the prompt's.
    ("[dog:(cat:105):1.5]", "", None, None),
    ("[dog:(cat:105):1.5]", "", 10, "prompt: prompt weight 105"),
    ("a cat" + " AND" * 64, "", None, "prompt: 65 AND parts, more than the 64"),
])
def test_weights_are_checked_on_the_texts_the_schedule_encodes(prompt, negative, hires_steps, words):
    """QA 72 F9: the raw prompt was checked, where a [from:to:when] is an attention bracket and its ':' text."""
    from fastapi import HTTPException

    def check() -> None:
        if hires_steps is None:
            a1111.A1111Api.check_texts("txt2img", 10, prompt, negative)
        else:
            a1111.A1111Api.check_texts("txt2img", 10, "", "", hires_steps, (prompt, negative))

    if words is None:
        check()
        return
    with pytest.raises(HTTPException) as caught:
        check()
    assert caught.value.status_code == 422 and words in caught.value.detail, caught.value.detail


def test_the_hires_pass_s_own_prompts_are_named_as_theirs():
    from fastapi import HTTPException

    a1111.A1111Api.check_texts("txt2img", 10, "a fox", "blur", 10, ("(a fox:150)", ""))  # the first's unused
    for prompt, negative, first, name in [("(a fox:150)", "", ("a fox", "blur"), "hr_prompt"),
                                          ("", "(blur:150)", ("a fox", "blur"), "hr_negative_prompt"),
                                          ("", "", ("(a fox:150)", "blur"), "prompt"),
                                          ("", "", ("a fox", "(blur:150)"), "negative_prompt")]:
        with pytest.raises(HTTPException, match=f"^422: {name}: prompt weight 150"):
            a1111.A1111Api.check_texts("txt2img", 10, prompt, negative, 10, first)
