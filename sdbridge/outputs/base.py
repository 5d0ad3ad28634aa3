"""The output interface: a sink that takes RGB frames, and the ``--output`` spec that names one.

A spec is ``KIND[:TARGET][@SESSION][?OPTION=VALUE&...]`` (the options may come before ``@SESSION`` too, as
inputs write them): ``ndi:sdbridge`` (an NDI source called sdbridge),
``virtualcam`` or ``virtualcam:/dev/video10``, ``spout:sdbridge`` (Windows), ``syphon:sdbridge``
(macOS), ``record:DIR`` (numbered PNGs, to keep a show). ``@SESSION`` sends only that session's
frames; without it an output shows whichever session made the latest frame, which is the one
sender of a usual rig. The one option is ``interpolate`` (off, 1-4, 2x-4x: frames shown per engine
frame, made by flow in between; ``ndi:stage?interpolate=2x``); without it the daemon's ``--interpolate``.

Each library is an optional extra; a missing one is reported with the pip command that installs it.
"""

from __future__ import annotations

import abc
import importlib
import re
from dataclasses import dataclass

import numpy as np

from sdbridge.bridge.protocol import SESSION_NAME, SESSION_NAME_RULE
from sdbridge.errors import SdbridgeError
from sdbridge.inputs.base import split_options, split_spec  # one rule for both specs, in and out
from sdbridge.outputs.interpolate import format_factor, parse_factor


class OutputError(SdbridgeError):
    code = "output_failed"


@dataclass(frozen=True)
class OutputSpec:
    kind: str
    target: str | None = None
    session: str | None = None
    interpolate: int | None = None  # frames shown per engine frame (1: off); None: the daemon's default

    def __str__(self) -> str:
        text = self.kind + (f":{self.target}" if self.target else "")
        text += f"@{self.session}" if self.session else ""
        return text + (f"?interpolate={format_factor(self.interpolate)}" if self.interpolate is not None else "")


class Output(abc.ABC):
    """A frame sink. ``open`` is called with the first frame's size and again when it changes."""

    kind: str

    def __init__(self, target: str | None) -> None:
        self.target = target

    @abc.abstractmethod
    def open(self, width: int, height: int, fps: float) -> None:
        """Start sending frames of this size, about ``fps`` a second (the daemon's rate times the output's
        interpolation factor: what a virtual camera or an NDI receiver is told to expect)."""

    @abc.abstractmethod
    def send(self, frame: np.ndarray) -> None:
        """One RGB frame, uint8 ``[H, W, 3]`` at the size given to ``open``."""

    def close(self) -> None:
        """Stop; ``open`` may be called again."""


# Lazy, as the engines are: each pulls its own library only when used.
_OUTPUTS: dict[str, tuple[str, str]] = {
    "ndi": ("sdbridge.outputs.ndi:NdiOutput", "pip install \"sdbridge[ndi]\" (cyndilib)"),
    "virtualcam": ("sdbridge.outputs.virtualcam:VirtualCamOutput",
                   "pip install \"sdbridge[virtualcam]\" (pyvirtualcam; on Linux also the v4l2loopback module)"),
    "spout": ("sdbridge.outputs.spout:SpoutOutput", "pip install \"sdbridge[spout]\" (SpoutGL, Windows only)"),
    "syphon": ("sdbridge.outputs.syphon:SyphonOutput", "pip install \"sdbridge[syphon]\" (syphon-python, macOS only)"),
    "record": ("sdbridge.outputs.record:RecordOutput", ""),
}
_HEAD = re.compile(r"^(?P<kind>[a-z]+)(?::(?P<target>[^@?]+))?$")
_SESSION = re.compile(rf"^{SESSION_NAME}$")
_OPTIONS = ("interpolate",)
_FORM = ("KIND[:TARGET][@SESSION][?interpolate=N] or KIND[:TARGET][?interpolate=N][@SESSION] (e.g. ndi:sdbridge, "
         "virtualcam, record:shows/tonight, ndi:stage@cam1?interpolate=2x)")


def output_kinds() -> list[str]:
    return list(_OUTPUTS)


def _bad(message: str) -> OutputError:
    return OutputError(message, code="bad_output")


def parse_spec(text: str) -> OutputSpec:
    """An ``--output`` value -> OutputSpec; OutputError (code bad_output) naming the bad part and what is allowed."""
    head, options, session = split_spec(text.strip())
    match = _HEAD.match(head)
    if match is None:
        raise _bad(f"output {text!r} is not {_FORM}")
    kind = match["kind"]
    if kind not in _OUTPUTS:
        raise _bad(f"unknown output {kind!r} in {text!r} (known: {', '.join(_OUTPUTS)})")
    if session is not None and not _SESSION.match(session):
        raise _bad(f"output {text!r}: session {session!r} is not {SESSION_NAME_RULE}; the form is {_FORM}")
    values = split_options(options, _OPTIONS, f"output {text!r}", _bad)
    interpolate = parse_interpolate(values["interpolate"], f"output {text!r}") if "interpolate" in values else None
    return OutputSpec(kind, match["target"], session, interpolate)


def parse_interpolate(value: str | int, where: str) -> int:
    """An ``interpolate`` value (off, 1-4, 2x-4x, any case) as frames shown per engine frame; OutputError naming
    it and ``where`` it came from. Spaces around it are refused, as the other spec options refuse them
    (``loop= true``): ``?interpolate= 2x`` is a typo more often than a wish."""
    if isinstance(value, str) and value != value.strip():
        raise OutputError(f"{where}: interpolate {value!r} has spaces around it; write {value.strip()!r}",
                          code="bad_output")
    try:
        return parse_factor(value)
    except ValueError as exc:
        raise OutputError(f"{where}: {exc}", code="bad_output") from None


def create_output(spec: OutputSpec) -> Output:
    """The sink for a spec; OutputError (code output_unavailable) when its library is missing."""
    target, install = _OUTPUTS[spec.kind]
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise OutputError(f"output {spec.kind} needs a library that is not installed ({exc.name or exc}): "
                          f"{install}", code="output_unavailable") from exc
    return getattr(module, class_name)(spec.target)
