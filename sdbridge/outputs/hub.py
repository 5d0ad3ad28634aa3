"""The outputs the daemon feeds: one thread each, behind a latest-frame slot.

The worker hands every output frame to :meth:`OutputHub.publish`, which only swaps a reference
and never waits: an output that stalls (a virtual camera nobody reads, an NDI receiver on a slow
network, a full disk) drops its own frames and nothing else slows down, the same rule the
WebSocket viewers follow. An output that fails is reported, closed, and retried after a pause,
so a camera plugged in mid-show starts receiving.

An output with ``interpolate`` (2x-4x) shows frames made by flow between the engine's, on a clock
its thread keeps (:class:`~sdbridge.outputs.interpolate.Pacer`); off, each frame is sent as it comes.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sdbridge.outputs.base import Output, OutputError, OutputSpec, create_output, parse_spec
from sdbridge.outputs.interpolate import Pacer, RateMeter, format_factor

log = logging.getLogger(__name__)

RETRY_S = 5.0
DRAIN_S = 2.0  # at stop, how long in all the outputs get to show what they were offered
Notify = Callable[[dict[str, Any]], None]


class OutputThread(threading.Thread):
    def __init__(self, spec: OutputSpec, output: Output, fps: float, notify: Notify, interpolate: int = 1) -> None:
        super().__init__(name=f"sdbridge-output-{spec.kind}", daemon=True)
        self.spec = spec
        self.output = output
        self.fps = fps
        self.notify = notify
        self._frame: np.ndarray | None = None
        self._frame_at = 0.0  # when it was offered: the pacer's clock counts from the engine, not from this thread
        self._busy = False    # taking, planning or sending a frame (idle() is false meanwhile)
        self._frame_session: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop_event = threading.Event()
        self.size: tuple[int, int] | None = None
        self.published = self.sent = self.dropped = self.failures = 0
        self.last_error: str | None = None
        # The spec's own option wins over the daemon's default.
        self.factor = spec.interpolate if spec.interpolate is not None else interpolate
        self.pacer = Pacer(self.factor)
        self._rate_in, self._rate_out = RateMeter(), RateMeter()

    def offer(self, frame: np.ndarray, session_id: str | None = None) -> None:
        with self._lock:
            if self._frame is not None:
                self.dropped += 1
            self._frame, self._frame_session = frame, session_id
            self._frame_at = time.monotonic()
            self._rate_in.add(self._frame_at)
            self.published += 1
        self._wake.set()

    def idle(self) -> bool:
        """No engine frame waiting, none being sent and no slot planned: all offered is shown or dropped."""
        with self._lock:
            return self._frame is None and not self._busy and self.pacer.next_due() is None

    def stop(self) -> None:
        self._stop_event.set()
        self._wake.set()

    def run(self) -> None:
        retry_at = 0.0
        while not self._stop_event.is_set():
            due_s = self.pacer.next_due()
            self._wake.wait(None if due_s is None else max(0.0, due_s - time.monotonic()))
            self._wake.clear()
            with self._lock:
                frame, self._frame, offered_at, session_id = self._frame, None, self._frame_at, self._frame_session
                self._busy = True
            try:  # a frame taken as the stop came is still shown: it is the show's last
                retry_at = self._turn(frame, offered_at, session_id, retry_at)
            finally:
                with self._lock:
                    self._busy = False
        self._close()

    def _turn(self, frame: np.ndarray | None, offered_at: float, session_id: str | None, retry_at: float) -> float:
        """Hand a new engine frame to the pacer, send what is due; the time before which nothing is sent."""
        if frame is not None and time.monotonic() < retry_at:
            with self._lock:
                self.dropped += 1
            return retry_at
        try:  # the flow (push) and the in-betweens fail as the sink does: counted, reported, retried
            if frame is not None:
                # The previous engine frame, if its slot has not come (the new one is early, or the sink was
                # late), is shown before the new frame is planned, which drops the in-betweens left: a real frame
                # never loses to an in-between.
                self._send(self.pacer.take_pending())
                # Off (factor 1), the frame is due at once and comes back as the same array: unchanged.
                self.pacer.push(frame, offered_at, session_id)  # the flow pair is made here
            self._send(self.pacer.pop_due(time.monotonic()))  # an in-between is made here, when it is due
        except Exception as exc:
            return self._failed(exc)
        return retry_at

    def _send(self, frame: np.ndarray | None) -> None:
        if frame is None:
            return
        size = (frame.shape[1], frame.shape[0])
        if size != self.size:
            # The rate it sends at: a virtual camera paced at the engine's would drop the in-betweens (QA 67 F9).
            self.output.open(size[0], size[1], self.fps * self.factor)
            self.size = size
            log.info("output %s open at %dx%d", self.spec, *size)
        self.output.send(frame)
        self.sent += 1
        with self._lock:
            self._rate_out.add(time.monotonic())

    def _failed(self, exc: Exception) -> float:
        """An output never takes the daemon down: report, close, retry later (the time of the retry)."""
        self.failures += 1
        self.last_error = str(exc) if isinstance(exc, OutputError) else f"{type(exc).__name__}: {exc}"
        log.error("output %s failed: %s; retrying in %.0f s", self.spec, self.last_error, RETRY_S)
        self.notify({"type": "error", "code": getattr(exc, "code", "output_failed"),
                     "message": f"output {self.spec} failed: {self.last_error}; retrying in {RETRY_S:.0f} s"})
        self._close()
        self.pacer.reset()  # no in-betweens left over from before the failure
        return time.monotonic() + RETRY_S

    def _close(self) -> None:
        self.size = None
        try:
            self.output.close()
        except Exception:
            log.exception("closing output %s failed", self.spec)

    def stats(self) -> dict[str, Any]:
        """``fps_in``: engine frames offered per second; ``fps_out``: frames sent (in-betweens included).
        ``sent`` counts in-betweens too; ``skipped``: slots dropped for a newer engine frame or a slow sink."""
        now = time.monotonic()
        with self._lock:
            fps_in, fps_out = self._rate_in.rate(now), self._rate_out.rate(now)
        pacer = self.pacer
        return {"output": str(self.spec), "size": list(self.size) if self.size else None, "published": self.published,
                "sent": self.sent, "dropped": self.dropped, "failures": self.failures, "last_error": self.last_error,
                "interpolate": format_factor(self.factor), "fps_in": round(fps_in, 2), "fps_out": round(fps_out, 2),
                "synthesised": pacer.synthesised, "cuts": pacer.cuts, "stalls": pacer.stalls,
                "skipped": pacer.skipped}


def check_output(output: Output) -> None:
    """What an output can know before its first frame: OutputError when it cannot work here.

    Only outputs whose failure is a set-up mistake have a ``check`` (record: a folder it cannot
    write); a device that is missing now may be plugged in mid-show, so those are retried instead."""
    check = getattr(output, "check", None)
    if check is not None:
        check()


class OutputHub:
    """Every configured output; ``publish`` is what the worker calls per output frame."""

    def __init__(self, specs: Iterable[str], *, fps: float = 30.0, notify: Notify | None = None,
                 interpolate: int = 1) -> None:
        """Raises OutputError for a bad spec, a missing library, or an output that can tell now that
        it cannot work (a record folder it cannot write), before anything starts. ``interpolate``: frames
        shown per engine frame for outputs whose spec does not say (1: off)."""
        self.threads: list[OutputThread] = []
        folders: dict[Path, OutputSpec] = {}
        for text in specs:
            spec = parse_spec(text)
            output = create_output(spec)
            check_output(output)
            folder = getattr(output, "folder", None)  # a recording's: two in one would number over each other
            if folder is not None:
                where = Path(folder).resolve()
                if where in folders:
                    raise OutputError(f"outputs {folders[where]} and {spec} both record into {where}: "
                                      "give each its own folder", code="bad_output")
                folders[where] = spec
            self.threads.append(OutputThread(spec, output, fps, notify or (lambda event: None), interpolate))

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def publish(self, session_id: str, frame: np.ndarray) -> None:
        """One output frame, uint8 RGB ``[H, W, 3]``; returns at once."""
        for thread in self.threads:
            if thread.spec.session is None or thread.spec.session == session_id:
                thread.offer(frame, session_id)

    def stop(self, timeout: float = 5.0, drain_s: float = DRAIN_S) -> None:
        """Drain, then stop: each output first shows what it was offered (an engine frame waiting or
        being sent, the slots planned for the last one at 2x-4x), for at most ``drain_s`` in all, so a
        recording keeps its final frames; an output still busy then (stuck or too slow) is stopped anyway."""
        deadline = time.monotonic() + drain_s
        while time.monotonic() < deadline and not all(t.idle() for t in self.threads if t.is_alive()):
            time.sleep(0.005)
        for thread in self.threads:
            thread.stop()
        for thread in self.threads:
            if thread.is_alive():
                thread.join(timeout)

    def stats(self) -> list[dict[str, Any]]:
        return [thread.stats() for thread in self.threads]
