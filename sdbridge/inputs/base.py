"""The input interface: a source that yields RGB(A) frames, and the ``--input`` spec that names one.

A spec is ``KIND[:TARGET][?OPTIONS][@SESSION[#CHANNEL]]``, or with the options last as outputs write them,
``KIND[:TARGET][@SESSION[#CHANNEL]][?OPTIONS]`` (docs/inputs.md):

- ``file:clips/rehearsal.mp4`` a video file, an image folder or an OpenCV pattern (``frames/%04d.png``),
  looping, paced at the file's frame rate;
- ``camera:0`` a capture device (OpenCV);
- ``shm:sdbridge`` a shared-memory segment written by another process (:mod:`sdbridge.inputs.shm`);
- ``ndi:SOURCE`` an NDI source on the network (cyndilib).

``?fps=24&loop=false&reply=png`` sets options; ``@SESSION`` names the session it feeds (by default
the kind's name, so ``ws://…/ws?session=file`` watches a ``file`` input); ``#CHANNEL`` (1-255) makes
it a condition stream of that session (a depth pass for a ControlNet slot), as the frame header's
channel byte does for WebSocket clients.
"""

from __future__ import annotations

import abc
import importlib
import os
import re
import sys
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np

from sdbridge.bridge.protocol import SESSION_NAME, SESSION_NAME_RULE, PixelFormat
from sdbridge.errors import SdbridgeError


class InputError(SdbridgeError):
    code = "input_failed"


MAX_CHANNEL = 255
MAX_FPS = 1000.0
_SESSION = re.compile(rf"^(?P<session>{SESSION_NAME})(?:#(?P<channel>\d{{1,3}}))?$")
_KIND = re.compile(r"^[a-z]+$")
_REPLIES = {"jpeg": PixelFormat.JPEG, "png": PixelFormat.PNG, "rgb8": PixelFormat.RGB8, "rgba8": PixelFormat.RGBA8}
_REPLY_NAMES = {value: name for name, value in _REPLIES.items()}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


@dataclass(frozen=True)
class InputSpec:
    kind: str
    target: str | None = None
    session: str | None = None
    channel: int = 0
    fps: float | None = None        # file: instead of the file's own rate; camera: asked of the device
    loop: bool = True               # file: start again at the end
    width: int | None = None        # camera: asked of the device
    height: int | None = None
    reply: PixelFormat = PixelFormat.JPEG  # what WebSocket viewers of the session get, as a header's reply_format
    # The argument as typed, for the sentences of errors found after parsing (a file that is not there): str()
    # is the normalised form /stats shows, which may differ from what the user wrote and would confuse them.
    text: str = field(default="", compare=False, repr=False)

    @property
    def session_name(self) -> str:
        """The session it feeds: ``@SESSION``, else the kind's name."""
        return self.session or self.kind

    def __str__(self) -> str:
        """The spec as it is read back: every option that differs from its default, so /stats shows what runs."""
        text = self.kind + (f":{self.target}" if self.target else "")
        options = [f"fps={self.fps:g}"] if self.fps is not None else []
        options += [] if self.loop else ["loop=false"]
        options += [f"{name}={value}" for name, value in (("width", self.width), ("height", self.height))
                    if value is not None]
        options += [f"reply={_REPLY_NAMES[self.reply]}"] if self.reply != PixelFormat.JPEG else []
        text += "?" + "&".join(options) if options else ""
        return text + f"@{self.session_name}" + (f"#{self.channel}" if self.channel else "")


class Input(abc.ABC):
    """A frame source, read by one thread. ``open`` may fail (InputError): the thread retries it."""

    kind: str

    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec

    def check(self) -> None:
        """At start-up: InputError for a set-up mistake that waiting will not fix (a file that does not exist).
        A device or a writer that is missing now may come later: those are retried instead."""

    @abc.abstractmethod
    def open(self) -> None:
        """Connect to the source; InputError when it is not there now."""

    @abc.abstractmethod
    def read(self, stop: threading.Event) -> np.ndarray | None:
        """The next frame, uint8 ``[H, W, 3 or 4]`` (RGB or RGBA, top row first), paced by the source.

        Owned by the caller until the next ``read``. None when ``stop`` is set or the source has ended (a file
        that does not loop). Raises InputError (or any error: the thread reports it) when the source fails."""

    def close(self) -> None:
        """Disconnect; ``open`` may be called again."""


