"""AUTOMATIC1111's prompt editing, alternation and composable ``AND``, as text per sampling step.

What A1111 users write (``modules/prompt_parser.py``, its lark grammar ``schedule_parser``):

- ``[from:to:when]`` is ``from`` up to step ``when``, then ``to``; ``[to:when]`` adds ``to`` after
  ``when``; ``[from::when]`` removes ``from`` after it. ``when`` with a ``.`` is a fraction of the
  steps (``0.25``, ``.5``, ``1.0``), without one a step number (``3``); A1111 before 1.6 (its "Use
  old prompt editing timelines" setting, ``old_scheduling`` here) read any ``when`` below 1 as a
  fraction and the rest as a step. Constructs nest: ``a[b:[c:d:2]:1]e``;
- ``[a|b|c]`` is ``a`` at step 1, ``b`` at 2, ``c`` at 3, ``a`` at 4 ...; options may be empty;
- ``A AND B:0.5`` is two prompts combined with weights 1 and 0.5 (composable diffusion,
  A1111's ``get_multicond_prompt_list``): :func:`split_composable`, each part then scheduled alone.

:func:`prompt_schedules` gives A1111's ``get_learned_conditioning_prompt_schedules`` result for one
prompt: ``[(end_step, text), ...]``. A1111 uses entry ``i`` while the sampler's step counter (0 at
the first step) is ``<= end_step`` of it and above the previous one's. Everything else (weights,
``(a:1.2)``, ``[a]``, escapes, BREAK, ``<lora:...>`` tags) is left in the text for
prompt_syntax.parse_prompt. A prompt the grammar does not take (a ``|`` outside ``[...]``, a
trailing ``\\``) is one entry, the prompt unchanged, as A1111 answers a lark error.

The grammar, as a recursive descent that tries a construct at each bracket before reading the
bracket as text (the parse lark's Earley resolution picks on A1111's own examples)::

    start:     (prompt | one of "[" "]" "(" ")" ":" as text)*
    prompt:    (emphasized | scheduled | alternate | plain)*
    emphasized: "(" prompt ")" | "(" prompt ":" prompt ")" | "[" prompt "]"      (kept as text)
    scheduled: "[" [prompt ":"] prompt ":" [space] NUMBER [space] "]"
    alternate: "[" prompt ("|" prompt)+ "]"
    plain:     (any character but \\ [ ] ( ) : | , or \\ and one character but a newline)+

Checked against A1111's lark parser on 11,000 generated prompts (four step settings each): the same
schedules, except where a construct at the top level is directly followed by two or more unmatched
brackets (``[b:c:5]))``, ``[b:c:5]]]``, but not ``[b:c:5])`` nor ``((a [b:c:5]))``): lark's
ambiguity resolution then sometimes reads it all as text; here the construct is kept.

Pure: no torch, no tokenizer.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from sdbridge.errors import ParamError

# lark's SIGNED_NUMBER (A1111 imports common.SIGNED_NUMBER as NUMBER): ASCII digits only, where \d is any script's
# ("[a:b:١]" is text to A1111, QA 72 F6).
_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_SPACE = re.compile(r"\s+")
_PLAIN = re.compile(r"(?:[^\\\[\]():|]|\\.)+")    # '.' stops at a newline, as in A1111's plain
_STRAY = frozenset("[]():")                       # what A1111's start rule takes as text between prompts
# Composable diffusion (prompt_parser.re_AND, re_weight): AND as a whole word; a part's own ":weight". A1111's
# re_weight, r"^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$", retries its tail at every character:
# quadratic on a run of spaces (QA 72 F5, 3 s for 20,000 characters). split_composable reads the same parts
# from the end instead: the weight is what follows the last ":" (\d as in A1111's Python regex).
_AND = re.compile(r"\bAND\b")
_PART_NUMBER = re.compile(r"[-+]?(?:\d+\.?|\d*\.\d+)")
# Brackets nested deeper than this are refused: the parser recurses twice a level (about 500 levels overflowed
# Python's stack, an HTTP 500, QA 72 F2). A1111 itself fails (RecursionError) on deep balanced brackets.
MAX_NESTING = 100


@dataclass(frozen=True)
class _Scheduled:
    before: tuple[_Node, ...] | None    # None: ``[to:when]``
    after: tuple[_Node, ...]
    when: str                           # the number as written: "." decides fraction or step


@dataclass(frozen=True)
class _Alternate:
    options: tuple[tuple[_Node, ...], ...]


_Node = str | _Scheduled | _Alternate


class _NoParse(Exception):
    """The text at this position is not the construct tried (or, at the top, not a prompt at all)."""


def _closable(text: str) -> tuple[frozenset[int], int]:
    """The positions of the brackets that some bracket of their kind closes, nested properly in between, and how
    deep those pairs nest. Only those can start a construct: inside one the grammar takes no stray bracket."""
    opened: list[int] = []
    pairs: list[tuple[int, int]] = []
    position = 0
    while position < len(text):
        char = text[position]
        if char == "\\":          # an escape: the next character is text (a newline after it: no construct closes)
            position += 2
            continue
        if char in "([":
            opened.append(position)
        elif char in ")]":
            if opened and text[opened[-1]] == ("(" if char == ")" else "["):
                pairs.append((opened.pop(), position))
            else:                    # "[(]": the "(" fails at the "]", and so does every bracket around it
                opened.clear()
        position += 1
    deltas = [0] * (len(text) + 1)
    for start, end in pairs:
        deltas[start] += 1
        deltas[end] -= 1
    depth = deepest = 0
    for delta in deltas:
        depth += delta
        deepest = max(deepest, depth)
    return frozenset(start for start, _ in pairs), deepest


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        # A bracket nothing closes fails as a construct wherever it is tried: read as text at once. Tried, an
        # unclosed run of n brackets recursed n deep, and again from each of them (A1111 reads it as text).
        self.closable, self.depth = _closable(text)

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def expect(self, char: str) -> None:
        if self.peek() != char:
            raise _NoParse
        self.pos += 1

    def start(self) -> list[_Node]:
        nodes: list[_Node] = []
        while self.pos < len(self.text):
            nodes.extend(self.prompt())
            char = self.peek()
            if char in _STRAY and char:      # a bracket no construct took: text, as A1111's start rule
                nodes.append(char)
                self.pos += 1
            elif char:                       # "|" outside [...], or a "\" with nothing to escape
                raise _NoParse
        return nodes

    def prompt(self) -> list[_Node]:
        """As much prompt as there is; stops before what a prompt cannot hold (the caller decides)."""
        nodes: list[_Node] = []
        while True:
            char = self.peek()
            if char in ("[", "("):
                if self.pos not in self.closable:
                    return nodes
                mark = self.pos
                try:
                    nodes.extend(self.square() if char == "[" else self.round())
                except _NoParse:
                    self.pos = mark
                    return nodes
                continue
            match = _PLAIN.match(self.text, self.pos)
            if match is None:
                return nodes
            nodes.append(match.group())
            self.pos = match.end()

    def round(self) -> list[_Node]:
        self.expect("(")
        inner = self.prompt()
        if self.peek() == ":":
            self.pos += 1
            weight = self.prompt()
            self.expect(")")
            return ["(", *inner, ":", *weight, ")"]
        self.expect(")")
        return ["(", *inner, ")"]

    def square(self) -> list[_Node]:
        self.expect("[")
        first = self.prompt()
        char = self.peek()
        if char == "]":
            self.pos += 1
            return ["[", *first, "]"]
        if char == "|":
            options = [tuple(first)]
            while self.peek() == "|":
                self.pos += 1
                options.append(tuple(self.prompt()))
            self.expect("]")
            return [_Alternate(tuple(options))]
        self.expect(":")
        mark = self.pos
        try:                                 # [to:when]
            return [_Scheduled(None, tuple(first), self.when())]
        except _NoParse:
            self.pos = mark
        second = self.prompt()               # [from:to:when]
        self.expect(":")
        return [_Scheduled(tuple(first), tuple(second), self.when())]

    def when(self) -> str:
        """``[space] NUMBER [space] "]"`` -> the number's text."""
        self.skip_space()
        match = _NUMBER.match(self.text, self.pos)
        if match is None:
            raise _NoParse
        self.pos = match.end()
        self.skip_space()
        self.expect("]")
        return match.group()

    def skip_space(self) -> None:
        match = _SPACE.match(self.text, self.pos)
        if match:
            self.pos = match.end()


