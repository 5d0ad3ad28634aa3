"""Sessions: one stream of frames in, its generated frames out to any number of viewers.

The asyncio loop and the worker thread meet here and nowhere else (with the output hand-off):

- the input side is a :class:`LatestSlot` written by the loop and taken by the worker; a newer
  frame replaces an older one, which is counted as dropped and never decoded;
- each viewer (a WebSocket connection watching the session) has an output slot of its own on
  the loop's side, so a stalled viewer loses its own frames and never holds anyone else's.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from sdbridge.bridge.protocol import FrameHeader
from sdbridge.engines.base import StreamState
from sdbridge.errors import ProtocolError

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_CONTROL_MESSAGES = 64  # errors/replies waiting for a viewer that does not read; older ones are dropped
# The newest encoded frame of each condition channel stays with its session (docs/protocol.md, "Condition
# streams"). QA 9: 255 channels x 64 MiB each, per session, filled 2.6 GB that the allocator never gave back.
# Four slots read a channel (3 ControlNets and the IP-Adapter), and fit it to the engine's size: four raw
# 4096x4096 RGBA passes (64 MiB each, the largest WebSocket message) still fit.
MAX_CONDITION_BYTES = 256 * 1024 * 1024
# And over all sessions: each session's budget alone let N clients hold N x 256 MiB (QA 51 F5).
MAX_CONDITION_BYTES_TOTAL = 1024 * 1024 * 1024


class ConditionBudget:
    """The bytes of the condition frames every session holds (the newest of each channel), against one limit."""

    def __init__(self, limit: int = MAX_CONDITION_BYTES_TOTAL) -> None:
        self.limit = limit
        self.held = 0
        self._lock = threading.Lock()

    def take(self, change: int) -> int | None:
        """Count ``change`` bytes more (or fewer); None, or what is held when that would pass the limit."""
        with self._lock:
            if change > 0 and self.held + change > self.limit:
                return self.held
            self.held += change
            return None


@dataclass
class InputFrame:
    """One received binary message, still encoded: decoding waits until the worker takes it."""

    data: bytes                     # the whole message; ``payload`` is a view into it
    payload: memoryview
    header: FrameHeader | None      # None for a bare JPEG/PNG file
    kind: str                       # "header", "jpeg" or "png"
    received_ns: int = field(default_factory=time.perf_counter_ns)

    @property
    def frame_id(self) -> int | None:
        return self.header.frame_id if self.header else None


class LatestSlot(Generic[T]):
    """Holds one item; a newer ``put`` replaces the older, which is counted in ``dropped``."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._item: T | None = None
        self.accepted = 0
        self.dropped = 0

    def put(self, item: T) -> bool:
        """Store ``item``; return True when it replaced one the worker never took."""
        with self._lock:
            replaced = self._item is not None
            self._item = item
            self.accepted += 1
            if replaced:
                self.dropped += 1
            return replaced

    def take(self) -> T | None:
        with self._lock:
            item, self._item = self._item, None
            return item

    def discard(self) -> None:
        """Count an item that was taken but superseded by a newer one before it was used."""
        with self._lock:
            self.dropped += 1

    @property
    def pending(self) -> bool:
        return self._item is not None


