"""The project's error tree.

Every error carries a short machine-readable ``code`` (sent to clients in ``error``
messages) and a human sentence naming the bad value and what is allowed.
"""

from __future__ import annotations

import logging
import re


class SdbridgeError(Exception):
    """Base class: ``code`` is stable and documented in docs/protocol.md."""

    code = "error"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)

    def to_json(self) -> dict[str, str]:
        return {"type": "error", "code": self.code, "message": str(self)}


class ProtocolError(SdbridgeError):
    """A frame or message that does not follow docs/protocol.md."""

    code = "bad_frame"


class CodecError(SdbridgeError):
    """An image payload that cannot be decoded (bad JPEG/PNG, wrong size)."""

    code = "bad_image"


class ParamError(SdbridgeError):
    """An unknown parameter or a value outside its type or range."""

    code = "bad_param"

    def __init__(self, message: str, *, name: str | None = None, value: object = None,
                 code: str | None = None) -> None:
        super().__init__(message, code=code)
        self.name = name
        self.value = value


class ModelError(SdbridgeError):
    """A model that is missing, corrupt, of an unknown layout or fails to load."""

    code = "bad_model"


class EngineError(SdbridgeError):
    """An engine that failed while running a frame."""

    code = "engine_failed"


class ConfigError(SdbridgeError):
    """Settings that cannot work together (a public address without a token, say)."""

    code = "bad_config"


def load_failure(log: logging.Logger, what: str, exc: BaseException) -> str:
    """Log a background load that failed and return the sentence to tell clients: our own errors
    in one line (they say what is wrong), anything else with its traceback (a bug to find).
    ``what`` names a client's choice (a ControlNet's name): it is logged through :func:`printable`."""
    if isinstance(exc, SdbridgeError):
        message = str(exc)
        log.error("%s failed to load: %s", printable(what), printable(message))
    else:
        message = f"{type(exc).__name__}: {exc}"
        log.exception("%s failed to load", printable(what))
    # One line for the client: torch's size-mismatch messages run over many, with tabs (QA 20).
    return re.sub(r"\s*[\r\n\t]+\s*", " ", message).strip()


# What must not reach a log line raw: C0 and C1 controls (a newline forges a line, ESC drives the terminal,
# NUL makes grep call the log binary), DEL, the Unicode line and paragraph separators, lone surrogates.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def printable(text: object) -> str:
    """``text`` for a log line, with what could break the line escaped as Python would (``\\n``, ``\\x1b``);
    other characters kept, so a path with accents stays readable. For client text: a model's name."""
    return _UNPRINTABLE.sub(lambda match: match.group().encode("unicode_escape").decode("ascii"), str(text))


def quoted(text: object) -> str:
    """``text`` in single quotes for a message, escaped as :func:`printable` escapes it. Not ``repr``: that doubles
    every backslash, and a Windows path or a share name reads ``'C:\\\\models\\\\x'`` (QA 46 F5)."""
    return f"'{printable(text)}'"