# Lazy, as the outputs are: each pulls its own library only when used.
_INPUTS: dict[str, tuple[str, str, frozenset[str]]] = {
    "file": ("sdbridge.inputs.file:FileInput", "", frozenset({"fps", "loop", "reply"})),
    "camera": ("sdbridge.inputs.camera:CameraInput", "", frozenset({"fps", "width", "height", "reply"})),
    "shm": ("sdbridge.inputs.shm:ShmInput", "", frozenset({"reply"})),
    "ndi": ("sdbridge.inputs.ndi:NdiInput", "pip install \"sdbridge[ndi]\" (cyndilib)", frozenset({"reply"})),
}
# "?fps=24?loop=true": options joined by a second '?' instead of '&'. The last '?' starts the options, so the
# first would end up in the path ("frames/?fps=24"), and the error would be a missing file with a rewritten name.
_SECOND_QUESTION = re.compile(r"\?(?:" + "|".join(sorted(set().union(*(o for _, _, o in _INPUTS.values())))) + r")=")
_FORM = ("KIND[:TARGET][?OPTIONS][@SESSION[#CHANNEL]] or KIND[:TARGET][@SESSION[#CHANNEL]][?OPTIONS] "
         "(e.g. file:clip.mp4@s1, file:frames/@s1?fps=24, camera:0, shm:sdbridge, ndi:STUDIO)")
# POSIX shared memory: "/NAME", NAME at most NAME_MAX (255) bytes with no '/'; macOS allows 31 with the slash.
MAX_SHM_NAME_BYTES = 30 if sys.platform == "darwin" else 255


def input_kinds() -> list[str]:
    return list(_INPUTS)


def _bad(message: str) -> InputError:
    return InputError(message, code="bad_input")


def split_spec(text: str) -> tuple[str, str | None, str | None]:
    """``KIND[:TARGET]``, the options and the session part of an ``--input`` or ``--output`` spec, either order.

    Inputs documented their options before ``@SESSION`` and outputs after it; a rig uses both on one command
    line, so each takes both. The last ``?`` starts the options; a ``@`` after it ends them (options first),
    else the last ``@`` before it starts the session. A session name holds neither, a path may hold ``@``."""
    head, question, options = text.rpartition("?")
    if not question:
        head, options = text, None
    elif "@" in options:
        options, _, session = options.rpartition("@")
        return head, options, session
    body, at, session = head.rpartition("@")
    return (body, options, session) if at else (head, options, None)


def split_options(options_text: str | None, allowed: Iterable[str], what: str,
                  bad: Callable[[str], Exception]) -> dict[str, str]:
    """``A=1&B=2`` -> {name: value}, each name one of ``allowed`` and given once; ``bad(sentence)`` is raised
    otherwise, the sentence naming ``what`` (an input's or an output's spec)."""
    allowed = sorted(allowed)
    options: dict[str, str] = {}
    for item in options_text.split("&") if options_text is not None else ():
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise bad(f"{what}: option {item!r} is not NAME=VALUE (known: {', '.join(allowed)})")
        if name not in allowed:
            raise bad(f"{what}: unknown option {name!r} (known: {', '.join(allowed)})")
        if name in options:  # two values: which one was meant is a guess, so neither is taken
            raise bad(f"{what}: option {name!r} is given twice")
        options[name] = value
    return options