class Viewer:
    """One connection's outgoing side: the newest frame plus a short queue of JSON messages.

    Lives on the event loop only (no lock). ``next`` waits for something to send.
    """

    def __init__(self, name: str = "") -> None:
        self.name = name
        self._frame: bytes | None = None
        self._control: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_CONTROL_MESSAGES)
        self._ready = asyncio.Event()
        self.frames_sent = 0
        self.frames_dropped = 0
        self.control_dropped = 0
        self.closed = False

    def offer_frame(self, message: bytes) -> None:
        if self._frame is not None:
            self.frames_dropped += 1
        self._frame = message
        self._ready.set()

    def offer_control(self, message: dict[str, Any]) -> None:
        """Queue a JSON message. A params push or a stats snapshot joins the one still queued (the newest values
        are what a client needs): a glide pushes params 60-180 times a second, and a client that read slower
        than that lost the engine and error messages among them from its queue, unreported (QA 50 F1)."""
        kind = _pushed_state(message)
        if kind is not None:
            for index, queued in enumerate(self._control):
                if _pushed_state(queued) == kind:
                    # A new dict: the queued one and the message may be shared with other viewers. It goes last,
                    # where this push would have gone: in the queued one's place it went before a reply queued
                    # since with older values (a `get`), and the client kept those (QA 62 F1).
                    del self._control[index]
                    self._control.append({"type": "params", "values": {**queued["values"], **message["values"]}}
                                         if kind == "params" else message)
                    self._ready.set()
                    return
        if len(self._control) == self._control.maxlen:
            self.control_dropped += 1
            if self.control_dropped == 1:
                log.warning("viewer %s reads its messages too slowly: the oldest are dropped (/stats: "
                            "viewer_control_dropped)", self.name or "?")
        self._control.append(message)
        self._ready.set()

    @property
    def buffered_frames(self) -> int:
        return 0 if self._frame is None else 1

    async def next(self) -> tuple[str, Any]:
        """("json", dict) or ("frame", bytes); control messages go first, they are small."""
        while True:
            if self._control:
                return "json", self._control.popleft()
            if self._frame is not None:
                frame, self._frame = self._frame, None
                return "frame", frame
            self._ready.clear()
            await self._ready.wait()


class SharedMessage(dict[str, Any]):
    """A JSON message offered to many viewers, serialized once, by the first that sends it: each subscriber's send
    loop dumped the stats (an entry per session) again, sessions x subscribers a tick, 1.4 s of every second at 450
    subscribed sessions (QA 53 F10). Never changed once offered."""

    __slots__ = ("_text",)

    def text(self) -> str:
        try:
            return self._text
        except AttributeError:
            self._text: str = json.dumps(self, separators=(",", ":"))
            return self._text


def encode_message(message: dict[str, Any]) -> str:
    """A viewer's JSON message as the text it sends."""
    if isinstance(message, SharedMessage):
        return message.text()
    return json.dumps(message, separators=(",", ":"))


def _pushed_state(message: dict[str, Any]) -> str | None:
    """"params" or "stats" for a message that only tells the current state (a newer one supersedes it);
    None for the rest, a reply to a request (it carries its id) included."""
    kind = message.get("type")
    if kind in ("params", "stats") and "id" not in message:
        return kind
    return None


class RateMeter:
    """Events per second over a sliding window, and latency percentiles over the last samples."""

    def __init__(self, window_s: float = 2.0, samples: int = 512) -> None:
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque(maxlen=4096)
        self._latencies_ms: collections.deque[float] = collections.deque(maxlen=samples)

    def record(self, latency_ms: float | None = None, now: float | None = None) -> None:
        self._times.append(time.monotonic() if now is None else now)
        if latency_ms is not None:
            self._latencies_ms.append(latency_ms)

    def rate(self, now: float | None = None) -> float:
        """Events in the last ``window_s`` before ``now`` (a monotonic time not earlier than the last asked for),
        per second. Those before the window go: counting all 4096 kept took 0.1 ms a session, 45-93 ms a telemetry
        tick on the loop at 450 sessions (QA 62 F5)."""
        now = time.monotonic() if now is None else now
        times = self._times  # record() appends from other threads; only this pops, so times[0] stays
        while times and now - times[0] > self.window_s:
            times.popleft()
        return len(times) / self.window_s

    def percentile(self, q: float) -> float | None:
        values = sorted(self._latencies_ms)
        if not values:
            return None
        index = min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))
        return values[index]