@dataclass(frozen=True)
class _Timeline:
    """How ``when`` numbers become steps (A1111's offsets: a hires pass counts on from the base pass)."""

    steps: int
    int_offset: int = 0
    fraction_offset: float = 0.0
    old_scheduling: bool = False

    def end_step(self, when: str) -> int:
        value = float(when)
        if self.old_scheduling:
            value = value * self.steps if value < 1 else value
        elif "." in when:
            value = (value - self.fraction_offset) * self.steps
        else:
            value -= self.int_offset
        if not math.isfinite(value):        # 1e999: A1111 fails on int(inf); past the end is the end
            return self.steps if value > 0 else -1
        return min(self.steps, int(value))


def _steps_used(nodes: tuple[_Node, ...] | list[_Node], timeline: _Timeline, found: set[int]) -> None:
    """Every step where some construct changes, in every branch (A1111's CollectSteps visits them all)."""
    for node in nodes:
        if isinstance(node, _Scheduled):
            end = timeline.end_step(node.when)
            if end >= 1:
                found.add(end)
            _steps_used(node.before or (), timeline, found)
            _steps_used(node.after, timeline, found)
        elif isinstance(node, _Alternate):
            found.update(range(1, timeline.steps + 1))
            for option in node.options:
                _steps_used(option, timeline, found)


