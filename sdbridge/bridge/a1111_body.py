"""A1111 request bodies: read within a bound, and parsed as JSON without holding the GIL for long.

A body is parsed in a thread (a1111.A1111Route) so that the event loop serves WebSocket and OSC clients meanwhile,
but one call of the C JSON parser holds the GIL, and with it the loop, for all its work: 2 ms a MB, so a 96 MB
img2img body stalled every client for 190 ms even from a thread (QA 9: a 33 MB body froze the loop for 1-1.5 s).
Such bodies are base64 images: long strings without escapes. :func:`loads` cuts each one out of the document,
parses what is left, and decodes the strings in pieces of PIECE bytes, the GIL let go between pieces. The number
of values is bounded (MAX_SEPARATORS): a body of numbers, or of many short strings, parsed whole held the loop 2 s at
64 MB (QA 53 F1).
"""

from __future__ import annotations

import codecs
import json
import logging
import secrets
from typing import Any

from fastapi import HTTPException, Request
from starlette.requests import ClientDisconnect

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 256 * 1024 * 1024  # a Krita user's 4K image is a 33 MB body: room for eight of them
LONG_STRING = 64 * 1024  # a string at least this long is decoded in pieces
# Commas and colons in the body: one per value, about, where base64 has none (its escapes, a MIME encoder's "\n" or
# PHP's "\/", neither). An A1111 request has a few hundred values; the C parser, the request's model and its echo
# in the answer hold the GIL for each, ~100 ms for 32,768 values. Counted, not parsed: ~10 ms for 100 MB.
MAX_SEPARATORS = 32 * 1024
PIECE = 1024 * 1024  # 1 MiB decoded and checked: about 1 ms
MAX_STRINGS = 100_000  # more strings or escapes than this: not images; the C parser takes it all at once
_CONTROL = bytes(range(32))  # JSON refuses them raw inside a string (deleting them: 8x faster than a regex search)


async def read(request: Request) -> list[bytes]:
    """The body's chunks as they came, or 413 past MAX_BODY_BYTES (told by Content-Length, or counted)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise HTTPException(413, f"request body of {int(declared)} bytes is too large (at most {MAX_BODY_BYTES})")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BODY_BYTES:
                raise HTTPException(413, f"request body of more than {MAX_BODY_BYTES} bytes is too large (at most "
                                         f"{MAX_BODY_BYTES})")
    except ClientDisconnect:
        log.debug("%s: the client disconnected before its body ended", request.url.path)
        raise HTTPException(400, "the client disconnected before the request body ended") from None
    return chunks


def loads(raw: bytes) -> Any:
    """``json.loads(raw)``: the same value, and the same errors (any document this function does not cut is
    parsed by json.loads whole, an invalid one included)."""
    separators = raw.count(b",") + raw.count(b":")  # in UTF-16 too: "," is "\x00," or ",\x00"
    if separators > MAX_SEPARATORS:
        raise HTTPException(413, f"the request's JSON has {separators} commas and colons, more than {MAX_SEPARATORS}: "
                                 f"an A1111 request holds a few hundred values")
    if json.detect_encoding(raw) != "utf-8":
        return json.loads(raw)
    spans = _long_strings(raw)
    if not spans:
        return json.loads(raw)
    nonce = secrets.token_hex(8)
    parts, strings, position = [], {}, 0
    for index, (start, end) in enumerate(spans):
        try:
            text = _decoded(raw, start, end)
        except UnicodeDecodeError:
            text = None
        if text is None:  # not UTF-8, or a control character: json.loads says where
            return json.loads(raw)
        marker = f"\x00{nonce}:{index}"
        strings[marker] = text
        parts += [raw[position:start], json.dumps(marker).encode()[1:-1]]
        position = end
    parts.append(raw[position:])
    try:
        value = json.loads(b"".join(parts))
    except (ValueError, RecursionError):  # its error, where the client's document has it
        return json.loads(raw)
    return _restored(value, strings)


def _long_strings(raw: bytes) -> list[tuple[int, int]]:
    """The (start, end) of the contents of each string literal of LONG_STRING bytes or more without a backslash.
    A document in JSON has no quote outside its strings, so its strings are read from quote to quote."""
    spans: list[tuple[int, int]] = []
    position, seen = 0, 0
    while (start := raw.find(b'"', position)) != -1:
        start += 1
        end, escaped = raw.find(b'"', start), False
        slash = raw.find(b"\\", start, end if end != -1 else len(raw))
        while slash != -1 and end != -1:  # an escape: the literal ends at the first quote after the escapes
            escaped, seen = True, seen + 1
            if seen > MAX_STRINGS:
                return []
            if slash + 1 == end:  # an escaped quote: the literal goes on past it
                end = raw.find(b'"', end + 1)
            slash = raw.find(b"\\", slash + 2, end if end != -1 else len(raw))
        if end == -1:
            return []  # unterminated: json.loads says where
        seen += 1
        if seen > MAX_STRINGS:
            return []
        if not escaped and end - start >= LONG_STRING:
            spans.append((start, end))
        position = end + 1
    return spans


def _decoded(raw: bytes, start: int, end: int) -> str | None:
    """``raw[start:end]`` as UTF-8 in pieces of PIECE bytes; None when it holds a control character."""
    decoder = codecs.getincrementaldecoder("utf-8")("surrogatepass")  # as json.loads; a piece may end mid-character
    texts = []
    for piece_start in range(start, end, PIECE):
        piece = raw[piece_start:min(piece_start + PIECE, end)]
        if len(piece.translate(None, _CONTROL)) != len(piece):
            return None
        texts.append(decoder.decode(piece, final=piece_start + PIECE >= end))
    return "".join(texts)


def _restored(value: Any, strings: dict[str, str]) -> Any:
    """``value`` with each marker string replaced by the string it stands for, at any depth (no recursion: a
    document json.loads took may be nested as deep as the interpreter allows)."""
    if isinstance(value, str):
        return strings.get(value, value)
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            for index, element in enumerate(item):
                if isinstance(element, str):
                    item[index] = strings.get(element, element)
                elif isinstance(element, (list, dict)):
                    stack.append(element)
        elif isinstance(item, dict):
            if any(key in strings for key in item):
                renamed = [(strings.get(key, key), element) for key, element in item.items()]
                item.clear()
                item.update(renamed)
            for key, element in item.items():
                if isinstance(element, str):
                    item[key] = strings.get(element, element)
                elif isinstance(element, (list, dict)):
                    stack.append(element)
    return value