class Session:
    """A named stream: its input slots, its viewers and the engine's per-stream state."""

    def __init__(self, session_id: str, on_input: Callable[[], None], budget: ConditionBudget | None = None) -> None:
        self.id = session_id
        self.input: LatestSlot[InputFrame] = LatestSlot()
        # Condition streams (channel byte > 0: a depth or edge pass for ControlNet).
        self.conditions: dict[int, LatestSlot[InputFrame]] = {}
        # Worker-owned: each channel's latest frame, still encoded, and the one its decoded image came from.
        self.condition_latest: dict[int, InputFrame] = {}
        self.condition_decoded: dict[int, tuple[InputFrame, tuple[int, int, str]]] = {}  # and the fit it had
        self.told_no_condition: set[int] = set()  # worker-owned: channels read before this session sent them
        # Bytes of each channel's newest frame, counted against MAX_CONDITION_BYTES where it arrives (the loop,
        # or an --input's thread). The worker may still hold the one before it: at most twice the budget.
        self._condition_bytes: dict[int, int] = {}
        self._condition_lock = threading.Lock()
        self._budget = budget  # the daemon's, over all sessions; None once this session has given its bytes back
        self.viewers: set[Viewer] = set()
        self.senders = 0
        self.state = StreamState(session_id)
        self.output_meter = RateMeter()
        self.frames_out = 0
        self.errors = 0
        self.passthrough_frames = 0
        self.skipped_frames = 0  # answered by a plugin (the similarity filter) without the engine
        self.generated_frames = 0  # of frames_out, made in txt2img mode: no client frame asked for them
        self.created = time.monotonic()
        self.next_generated_at = 0.0  # txt2img pacing, worker-owned
        self.last_frame_at: float | None = None  # when the worker last took a frame of it (monotonic)
        self.closed = False  # released from the registry: its totals are retired (SessionRegistry.count_out)
        self.last_served_ns: int | None = None  # when its frame was last taken or its reply sent (perf_counter_ns)
        self.resumes = 0  # times its frames came back after a pause (the stream then starts afresh)
        self._on_input = on_input

    def put_frame(self, frame: InputFrame) -> None:
        """Hand a frame to the worker; a condition frame past MAX_CONDITION_BYTES is a ProtocolError
        (``bad_frame``), and the frames already held stay."""
        if frame.header is not None and frame.header.channel != 0:
            channel = frame.header.channel
            with self._condition_lock:
                held = sum(size for other, size in self._condition_bytes.items() if other != channel)
                if held + len(frame.data) > MAX_CONDITION_BYTES:
                    raise ProtocolError(
                        f"condition frame of {len(frame.data)} bytes on channel {channel} would bring this "
                        f"session's condition frames to {held + len(frame.data)} bytes (at most "
                        f"{MAX_CONDITION_BYTES}, the newest frame of each channel counted; "
                        f"{len(self._condition_bytes)} channel(s) hold {sum(self._condition_bytes.values())})")
                budget = self._budget
                if budget is not None:
                    total = budget.take(len(frame.data) - self._condition_bytes.get(channel, 0))
                    if total is not None:
                        raise ProtocolError(
                            f"condition frame of {len(frame.data)} bytes on channel {channel} would bring the "
                            f"daemon's condition frames past {budget.limit} bytes ({budget.limit / 2**30:g} GiB) over "
                            f"all sessions ({total} held): send smaller frames (JPEG, or the engine's size), or "
                            f"fewer channels")
                self._condition_bytes[channel] = len(frame.data)
                slot = self.conditions.setdefault(channel, LatestSlot())
            slot.put(frame)
            return
        self.input.put(frame)
        self._on_input()

    def give_back_conditions(self) -> None:
        """Closed: its condition frames' bytes leave the daemon's budget (a late frame counts in its own only)."""
        with self._condition_lock:
            budget, self._budget = self._budget, None
            if budget is not None:
                budget.take(-sum(self._condition_bytes.values()))

    def publish(self, message: bytes) -> None:
        """Loop side: hand one output frame to every viewer's slot."""
        for viewer in self.viewers:
            viewer.offer_frame(message)

    def broadcast(self, message: dict[str, Any]) -> None:
        for viewer in self.viewers:
            viewer.offer_control(message)

    def stats(self) -> dict[str, Any]:
        p50 = self.output_meter.percentile(50)
        p99 = self.output_meter.percentile(99)
        return {
            "id": self.id,
            "viewers": len(self.viewers),
            "senders": self.senders,
            "frames_in": self.input.accepted,
            # Condition frames (channel > 0) per channel: how many came, how many a newer one replaced unused.
            "condition_frames": {channel: {"in": slot.accepted, "dropped": slot.dropped}
                                 for channel, slot in list(self.conditions.items())},
            "condition_bytes": sum(list(self._condition_bytes.values())),
            "frames_dropped": self.input.dropped,
            "frames_out": self.frames_out,
            "passthrough_frames": self.passthrough_frames,
            "skipped_frames": self.skipped_frames,
            "generated_frames": self.generated_frames,
            "resumes": self.resumes,
            "errors": self.errors,
            "fps": round(self.output_meter.rate(), 2),
            "latency_ms_p50": None if p50 is None else round(p50, 2),
            "latency_ms_p99": None if p99 is None else round(p99, 2),
            "viewer_frames_dropped": sum(v.frames_dropped for v in self.viewers),
            "viewer_control_dropped": sum(v.control_dropped for v in self.viewers),
        }


