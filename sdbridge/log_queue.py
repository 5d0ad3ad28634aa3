"""Log lines leave the thread that logs them through a bounded queue, and one thread writes them out.

The event loop and the worker log as they serve. Written where they are made, a console that stops taking
writes stops them too: a click in a Windows console window (QuickEdit holds every write while a selection is
up), a terminal paused with Ctrl-S, a pipe nobody reads. The whole daemon froze so, HTTP, WebSocket and OSC
with it (QA 44 F15). Here only the writer thread waits; a full queue drops lines, counts them, and says how
many once the console takes lines again.
"""

from __future__ import annotations

import atexit
import logging
import queue
import sys
import threading
import time
from logging.handlers import QueueHandler
from typing import TextIO

FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
DATE_FORMAT = "%H:%M:%S"
QUEUE_LINES = 10_000  # about 2 MB of lines: minutes of a busy daemon's log


class DroppingQueueHandler(QueueHandler):
    """A QueueHandler that never waits: a record that finds the queue full is counted, not kept."""

    def __init__(self, records: queue.Queue) -> None:
        super().__init__(records)
        self.dropped = 0

    def enqueue(self, record: logging.LogRecord) -> None:
        try:
            size, room = self.queue.qsize(), self.queue.maxsize
            # The last tenth of the queue is kept for warnings and errors: a flood of info lines (sessions, frames)
            # must not push out the line that says what went wrong (QA 46).
            if room and record.levelno < logging.WARNING and size >= room - room // 10:
                raise queue.Full
            if self.dropped:
                # Before the next line that fits, how many did not: room for both, or neither goes in.
                if room and size > room - 2:
                    raise queue.Full
                self.queue.put_nowait(self._dropped_record())
                self.dropped = 0
            self.queue.put_nowait(record)
        except queue.Full:
            self.dropped += 1

    def _dropped_record(self) -> logging.LogRecord:
        return logging.LogRecord("sdbridge", logging.WARNING, __file__, 0,
                                 f"{self.dropped} log lines dropped while the console took none", None, None)


def setup_logging(level: str, stream: TextIO | None = None, capacity: int = QUEUE_LINES) -> threading.Thread | None:
    """The root logger at ``level``, its lines written to ``stream`` (stderr) by a thread of their own, which this
    returns. Like ``logging.basicConfig``, nothing changes when the root logger already has a handler (a test
    harness's, an embedding program's). Python's warnings go the same way (a library's, written straight to
    stderr, would hold the thread that warned). The writer stops at exit, after writing what is queued."""
    root = logging.getLogger()
    if root.handlers:
        return None
    writer = logging.StreamHandler(stream if stream is not None else sys.stderr)
    writer.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))
    handler = DroppingQueueHandler(queue.Queue(capacity))
    thread = threading.Thread(target=_write, args=(handler.queue, writer), name="sdbridge-log", daemon=True)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper(), logging.INFO))
    logging.captureWarnings(True)
    thread.start()
    _running.append((handler, thread))
    atexit.register(stop_logging)
    return thread


_running: list[tuple[DroppingQueueHandler, threading.Thread]] = []
_END = None  # put last: the writer stops there


def _write(records: queue.Queue, writer: logging.Handler) -> None:
    while (record := records.get()) is not _END:
        writer.handle(record)


def stop_logging(timeout_s: float = 2.0) -> bool:
    """Write out what is queued, the count of lines dropped last too, and stop the writer thread; at exit, and
    before a program ends with ``os._exit``, which runs no atexit function (serve does). A console that takes no
    writes gets ``timeout_s``, no more: a launcher's terminate() must end the program even then (QA 46). False
    when a writer is still held in a write: flushing stderr then would wait behind it."""
    deadline = time.monotonic() + timeout_s
    written = True
    while _running:
        handler, thread = _running.pop()
        logging.getLogger().removeHandler(handler)
        try:
            if handler.dropped:
                handler.queue.put(handler._dropped_record(), timeout=max(0.0, deadline - time.monotonic()))
            handler.queue.put(_END, timeout=max(0.0, deadline - time.monotonic()))
        except queue.Full:
            pass  # the writer is held where it writes: it is a daemon thread, and goes with the program
        thread.join(max(0.0, deadline - time.monotonic()))
        written = written and not thread.is_alive()
    return written
