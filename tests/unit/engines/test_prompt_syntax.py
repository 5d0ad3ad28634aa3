"""AUTOMATIC1111's prompt syntax: its documented examples, our table of cases, properties."""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sdbridge.engines.prompt_syntax import (
    BREAK,
    LoraRef,
    LoraWeights,
    PromptPiece,
    extract_networks,
    parse_prompt,
    parse_prompt_attention,
)
from tests.support.timing import best_time

# parse_prompt_attention's docstring in A1111's modules/prompt_parser.py, outputs as written there.
A1111_DOCSTRING = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    ("\\(literal\\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).", [
        ("a ", 1.0), ("house", 1.5730000000000004), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
        (", sun, ", 1.1), ("sky", 1.4641000000000006), (".", 1.1)]),
]


@pytest.mark.parametrize("text, expected", A1111_DOCSTRING, ids=[case[0] for case in A1111_DOCSTRING])
def test_a1111_docstring_examples_exactly(text, expected):
    assert parse_prompt_attention(text) == expected


CASES = [
    ("", [("", 1.0)]),
    ("((word))", [("word", 1.1 * 1.1)]),
    ("[word]", [("word", 1 / 1.1)]),
    ("[[word]]", [("word", (1 / 1.1) * (1 / 1.1))]),
    ("(word:1.3)", [("word", 1.3)]),
    ("(word: 0.25 )", [("word", 0.25)]),
    ("(word:-1.5)", [("word", -1.5)]),
    ("a:b", [("a:b", 1.0)]),                              # a colon outside brackets is text
    ("\\\\", [("\\", 1.0)]),
    ("\\(x\\)", [("(x)", 1.0)]),
    ("x]", [("x]", 1.0)]),                               # a stray closer is text
    ("(a [b] c)", [("a ", 1.1), ("b", 1.0), (" c", 1.1)]),
    ("a BREAK b", [("a", 1.0), (BREAK, -1.0), ("b", 1.0)]),
    ("BREAKfast", [("BREAKfast", 1.0)]),                 # only the whole word
    ("a break b", [("a break b", 1.0)]),                 # only in capitals
]


@pytest.mark.parametrize("text, expected", CASES, ids=[case[0] or "empty" for case in CASES])
def test_table_of_cases(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-12)


def test_break_inside_brackets_still_breaks_in_parse_prompt():
    # A1111 reads it as the text "BREAK" at weight -1.1; we keep it a break (module docstring).
    assert parse_prompt_attention("(a BREAK b)") == [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]
    pieces = parse_prompt("(a BREAK b)").pieces
    assert pieces == (PromptPiece("a", 1.1), PromptPiece(BREAK, -1.0, is_break=True), PromptPiece("b", 1.1))


def test_plain_prompt_is_one_piece():
    parsed = parse_prompt("a red fox, in snow")
    assert parsed.plain and parsed.pieces == (PromptPiece("a red fox, in snow"),)
    assert not parse_prompt("a (red) fox").plain
    assert not parse_prompt("a BREAK fox").plain


@pytest.mark.parametrize("text, stripped, loras", [
    ("a fox <lora:ink:0.5>", "a fox ", (LoraRef("ink", 0.5),)),
    ("<lora:ink>a fox", "a fox", (LoraRef("ink", 1.0),)),
    ("<lyco:paper:0.3>, <lora:ink:1.2>", ", ", (LoraRef("paper", 0.3), LoraRef("ink", 1.2))),
    ("<lora:ink:te=0.7>", "", (LoraRef("ink", 0.7),)),
    ("<lora:ink:0.6:0.6>", "", (LoraRef("ink", 0.6),)),
    ("<lora:sub dir/ink:-0.5>", "", (LoraRef("sub dir/ink", -0.5),)),
])
def test_lora_tags_are_taken_out(text, stripped, loras):
    got = extract_networks(text)
    assert got[0] == stripped and got[1] == loras and got[3] == ()


def test_lora_tag_inside_brackets_leaves_the_weights_alone():
    parsed = parse_prompt("a (fox <lora:ink:0.5>:1.2)")
    assert parsed.loras == (LoraRef("ink", 0.5),)
    assert parsed.pieces == (PromptPiece("a ", 1.0), PromptPiece("fox ", 1.2))


@pytest.mark.parametrize("text, message", [
    ("<lora:ink:lots>", "'lots' is not a number"),
    ("<lora:ink:0.5:1.0>", "separate text-encoder"),
    ("<lora::0.5>", "has no name"),
    ("<lora:ink:nan>", "not a finite number"),
])
def test_bad_lora_tags_are_reported_not_raised(text, message):
    parsed = parse_prompt(text)
    assert parsed.loras == ()
    assert len(parsed.errors) == 1 and message in parsed.errors[0]


