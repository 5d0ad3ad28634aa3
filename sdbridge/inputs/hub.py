"""The inputs the daemon reads: one thread each, feeding its session as a WebSocket sender does.

Each frame a source yields becomes an :class:`InputFrame` with a v1 header (raw RGB8/RGBA8, top row
first, the spec's channel and reply format) and goes into the session's latest-frame slot through
:meth:`Session.put_frame`, the WebSocket route's own entry point: a newer frame replaces an older one
the worker never took (counted as dropped), the worker decodes, batches and answers it, and the
replies reach the session's WebSocket viewers and the ``--output``s as any client's would. A source
that fails is reported, closed and opened again after a pause, so a camera plugged in or a writer
started mid-show begins feeding.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from sdbridge.bridge.protocol import HEADER_SIZE, VERSION, Flags, FrameHeader, PixelFormat
from sdbridge.bridge.session import InputFrame, RateMeter, Session, SessionRegistry
from sdbridge.errors import ProtocolError
from sdbridge.inputs.base import Input, InputError, InputSpec, create_input, parse_spec

log = logging.getLogger(__name__)

RETRY_S = 5.0
Notify = Callable[[dict[str, Any]], None]


def input_frame(image: np.ndarray, frame_id: int, channel: int, reply: PixelFormat) -> InputFrame:
    """An RGB or RGBA image -> the InputFrame a WebSocket client sending it raw would make (one copy).

    InputError when the image cannot be a v1 frame (larger than 8192 per side)."""
    height, width, channels = image.shape
    pixel_format = PixelFormat.RGB8 if channels == 3 else PixelFormat.RGBA8
    header = FrameHeader(VERSION, pixel_format, Flags.NONE, channel, reply, frame_id & 0xFFFFFFFF,
                         time.time_ns() // 1000, width, height, width * height * channels)
    try:
        header.check()
    except ProtocolError as exc:
        raise InputError(f"a {width}x{height} frame cannot be sent on: {exc}") from exc
    data = bytearray(HEADER_SIZE + header.payload_length)
    data[:HEADER_SIZE] = header.serialize()
    # The one copy: from the source's buffer (a view, maybe flipped or strided) into the message.
    np.frombuffer(data, np.uint8, offset=HEADER_SIZE).reshape(image.shape)[...] = image
    return InputFrame(data=data, payload=memoryview(data)[HEADER_SIZE:], header=header, kind="header")


class InputThread(threading.Thread):
    def __init__(self, spec: InputSpec, source: Input, notify: Notify) -> None:
        super().__init__(name=f"sdbridge-input-{spec.kind}", daemon=True)
        self.spec = spec
        self.source = source
        self.notify = notify
        self.session: Session | None = None
        self._stop_event = threading.Event()
        self.state = "starting"
        self.size: tuple[int, int] | None = None
        self.frames = self.failures = 0
        self.last_error: str | None = None
        self.meter = RateMeter()

    def stop(self) -> None:
        self._stop_event.set()

    def run(self) -> None:
        assert self.session is not None
        while not self._stop_event.is_set():
            try:
                self.source.open()
                self.state = "running"
                log.info("input %s open", self.spec)
                if self._feed(self.session):
                    self.state = "ended"
                    log.info("input %s ended", self.spec)
                    break
            except Exception as exc:  # an input never takes the daemon down: report, close, retry later
                self._failed(exc)
                self._close()
                self._stop_event.wait(RETRY_S)
        self._close()
        if self.state != "ended":
            self.state = "stopped"

    def _feed(self, session: Session) -> bool:
        """Read until stopped (False) or the source ends (True)."""
        frame_id = self.frames
        while not self._stop_event.is_set():
            image = self.source.read(self._stop_event)
            if image is None:
                return not self._stop_event.is_set()
            frame_id += 1
            session.put_frame(input_frame(image, frame_id, self.spec.channel, self.spec.reply))
            self.frames = frame_id
            self.size = (image.shape[1], image.shape[0])
            self.meter.record()
        return False

    def _failed(self, exc: Exception) -> None:
        self.failures += 1
        self.state = "retrying"
        self.last_error = str(exc) if isinstance(exc, InputError) else f"{type(exc).__name__}: {exc}"
        log.error("input %s failed: %s; retrying in %.0f s", self.spec, self.last_error, RETRY_S)
        self.notify({"type": "error", "code": getattr(exc, "code", "input_failed"),
                     "message": f"input {self.spec} failed: {self.last_error}; retrying in {RETRY_S:.0f} s"})

    def _close(self) -> None:
        try:
            self.source.close()
        except Exception:
            log.exception("closing input %s failed", self.spec)

    def stats(self) -> dict[str, Any]:
        return {"input": str(self.spec), "session": self.spec.session_name, "channel": self.spec.channel,
                "state": self.state, "size": list(self.size) if self.size else None, "frames": self.frames,
                "fps": round(self.meter.rate(), 2), "failures": self.failures, "last_error": self.last_error}


def check_input(source: Input) -> None:
    """What a source can know before it starts: InputError for a set-up mistake (a file that is not there)."""
    source.check()


class InputHub:
    """Every configured input; started on the daemon's loop with the session registry."""

    def __init__(self, specs: Iterable[str], *, notify: Notify | None = None) -> None:
        """Raises InputError for a bad spec, a missing library, a source that can tell now that it cannot
        work (a file that does not exist), or two inputs feeding one session's channel, before anything starts."""
        self.threads: list[InputThread] = []
        fed: dict[tuple[str, int], InputSpec] = {}
        for text in specs:
            spec = parse_spec(text)
            key = (spec.session_name, spec.channel)
            if key in fed:
                # Two sources in one slot would replace each other's frames: a flicker between two streams.
                raise InputError(f"inputs {fed[key]} and {spec} both feed session {key[0]!r} channel {key[1]}: "
                                 f"give one of them another @SESSION or #CHANNEL", code="bad_input")
            fed[key] = spec
            source = create_input(spec)
            check_input(source)
            self.threads.append(InputThread(spec, source, notify or (lambda event: None)))
        self._registry: SessionRegistry | None = None

    def start(self, registry: SessionRegistry) -> None:
        """Open each input's session (kept open as a WebSocket sender keeps its own) and start reading.
        Called on the daemon's loop, which owns the sessions' ``senders`` counts."""
        self._registry = registry
        for thread in self.threads:
            thread.session = registry.open(thread.spec.session_name)
            thread.session.senders += 1
            thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Stop reading and join the threads (any thread); :meth:`release` gives the sessions back."""
        for thread in self.threads:
            thread.stop()
        for thread in self.threads:
            if thread.is_alive():
                thread.join(timeout)
                if thread.is_alive():
                    log.warning("input %s did not stop within %.0f s", thread.spec, timeout)

    def release(self) -> None:
        """On the loop, after :meth:`stop`: the sessions are the registry's to close when nobody else uses them."""
        for thread in self.threads:
            if thread.session is not None and self._registry is not None:
                thread.session.senders -= 1
                self._registry.release(thread.session)
                thread.session = None

    @property
    def frames(self) -> int:
        return sum(thread.frames for thread in self.threads)

    def stats(self) -> list[dict[str, Any]]:
        return [thread.stats() for thread in self.threads]