def parse_spec(text: str) -> InputSpec:
    """An ``--input`` value -> InputSpec; InputError (code bad_input) naming the bad part and what is allowed."""
    if _SECOND_QUESTION.search(text.rpartition("?")[0]):
        raise _bad(f"input {text!r}: options are joined by '&', not a second '?' (e.g. file:frames/?fps=24&loop=true"
                   f"@live)")
    body, options_text, tail = split_spec(text.strip())
    session = None
    channel = 0
    if tail is not None:
        match = _SESSION.match(tail)
        if match is None:
            raise _bad(f"input {text!r}: session {tail!r} is not {SESSION_NAME_RULE}, with an optional "
                       f"#CHANNEL (1-{MAX_CHANNEL}); the form is {_FORM}")
        session = match["session"]
        if match["channel"] is not None:
            channel = int(match["channel"])
            if not 0 <= channel <= MAX_CHANNEL:
                raise _bad(f"input {text!r}: channel {channel} not in [0, {MAX_CHANNEL}] (0 is the image, "
                           f"1-{MAX_CHANNEL} condition streams)")
    kind, sep, target = body.partition(":")
    if not _KIND.match(kind):
        raise _bad(f"input {text!r} is not {_FORM}")
    if kind not in _INPUTS:
        raise _bad(f"unknown input {kind!r} in {text!r} (known: {', '.join(_INPUTS)})")
    if sep and not target:
        raise _bad(f"input {text!r}: empty target after '{kind}:'")
    values = _options(text, kind, options_text)
    if kind == "file" and not target:
        raise _bad(f"input {text!r}: file needs a path (file:clips/rehearsal.mp4 or file:frames/)")
    if kind == "shm" and target:
        _check_shm_name(text, target)
    return InputSpec(kind, target or None, session, channel, **values, text=text)


def _check_shm_name(text: str, name: str) -> None:
    """A name the system can make a shared-memory segment of: checked here, since a name that can never exist
    would otherwise be retried every 5 s for the whole show (the writer may start later, the name never changes)."""
    if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
        raise _bad(f"input {text!r}: shared memory name {name!r} is not a name a segment can have: no '/', '\\' "
                   f"or NUL, not '.' or '..' (a POSIX name is /NAME with one word after the slash, e.g. shm:sdbridge)")
    try:
        size = len(os.fsencode(name))
    except UnicodeEncodeError:
        raise _bad(f"input {text!r}: shared memory name {name!r} cannot be written in this system's file name "
                   f"encoding ({sys.getfilesystemencoding()}); use ASCII letters, digits, '_' or '-'") from None
    if size > MAX_SHM_NAME_BYTES:
        raise _bad(f"input {text!r}: the shared memory name is {size} bytes long; at most {MAX_SHM_NAME_BYTES} "
                   f"on this system")


def _options(text: str, kind: str, options_text: str | None) -> dict[str, object]:
    values: dict[str, object] = {}
    for name, value in split_options(options_text, _INPUTS[kind][2], f"input {text!r} ({kind})", _bad).items():
        if name == "fps":
            try:
                fps = float(value) if value.isascii() else float("nan")  # float() would take a full-width '２４'
            except ValueError:
                fps = float("nan")
            if not 0 < fps <= MAX_FPS:  # also refuses nan
                raise _bad(f"input {text!r}: fps {value!r} is not a number in (0, {MAX_FPS:g}]")
            values["fps"] = fps
        elif name in ("width", "height"):
            if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 8192:
                raise _bad(f"input {text!r}: {name} {value!r} is not a whole number in [1, 8192]")
            values[name] = int(value)
        elif name == "loop":
            if value.lower() not in _TRUE + _FALSE:
                raise _bad(f"input {text!r}: loop {value!r} is not true or false")
            values["loop"] = value.lower() in _TRUE
        elif name == "reply":
            if value.lower() not in _REPLIES:
                raise _bad(f"input {text!r}: reply {value!r} is not one of {', '.join(_REPLIES)}")
            values["reply"] = _REPLIES[value.lower()]
    return values


def create_input(spec: InputSpec) -> Input:
    """The source for a spec; InputError (code input_unavailable) when its library is missing."""
    target, install, _ = _INPUTS[spec.kind]
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise InputError(f"input {spec.kind} needs a library that is not installed ({exc.name or exc}): "
                         f"{install}", code="input_unavailable") from exc
    return getattr(module, class_name)(spec)