def _text_at(nodes: tuple[_Node, ...] | list[_Node], step: int, timeline: _Timeline) -> str:
    parts: list[str] = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            chosen = (node.before or ()) if step <= timeline.end_step(node.when) else node.after
            parts.append(_text_at(chosen, step, timeline))
        else:
            parts.append(_text_at(node.options[(step - 1) % len(node.options)], step, timeline))
    return "".join(parts)


def prompt_schedules(prompt: str, steps: int, hires_steps: int | None = None,
                     old_scheduling: bool = False) -> list[tuple[int, str]]:
    """``[(end_step, text), ...]``, end steps rising, the last one ``steps``: A1111's schedule of one
    prompt (one part of an ``AND``, see :func:`split_composable`).

    ``hires_steps``: the schedule of a hires pass of that many steps after ``steps`` base steps;
    there ``when`` counts on from the base pass (``1.5`` is half-way through the hires pass, ``15``
    step 5 of it after 10 base steps), as in A1111 1.6+ (not with ``old_scheduling``).
    """
    if steps < 1 or (hires_steps is not None and hires_steps < 1):
        raise ValueError(f"steps {steps} (hires_steps {hires_steps}) must be at least 1")
    if hires_steps is None or old_scheduling:
        timeline = _Timeline(steps, old_scheduling=old_scheduling)
    else:
        timeline = _Timeline(hires_steps, int_offset=steps, fraction_offset=1.0)
    parser = _Parser(prompt)
    if parser.depth > MAX_NESTING:
        raise ParamError(f"prompt brackets nest {parser.depth} deep: at most {MAX_NESTING} levels of (), [] and "
                         f"[from:to:when] are read", name="prompt", value=prompt[:80], code="bad_param")
    try:
        nodes = parser.start()
    except _NoParse:
        return [(timeline.steps, prompt)]
    found = {timeline.steps}
    _steps_used(nodes, timeline, found)
    return [(step, _text_at(nodes, step, timeline)) for step in sorted(found)]


def split_composable(prompt: str) -> list[tuple[str, float]]:
    """A1111's parts of a positive prompt and their weights: ``"a cat AND a dog:0.5"`` ->
    ``[("a cat", 1.0), (" a dog", 0.5)]`` (leading space kept, trailing space dropped, as A1111).

    A1111 reads a trailing ``:weight`` on a prompt without ``AND`` too (``"a cat:1.5"`` is "a cat"
    at weight 1.5 in its composable combine); the negative prompt is never split.
    """
    parts: list[tuple[str, float]] = []
    for part in _AND.split(prompt):
        text = part.rstrip()
        colon = text.rfind(":")
        number = text[colon + 1:].lstrip() if colon >= 0 else ""
        if _PART_NUMBER.fullmatch(number):
            parts.append((text[:colon].rstrip(), float(number)))
        else:
            parts.append((text, 1.0))
    return parts
