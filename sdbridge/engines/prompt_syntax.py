"""AUTOMATIC1111's prompt syntax: attention weights, BREAK and ``<lora:...>`` tags.

What A1111 users write, and what it means here (as in A1111's ``modules/prompt_parser.py`` and
``modules/extra_networks.py``):

- ``(word)`` multiplies the weight of ``word`` by 1.1, ``((word))`` by 1.1², ``[word]`` divides it
  by 1.1, ``(word:1.3)`` multiplies it by 1.3; brackets left open apply to the end of the prompt;
- ``\\(``, ``\\)``, ``\\[``, ``\\]``, ``\\\\`` are the literal characters;
- ``BREAK`` (a whole word, in capitals) starts a new 75-token chunk;
- ``<lora:name>``, ``<lora:name:0.8>`` (``<lyco:...>`` too) are taken out of the text and returned
  as LoRAs to apply; other ``<kind:...>`` tags (hypernetworks) are taken out and reported.

:func:`parse_prompt_attention` gives exactly A1111's pairs (its docstring examples are in
tests/unit/engines/test_prompt_syntax.py). One deliberate difference, in :func:`parse_prompt`
only: a ``BREAK`` inside brackets still breaks (A1111 multiplies its marker weight -1 by the
bracket and then reads the word "BREAK" as text).

Pure: no torch, no tokenizer. Nothing here raises on any string: problems (a tag weight that is
not a number) are reported in :attr:`ParsedPrompt.errors` for the engine to raise.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass, field

ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = "BREAK"
LORA_KINDS = ("lora", "lyco")
# A weight scales the text encoder's output (then its mean is restored): past this, in fp16 or even fp32, the
# embeddings overflow to inf and every frame of every session comes out NaN (black). A1111's prompts stay
# within a few units; nesting multiplies, so the check is on each piece's product. A LoRA's weight scales its
# deltas in every layer, and LoRAs are model-wide: one session's <lora:x:1e30> blacked out all (QA 72 F7).
MAX_WEIGHT = 100.0

# A1111's tokeniser of attention syntax, alternative by alternative (prompt_parser.re_attention).
RE_ATTENTION = re.compile(r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""", re.X)
# A1111 splits on r"\s*\bBREAK\b\s*"; that regex retries its leading \s* at every space of a run (quadratic: a
# 4,096-character prompt of spaces cost 0.35 s a frame, QA 72 F3). The word alone, then stripping the sides, is the
# same split (re's \s is exactly str.isspace) in linear time.
_BREAK_WORD = re.compile(r"\bBREAK\b")
# A1111's extra-network tag (extra_networks.re_extra_net): <kind:arguments>.
RE_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class LoraRef:
    """A ``<lora:name:weight>`` tag: ``weight`` applies to the UNet and the text encoder alike."""

    name: str
    weight: float = 1.0


@dataclass(frozen=True)
class PromptPiece:
    """A run of text at one weight; ``is_break`` marks a BREAK (its text and weight unused)."""

    text: str
    weight: float = 1.0
    is_break: bool = False


@dataclass(frozen=True)
class ParsedPrompt:
    pieces: tuple[PromptPiece, ...]
    loras: tuple[LoraRef, ...] = ()
    other_networks: tuple[str, ...] = ()      # tags of kinds we do not run, as written ("<hypernet:x:1>")
    errors: tuple[str, ...] = ()
    weight_error: str | None = None           # a weight past MAX_WEIGHT (or not finite): the frame would be NaN

    @property
    def plain(self) -> bool:
        """True when the prompt is one piece at weight 1: it encodes exactly as diffusers does."""
        return len(self.pieces) == 1 and self.pieces[0].weight == 1.0 and not self.pieces[0].is_break

    def lora_weights(self) -> dict[str, float]:
        """{name: weight}; a LoRA named twice gets the sum of its weights."""
        weights: dict[str, float] = {}
        for ref in self.loras:
            weights[ref.name] = weights.get(ref.name, 0.0) + ref.weight
        return weights


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """A1111's ``parse_prompt_attention``: (text, weight) pairs, BREAK as ("BREAK", -1.0).

    >>> parse_prompt_attention('an (important) word')
    [('an ', 1.0), ('important', 1.1), (' word', 1.0)]
    """
    return [(piece.text, piece.weight) if not piece.is_break else (BREAK, -1.0)
            for piece in _parse_attention(text, a1111_breaks=True)]