def test_other_network_tags_are_taken_out_and_reported():
    parsed = parse_prompt("a fox <hypernet:anime:1>")
    assert parsed.pieces == (PromptPiece("a fox "),)
    assert parsed.other_networks == ("<hypernet:anime:1>",)


def test_a_lora_named_twice_adds_up():
    assert parse_prompt("<lora:a:0.5> x <lora:a:0.25> <lora:b>").lora_weights() == {"a": 0.75, "b": 1.0}


@pytest.mark.parametrize("text, expected", [
    ("", {}), ("ink", {"ink": 1.0}), ("ink:0.8, paper:0.5", {"ink": 0.8, "paper": 0.5}),
    (" ink : -0.5 ,", {"ink": -0.5}), ("a:1,a:2", {"a": 3.0}),
])
def test_lora_weights_parameter(text, expected):
    assert LoraWeights.parse(text).weights == expected


@pytest.mark.parametrize("text, message", [("ink:lots", "'lots' is not a number"), (":0.5", "not name:weight"),
                                           ("ink:inf", "finite"), ("loha:1:2:3", "several weights"),
                                           ("loha:0.5:1", "several weights")])
def test_lora_weights_parameter_errors(text, message):
    with pytest.raises(ValueError, match=message):
        LoraWeights.parse(text)


syntax_text = st.text(alphabet=st.sampled_from(list("ab ():[]\\<>.,:-+0123456789BREAKlora")), max_size=60)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=80), syntax_text))
def test_never_raises_and_keeps_the_words(text):
    parsed = parse_prompt(text)
    attention = parse_prompt_attention(text)
    assert parsed.pieces and attention
    for piece in parsed.pieces:
        assert piece.is_break or piece.weight == piece.weight  # not NaN from our own multipliers
    # Outside brackets, escapes, tags and BREAK, the text comes back unchanged.
    if not any(ch in text for ch in "()[]\\<:") and "BREAK" not in text:
        assert [(p.text, p.weight) for p in parsed.pieces] == [(text, 1.0)]


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="()[]\\:<>"), max_size=30),
       st.floats(min_value=-10, max_value=10, allow_nan=False).map(lambda x: round(x, 3)))
def test_explicit_weight_round_trips(word, weight):
    if "BREAK" in word or not word:
        return
    assert parse_prompt_attention(f"({word}:{weight})") == [(word, weight)]


@pytest.mark.parametrize("prompt", ["(a cat:1" + "0" * 40 + ")", "(a cat:" + "9" * 400 + ")", "(((a cat:20):20))",
                                    "(a cat:-1000)"])
def test_a_weight_that_would_overflow_is_an_error(prompt):
    """QA: (a cat:1 and 40 zeros) overflowed the embeddings to inf: every session's frames black, unreported."""
    error = parse_prompt(prompt).weight_error
    assert error is not None and "out of range" in error and "'a cat'" in error


@pytest.mark.parametrize("prompt", ["(a cat:1.5)", "((a cat:20))", "(a cat:-2)", "[[[[a cat]]]]", "a BREAK b",
                                    "(a cat:1e40)"])  # A1111 reads no exponent: "a cat:1e40" is text
def test_usual_weights_pass(prompt):
    assert parse_prompt(prompt).weight_error is None


def test_a_weight_that_is_not_a_number_is_an_error():
    """'(x:1.2.3)': A1111 fails the request at float(); read as weight 1, the typo passed unseen (QA 24)."""
    for prompt, number in (("a (cat:1.2.3) dog", "1.2.3"), ("(cat:.)", "."), ("((cat:1..5))", "1..5")):
        error = parse_prompt(prompt).weight_error
        assert error is not None and f"prompt weight {number!r}" in error and "is not a number" in error
    assert parse_prompt("a (cat:1.2) dog").weight_error is None
    assert parse_prompt("cat:1.2.3)").weight_error is None   # no bracket open: text, as in A1111


def _growth(function, make, size: int) -> float:
    """Time at 16 x size over time at size: 16 when linear (up to ~50 seen on a loaded machine), 256 when
    quadratic. The tests take 128 as the line between."""
    return best_time(function, make(16 * size)) / best_time(function, make(size))


_parse_uncached = getattr(parse_prompt, "__wrapped__", parse_prompt)


def test_a_run_of_spaces_parses_in_linear_time():
    """QA 72 F3: A1111's BREAK regex retried its leading \\s* at every space: 'a' + 4,094 spaces + 'b' took 0.35 s
    a parse, redone every frame while an LFO runs."""
    assert _growth(_parse_uncached, lambda n: "a" + " " * n + "b BREAK \n" * 2, 500) < 128
    assert parse_prompt("a" + " " * 300 + "BREAK" + "\n" * 300 + "b").pieces == (
        PromptPiece("a"), PromptPiece(BREAK, -1.0, is_break=True), PromptPiece("b"))


