"""A log that stays readable under a flood: the first problem in full, then a summary every few seconds.

A client can send bad input as fast as the network carries it (OSC datagrams, WebSocket messages, refused
requests); each one is answered, but logging each would let one client fill the disk and bury everything
else. Shared by the OSC server, each WebSocket connection and the access checks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

LOG_SUMMARY_EVERY_S = 5.0


class ProblemLog:
    """Logs the first problem in full, then at most one summary line every ``every_s`` seconds.

    A client can send problems as fast as the network carries them; the log must stay readable and bounded.
    ``counts`` returns counters (by kind) that the summary reports as their growth since the last line logged,
    so the summary still says what kinds of problems were not logged. Shared by OSC (per server) and the
    WebSocket route (per connection)."""

    def __init__(self, logger: logging.Logger, prefix: str, counts: Callable[[], Mapping[str, int]], *,
                 level: int = logging.WARNING, noun: str = "problems", every_s: float = LOG_SUMMARY_EVERY_S) -> None:
        self._logger = logger
        self._prefix = prefix
        self._counts = counts
        self._level = level
        self._noun = noun
        self._every_s = every_s
        self._last = -float("inf")
        self._suppressed = 0
        self._counts_at_last = dict(counts())
        self._flush_handle: asyncio.TimerHandle | None = None

    def log(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last >= self._every_s:
            self.flush()
            self._logger.log(self._level, message, *args, stacklevel=2)  # the caller's line, not ours
            self._last = now
            self._counts_at_last = dict(self._counts())
            return
        self._suppressed += 1
        if self._flush_handle is None:
            try:  # the summary comes even if the flood stops
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._flush_handle = loop.call_later(self._last + self._every_s - now, self.flush)

    warning = log  # OscServer's name for it: OSC problems are logged as warnings

    def flush(self) -> None:
        """Log the summary of what was not logged, if anything was not; called again at close."""
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        if not self._suppressed:
            return
        now_counts = dict(self._counts())
        kinds = ", ".join(f"{key} +{value - self._counts_at_last.get(key, 0)}" for key, value in now_counts.items()
                          if value != self._counts_at_last.get(key, 0))
        self._logger.log(self._level, "%s: %d more %s not logged (%s)", self._prefix, self._suppressed, self._noun,
                         kinds or "counters unchanged")
        self._suppressed = 0
        self._last = time.monotonic()
        self._counts_at_last = now_counts