def _split_breaks(token: str) -> list[str]:
    """``token`` split at each BREAK word, the whitespace around each BREAK dropped (A1111's RE_BREAK.split)."""
    parts = _BREAK_WORD.split(token)
    last = len(parts) - 1
    for index in range(1, last + 1):
        parts[index] = parts[index].lstrip()
    for index in range(last):
        parts[index] = parts[index].rstrip()
    return parts


# A1111 multiplies every piece since a bracket opened when it closes: brackets x pieces (QA 72 F4: 0.19 s a frame for
# 4,096 characters of "([" pairs). That product order is kept while its cost is within this many multiplications per
# piece (prompts people write use a few); past it, each piece's weight is taken as one product per bracket kind in a
# single sweep, which can differ from A1111's only in the last bits.
_EXACT_WORK_PER_PIECE = 16
_EXACT_WORK_MIN = 1024


def _parse_attention(text: str, a1111_breaks: bool = False, bad_numbers: list[str] | None = None) -> list[PromptPiece]:
    """The pieces; each weight that is not a number (``(a:1.2.3)``) is weight 1 and goes into ``bad_numbers``."""
    res: list[list] = []   # [text, weight, is_break]
    round_brackets: list[int] = []
    square_brackets: list[int] = []
    # Each bracket as (first piece, end piece, multiplier, is_round), in A1111's order of multiplying: as they close,
    # then the ones left open (round, then square, outermost first).
    ranges: list[tuple[int, int, float, bool]] = []

    for match in RE_ATTENTION.finditer(text):
        token = match.group(0)
        weight = match.group(1)
        if token.startswith("\\"):
            res.append([token[1:], 1.0, False])
        elif token == "(":
            round_brackets.append(len(res))
        elif token == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            try:
                multiplier = float(weight)
            except ValueError:  # "(a:1.2.3)": the regex admits it, float() does not; A1111 fails the request
                multiplier = 1.0
                if bad_numbers is not None:
                    bad_numbers.append(token)
            ranges.append((round_brackets.pop(), len(res), multiplier, True))
        elif token == ")" and round_brackets:
            ranges.append((round_brackets.pop(), len(res), ROUND_MULTIPLIER, True))
        elif token == "]" and square_brackets:
            ranges.append((square_brackets.pop(), len(res), SQUARE_MULTIPLIER, False))
        else:
            for index, part in enumerate(_split_breaks(token)):
                if index > 0:
                    res.append([BREAK, -1.0, True])
                res.append([part, 1.0, False])

    ranges.extend((position, len(res), ROUND_MULTIPLIER, True) for position in round_brackets)
    ranges.extend((position, len(res), SQUARE_MULTIPLIER, False) for position in square_brackets)
    work = sum(end - start for start, end, _, _ in ranges)
    if work <= _EXACT_WORK_PER_PIECE * len(res) + _EXACT_WORK_MIN:
        for start, end, multiplier, _ in ranges:
            for position in range(start, end):
                if a1111_breaks or not res[position][2]:
                    res[position][1] *= multiplier
    else:
        round_products = _range_products([item for item in ranges if item[3]], len(res))
        square_products = _range_products([item for item in ranges if not item[3]], len(res))
        for item, round_product, square_product in zip(res, round_products, square_products):
            if a1111_breaks or not item[2]:
                item[1] *= round_product * square_product
    if a1111_breaks:
        # A1111 tells a BREAK by its weight alone: one inside brackets is text from here on.
        for item in res:
            item[2] = item[2] and item[1] == -1.0
    if not res:
        res = [["", 1.0, False]]

    # Merge runs of equal weight (A1111 merges a BREAK only with a BREAK, which has no effect on chunks). The texts
    # are joined once per run: adding them up one by one copies the run again at every piece.
    merged: list[list] = [[[res[0][0]], res[0][1], res[0][2]]]
    for item in res[1:]:
        last = merged[-1]
        if item[1] == last[1] and item[2] == last[2] and not item[2]:
            last[0].append(item[0])
        elif item[1] == last[1] and a1111_breaks:
            last[0].append(item[0])
        else:
            merged.append([[item[0]], item[1], item[2]])
    return [PromptPiece(text="".join(item[0]), weight=item[1], is_break=item[2]) for item in merged]