def test_nested_brackets_parse_in_linear_time():
    """QA 72 F4: each bracket multiplied every piece since it opened: 4,096 characters of "([" then escapes,
    weights near 1 so accepted, took 0.17 s a parse."""
    assert _growth(_parse_uncached, lambda n: "([" * (n // 4) + "a\\(" * (n // 6), 1024) < 128
    assert _growth(_parse_uncached, lambda n: "(" * (n // 2) + "a)" * (n // 4), 1024) < 128


def _a1111_weights(text: str) -> list[tuple[str, float]]:
    """A1111's parse_prompt_attention, its multiplications as written (no BREAK, no merge)."""
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []
    for match in re.finditer(r"\\[()\[\]\\]|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:", text):
        token, weight = match.group(0), match.group(1)
        if token in ("(", "["):
            (round_brackets if token == "(" else square_brackets).append(len(res))
        elif (weight is not None or token == ")") and round_brackets:
            start = round_brackets.pop()
            res[start:] = [[t, w * (float(weight) if weight else 1.1)] for t, w in res[start:]]
        elif token == "]" and square_brackets:
            start = square_brackets.pop()
            res[start:] = [[t, w / 1.1] for t, w in res[start:]]
        else:
            res.append([token[1:] if token.startswith("\\") else token, 1.0])
    for start in round_brackets:
        res[start:] = [[t, w * 1.1] for t, w in res[start:]]
    for start in square_brackets:
        res[start:] = [[t, w / 1.1] for t, w in res[start:]]
    return [(t, w) for t, w in res]


@pytest.mark.parametrize("text", ["(" * 300 + "a)" * 300, "([" * 200 + "a\\(b)]" * 150 + "c:0.5)" * 50,
                                  "[" * 120 + "(a:1.01)" * 400 + "(b" * 200 + "c]" * 100])
def test_deeply_nested_weights_stay_a1111s(text):
    """Past the exact-order budget the products are taken in one sweep: the same weights to rounding."""
    expected = _a1111_weights(text)
    pieces = parse_prompt_attention(text)
    assert "".join(t for t, _ in pieces) == "".join(t for t, _ in expected)
    at = [w for t, w in expected for _ in t]
    got = [w for t, w in pieces for _ in t]
    assert got == pytest.approx(at, rel=1e-9)


def test_unclosed_tag_openers_extract_in_linear_time():
    """'<kind:' with no '>' after it: the tag regex ran to the end of the text from each one."""
    assert _growth(lambda text: extract_networks(text), lambda n: "<a:" * (n // 3), 500) < 128
    assert extract_networks("<a:<lora:x:0.5> y <b:") == (" y <b:", (), ("<a:<lora:x:0.5>",), ())


def test_the_same_prompt_is_parsed_once():
    """The stream asks for the parse of the same prompt every frame while an LFO runs."""
    prompt = "a (red:1.2) fox BREAK <lora:ink:0.5> snow"
    assert parse_prompt(prompt) is parse_prompt(prompt)
    assert parse_prompt(prompt).loras == (LoraRef("ink", 0.5),)


@pytest.mark.parametrize("text, value", [("a <lora:ink:1e30> fox", "1e30"), ("<lora:ink:-101>", "-101"),
                                         ("<lora:ink:te=1:unet=500>", "500")])
def test_a_lora_tag_weight_past_the_bound_is_an_error(text, value):
    """QA 72 F7: <lora:x:1e30> was accepted and turned every frame of every session NaN."""
    parsed = parse_prompt(text)
    assert parsed.loras == () and len(parsed.errors) == 1
    assert f"weight {value} is out of range" in parsed.errors[0] and "±100" in parsed.errors[0]


def test_lora_tags_adding_up_past_the_bound_are_an_error():
    parsed = parse_prompt("<lora:ink:60> fox <lora:ink:60>")
    assert len(parsed.errors) == 1 and "'ink'" in parsed.errors[0] and "120" in parsed.errors[0]
    assert parse_prompt("<lora:ink:100> <lora:ink:-100> <lora:ink:-2.5>").errors == ()


@pytest.mark.parametrize("text, message", [("ink:1e30", r"weight 1e\+30 is out of range"),
                                           ("ink:-100.5", "weight -100.5 is out of range"),
                                           ("ink:70, ink:70", "140 in all")])
def test_lora_parameter_weight_past_the_bound_is_an_error(text, message):
    with pytest.raises(ValueError, match=message):
        LoraWeights.parse(text)
    assert LoraWeights.parse("ink:100, other:-100").weights == {"ink": 100.0, "other": -100.0}