class SessionRegistry:
    """All live sessions; the worker reads a snapshot of them at every frame boundary."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sessions: dict[str, Session] = {}
        self._counter = itertools.count(1)
        self.conditions = ConditionBudget()
        self.wake = threading.Event()  # set when any input arrives; the worker waits on it
        # Counters of sessions that have closed, so that totals survive their sessions.
        self.retired = {"frames_in": 0, "frames_dropped": 0, "frames_out": 0, "condition_frames": 0,
                        "frames_skipped": 0, "frames_generated": 0}

    def _notify(self) -> None:
        self.wake.set()

    def open(self, name: str | None = None) -> Session:
        """Join the session called ``name``, creating it; a new anonymous session without one."""
        with self._lock:
            if name is None:
                name = f"s{next(self._counter)}"
                while name in self._sessions:
                    name = f"s{next(self._counter)}"
            session = self._sessions.get(name)
            if session is None:
                session = Session(name, self._notify, self.conditions)
                self._sessions[name] = session
                log.info("session %s opened", name)
            return session

    def release(self, session: Session) -> None:
        """Forget a session nobody watches or feeds any more."""
        with self._lock:
            if not session.viewers and session.senders <= 0 and self._sessions.get(session.id) is session:
                del self._sessions[session.id]
                session.closed = True
                session.give_back_conditions()
                self.retired["frames_in"] += session.input.accepted
                # A frame still in its slot when the session closes was never served: dropped, so that the
                # totals add up (QA 12: frames_received outran frames_out + frames_dropped).
                self.retired["frames_dropped"] += session.input.dropped + int(session.input.pending)
                self.retired["frames_out"] += session.frames_out
                self.retired["frames_skipped"] += session.skipped_frames
                self.retired["frames_generated"] += session.generated_frames
                self.retired["condition_frames"] += sum(slot.accepted for slot in list(session.conditions.values()))
                log.info("session %s closed", session.id)

    def count_out(self, session: Session, generated: bool = False) -> None:
        """Count a reply made for ``session`` (``generated``: a txt2img frame, made for no client frame); one
        made after it closed (its frame was in flight) goes to the retired totals, which were taken without it."""
        with self._lock:
            session.frames_out += 1
            session.generated_frames += generated
            if session.closed:
                self.retired["frames_out"] += 1
                self.retired["frames_generated"] += generated

    def count_skipped(self, session: Session) -> None:
        """Count a frame of ``session`` a plugin answered without the engine (the similarity filter)."""
        with self._lock:
            session.skipped_frames += 1
            if session.closed:
                self.retired["frames_skipped"] += 1

    def count_unserved(self, session: Session) -> None:
        """A frame of ``session`` taken from its slot but never to be served (its session closed meanwhile)."""
        with self._lock:
            if session.closed:
                self.retired["frames_dropped"] += 1
            else:
                session.input.discard()

    def get(self, name: str) -> Session | None:
        with self._lock:
            return self._sessions.get(name)

    def sessions(self) -> list[Session]:
        with self._lock:
            return list(self._sessions.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._sessions)