def _range_products(ranges: list[tuple[int, int, float, bool]], count: int) -> list[float]:
    """Per piece, the product of the multipliers of the ranges over it; the ranges nest (one bracket kind's)."""
    starting: dict[int, list[tuple[int, float]]] = {}
    for start, end, multiplier, _ in ranges:
        if start < end:
            starting.setdefault(start, []).append((end, multiplier))
    products: list[float] = []
    open_ranges: list[tuple[int, float]] = [(count + 1, 1.0)]   # (end, product so far)
    for position in range(count):
        while open_ranges[-1][0] <= position:
            open_ranges.pop()
        for end, multiplier in sorted(starting.get(position, ()), key=lambda item: -item[0]):  # the outer first
            open_ranges.append((end, open_ranges[-1][1] * multiplier))
        products.append(open_ranges[-1][1])
    return products


def extract_networks(text: str) -> tuple[str, tuple[LoraRef, ...], tuple[str, ...], tuple[str, ...]]:
    """Take every ``<kind:...>`` tag out of ``text``: (text without tags, LoRAs, other tags, errors)."""
    loras: list[LoraRef] = []
    others: list[str] = []
    errors: list[str] = []

    def found(match: re.Match) -> str:
        kind, arguments = match.group(1), match.group(2)
        if kind.lower() not in LORA_KINDS:
            others.append(match.group(0))
            return ""
        items = arguments.split(":")
        name = items[0].strip()
        # A1111: <lora:name:te:unet>, positional or as te=/unet=/dyn=; a weight for all is the common form.
        positional = [item.strip() for item in items[1:] if "=" not in item]
        named = dict(item.strip().split("=", 1) for item in items[1:] if "=" in item)
        weight_text = named.get("te", positional[0] if positional else "1")
        unet_text = named.get("unet", positional[1] if len(positional) > 1 else weight_text)
        if not name:
            errors.append(f"LoRA tag {match.group(0)!r} has no name")
            return ""
        try:
            weight, unet_weight = float(weight_text), float(unet_text)
        except ValueError:
            errors.append(f"LoRA tag {match.group(0)!r}: weight {weight_text!r} is not a number")
            return ""
        if not (math.isfinite(weight) and math.isfinite(unet_weight)):
            errors.append(f"LoRA tag {match.group(0)!r}: weight {weight_text!r} is not a finite number")
        elif abs(weight) > MAX_WEIGHT or abs(unet_weight) > MAX_WEIGHT:
            too_big = weight_text if abs(weight) > MAX_WEIGHT else unet_text
            errors.append(f"LoRA tag {match.group(0)!r}: weight {too_big} is out of range: LoRA weights must be "
                          f"within ±{MAX_WEIGHT:g}")
        elif weight != unet_weight:
            errors.append(f"LoRA tag {match.group(0)!r}: separate text-encoder ({weight_text}) and UNet "
                          f"({unet_text}) weights are not supported; give one weight")
        else:
            loras.append(LoraRef(name, weight))
        return ""

    # No tag ends past the last ">"; there the regex would try each "<kind:" to the end of the text (quadratic).
    end = text.rfind(">") + 1
    stripped = RE_EXTRA_NETWORK.sub(found, text[:end]) + text[end:]
    return stripped, tuple(loras), tuple(others), tuple(errors)


