"""Errors and how client text reaches the log."""

from __future__ import annotations

import logging

from sdbridge.errors import ModelError, load_failure, printable, quoted


def test_a_failed_load_of_a_client_named_part_logs_one_clean_line(caplog):
    """A ControlNet or motion adapter name comes from a client: a newline in it must not forge a log line."""
    log = logging.getLogger("sdbridge.test_errors")
    name = "edges\n12:00:00 ERROR   sdbridge: forged\x1b[31m"
    with caplog.at_level(logging.ERROR, logger=log.name):
        message = load_failure(log, f"controlnet {name}", ModelError(f"{name!r} not found"))
    [line] = [record.getMessage() for record in caplog.records]
    assert "\n" not in line and "\x1b" not in line and "\\n12:00:00" in line
    assert message == ModelError(f"{name!r} not found").args[0]  # the client's sentence is as it was
    assert printable("Ünïcode path/ok") == "Ünïcode path/ok"


def test_a_failed_load_tells_the_client_one_line(caplog):
    """torch's size-mismatch message runs over many lines with tabs: a client's error sentence is one line (QA 20)."""
    log = logging.getLogger("sdbridge.test_errors")
    error = RuntimeError("Error(s) in loading state_dict:\n\tsize mismatch for conv.weight: a\n\tsize mismatch for b")
    with caplog.at_level(logging.ERROR, logger=log.name):
        message = load_failure(log, "controlnet edges", error)
    assert message == ("RuntimeError: Error(s) in loading state_dict: size mismatch for conv.weight: a size mismatch "
                       "for b")


def test_quoted_keeps_backslashes_and_escapes_controls():
    assert quoted("C:\\models\\x") == "'C:\\models\\x'"   # repr would double each backslash
    assert quoted("a\x1b[2Jb\u2028") == "'a\\x1b[2Jb\\u2028'"