# The stream asks again for the same prompt every frame while an LFO runs (its encoding is cached by the text): a few
# recent parses are kept. ParsedPrompt is frozen and holds tuples, so a shared one cannot be changed by a caller.
_PARSE_CACHE_SIZE = 64


@functools.lru_cache(maxsize=_PARSE_CACHE_SIZE)
def parse_prompt(text: str) -> ParsedPrompt:
    """The pieces with their weights (BREAKs marked), and the LoRA tags taken out of the text."""
    stripped, loras, others, errors = extract_networks(text)
    for name, weight in ParsedPrompt(pieces=(), loras=loras).lora_weights().items():
        if abs(weight) > MAX_WEIGHT and not errors:  # <lora:x:60> <lora:x:60>: each in range, applied at 120
            errors = (f"LoRA {name!r}: weights {weight:g} in all (its tags add up) is out of range: LoRA weights "
                      f"must be within ±{MAX_WEIGHT:g}",)
    bad_numbers: list[str] = []
    pieces = tuple(_parse_attention(stripped, bad_numbers=bad_numbers))
    weight_error = _weight_error(pieces)
    if bad_numbers:  # a typo A1111 fails on; read as weight 1, it would pass unseen
        weight_error = (f"prompt weight {bad_numbers[0].strip(' :)')!r} (in {bad_numbers[0].strip()!r}) is not a "
                        "number: write (word:1.2)")
    return ParsedPrompt(pieces=pieces, loras=loras, other_networks=others, errors=errors, weight_error=weight_error)


def _weight_error(pieces: tuple[PromptPiece, ...]) -> str | None:
    for piece in pieces:
        if not piece.is_break and not (math.isfinite(piece.weight) and abs(piece.weight) <= MAX_WEIGHT):
            return (f"prompt weight {piece.weight:g} of {piece.text[:40]!r} is out of range: weights, multiplied "
                    f"through nested brackets, must be finite and within ±{MAX_WEIGHT:g}")
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class LoraWeights:
    """The ``loras`` live parameter: ``"name:0.8, other:0.5"`` (a name alone is 1.0)."""

    weights: dict[str, float] = field(default_factory=dict)

    @classmethod
    def parse(cls, text: str) -> LoraWeights:
        """Raises ValueError naming the bad entry; names may hold ':' only before the weight."""
        weights: dict[str, float] = {}
        for entry in text.split(","):
            entry = entry.strip()
            if not entry:
                continue
            name, separator, weight_text = entry.rpartition(":")
            if not separator:
                name, weight_text = entry, "1"
            name = name.strip()
            try:
                weight = float(weight_text)
            except ValueError:
                raise ValueError(f"LoRA entry {entry!r}: weight {weight_text.strip()!r} is not a number "
                                 f"(write name:0.8)") from None
            if not name or not math.isfinite(weight):
                raise ValueError(f"LoRA entry {entry!r} is not name:weight with a finite weight")
            if abs(weight) > MAX_WEIGHT:
                raise ValueError(f"LoRA entry {entry!r}: weight {weight:g} is out of range: LoRA weights must be "
                                 f"within ±{MAX_WEIGHT:g}")
            extra = name.rpartition(":")[2].strip()
            if ":" in name and _is_number(extra):  # 'x:1:2:3' read as a LoRA named 'x:1:2' (QA 27)
                raise ValueError(f"LoRA entry {entry!r} has several weights; give one (name:0.8)")
            weights[name] = weights.get(name, 0.0) + weight
            if abs(weights[name]) > MAX_WEIGHT:
                raise ValueError(f"LoRA {name!r}: weights {weights[name]:g} in all (named more than once) is out of "
                                 f"range: LoRA weights must be within ±{MAX_WEIGHT:g}")
        return cls(weights)
