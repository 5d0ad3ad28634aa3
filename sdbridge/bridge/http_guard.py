"""Bounds on the main port's connections: a request head must arrive in time, a body must keep coming, and
one client cannot hold every socket.

uvicorn's HTTP/1.1 protocol waits forever for a request head that never ends (it times out only the idle
time after a response), so a client that opens connections and sends a byte now and then (slowloris) holds a
socket each, until the daemon runs out of file descriptors and can neither accept a WebSocket nor open a
model file. :func:`guarded_protocol` makes uvicorn's h11 protocol class with three bounds:

* a head timeout: from the connection (or the end of the previous response) to a complete request line and
  headers; past it a client that has sent part of a head gets ``408`` with the daemon's error JSON, and the
  connection closes (one that has sent nothing is closed without a word, as nginx does: a keep-alive client
  would read an unasked-for 408 as the answer to its next request);
* a body stall: a request whose body sends nothing for this long is cut (the route sees a disconnect), while
  the daemon itself is not pausing the reading;
* a connection cap, in all and per client address: past it a new connection gets ``503``
  ``too_many_connections`` and closes. A WebSocket stays counted after its upgrade.

It reaches into uvicorn's ``H11Protocol`` (``cycle``, ``flow``, ``connections``); where that class or the methods
it extends are missing, :func:`guarded_protocol` returns None and the daemon runs uvicorn's own class, so that a
uvicorn that moves them cannot stop the daemon from starting (the bounds are then gone, and ``/stats`` says
``http.guarded: false``).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from sdbridge.bridge.problem_log import ProblemLog

try:  # uvicorn's own, subclassed; what it uses is checked (_supported)
    from uvicorn.protocols.http.h11_impl import H11Protocol
except ImportError:  # a uvicorn that has moved it: the daemon runs uvicorn's protocol, unbounded
    H11Protocol = object  # type: ignore[misc,assignment]

log = logging.getLogger(__name__)

REFUSED_LINGER_S = 1.0  # a refused connection stays half-closed this long so the client reads the answer
# Refused connections held so at once; past this a refusal is closed at once: a client connecting in a loop held
# (its rate x 1 s) sockets, uncounted, until accept() failed for want of descriptors (QA 62 F6: 22,706 EMFILE in 5 s).
MAX_LINGERING = 64
FILES_BESIDE_CONNECTIONS = 512  # besides its sockets: models, threads' pipes, outputs, the OSCQuery port (at most 80)


@dataclass
class HttpLimits:
    head_timeout_s: float = 10.0
    body_stall_s: float = 30.0
    max_connections: int = 512
    max_connections_per_client: int = 128


@dataclass
class ConnectionGuard:
    """The limits and what they did; shared by every connection of one server."""

    limits: HttpLimits
    per_client: Counter[str] = field(default_factory=Counter)
    open: int = 0
    refused: int = 0
    lingering: int = 0  # refused connections held open for their answer to be read
    head_timeouts: int = 0
    idle_closed: int = 0
    body_stalls: int = 0
    problems: ProblemLog = field(init=False)

    def __post_init__(self) -> None:
        self.problems = ProblemLog(log, "HTTP", self.counts, noun="slow or surplus connections")

    def counts(self) -> dict[str, int]:
        return {"refused_connections": self.refused, "head_timeouts": self.head_timeouts,
                "body_stalls": self.body_stalls}

    def describe(self, guarded: bool) -> dict[str, Any]:
        return {"guarded": guarded, "open_connections": self.open, "idle_closed": self.idle_closed, **self.counts()}

    def admit(self, client: str) -> str | None:
        """Count a new connection from ``client``; the reason it is refused, or None."""
        limits = self.limits
        if self.open >= limits.max_connections:
            return f"the daemon holds {self.open} connections, its limit (max_connections {limits.max_connections})"
        if self.per_client[client] >= limits.max_connections_per_client:
            return (f"{client} holds {self.per_client[client]} connections, the limit for one address "
                    f"(max_connections_per_client {limits.max_connections_per_client})")
        self.open += 1
        self.per_client[client] += 1
        return None

    def release(self, client: str) -> None:
        self.open -= 1
        self.per_client[client] -= 1
        if self.per_client[client] <= 0:
            del self.per_client[client]


def error_response(status: int, reason: str, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response carrying the daemon's error JSON, written straight to a socket."""
    body = json.dumps({"type": "error", "code": code, "message": message}).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            f"connection: close\r\n\r\n")
    return head.encode("ascii") + body


def raise_open_file_limit(max_connections: int) -> tuple[int, int] | None:
    """Raise the soft limit on open files towards the hard one, so that ``max_connections`` can be reached.

    macOS starts programs at 256 and many Linux shells at 1024; past it ``accept`` fails with "Too many open
    files", and so does opening a model. The hard limit is the system's to set; this only claims what it allows,
    and warns when that is too few. Returns the (old, new) soft limits; None where nothing changed or there is
    no such limit (Windows)."""
    try:
        import resource
    except ImportError:  # Windows: no per-process descriptor limit of this kind
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = max_connections + FILES_BESIDE_CONNECTIONS
    target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
    changed = None
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            changed, soft = (soft, target), target
        except (ValueError, OSError) as exc:  # macOS refuses more than OPEN_MAX whatever the hard limit says
            log.debug("could not raise the open-file limit from %d to %d: %s", soft, target, exc)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("the open-file limit is %d: with max_connections %d the daemon may run out of descriptors "
                    "(\"Too many open files\"); raise it (ulimit -n %d) or lower max_connections", soft,
                    max_connections, needed)
    return changed


def _supported() -> bool:
    needed = ("connection_made", "connection_lost", "data_received", "on_response_complete",
              "handle_websocket_upgrade")
    return H11Protocol is not object and all(hasattr(H11Protocol, name) for name in needed)


def guarded_protocol(guard: ConnectionGuard) -> type[asyncio.Protocol] | None:
    """uvicorn's h11 protocol bounded by ``guard``; None where this uvicorn's protocol is not the one known."""
    if not _supported():
        log.warning("this uvicorn's HTTP protocol is not the one sdbridge knows; slow or surplus HTTP connections "
                    "are not bounded")
        return None
    return type("GuardedH11Protocol", (_GuardedH11Protocol,), {"guard": guard})


class _GuardedH11Protocol(H11Protocol):  # type: ignore[misc,valid-type]
    guard: ConnectionGuard

    _client_key = ""
    _head_started = False  # bytes of a request head came since the connection or the last response
    _counted = False
    _refused = False
    _lingering = False
    _timer: asyncio.TimerHandle | None = None

    # -- connection ------------------------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        peer = transport.get_extra_info("peername")
        self._client_key = str(peer[0]) if isinstance(peer, tuple) and peer else "unix"
        reason = self.guard.admit(self._client_key)
        if reason is not None:
            self._refuse(transport, reason)
            return
        self._counted = True
        super().connection_made(transport)
        self._arm(self.guard.limits.head_timeout_s, self._head_timed_out)

    def _refuse(self, transport: asyncio.Transport, reason: str) -> None:
        """Answer 503 without reading the request, and close once the client has had time to read it (closing
        with its request unread would reset the connection and lose the answer)."""
        self._refused = True
        self.transport = transport
        self.guard.refused += 1
        self.guard.problems.log("refused a connection from %s: %s", self._client_key, reason)
        if self.guard.lingering >= MAX_LINGERING:  # a flood: no descriptor to spare for each one's answer
            transport.abort()
            return
        self.guard.lingering += 1
        self._lingering = True
        transport.write(error_response(503, "Service Unavailable", "too_many_connections",
                                       f"connection refused: {reason}; close some connections and try again"))
        if transport.can_write_eof():
            transport.write_eof()
        self.loop.call_later(REFUSED_LINGER_S, transport.close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._refused:
            if self._lingering:
                self._lingering = False
                self.guard.lingering -= 1
            return
        if self._counted:
            self._counted = False
            self.guard.release(self._client_key)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # the request is not read: the 503 already went
        super().data_received(data)
        if self._in_flight():
            self._watch_body()  # bytes came: a new stall window
        else:  # part of a head: its deadline runs on from the connection or the last response
            self._head_started = True

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request at once
        if self.transport.is_closing():
            self._disarm()
        elif self._in_flight():
            self._watch_body()
        else:
            self._head_started = False
            self._arm(self.guard.limits.head_timeout_s, self._head_timed_out)  # the next request's head

    def handle_websocket_upgrade(self, event: Any) -> None:
        # From here the WebSocket protocol owns the transport (its pings find a dead peer); it stays counted
        # until the socket closes, which uvicorn's WebSocket protocol does not tell this one: so watch for it.
        self._disarm()
        super().handle_websocket_upgrade(event)
        if self._counted:
            self._counted = False
            self._watch_upgraded(self.transport.get_protocol())

    def _watch_upgraded(self, protocol: asyncio.Protocol) -> None:
        guard, client = self.guard, self._client_key
        lost = protocol.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            guard.release(client)
            lost(exc)

        protocol.connection_lost = connection_lost  # type: ignore[method-assign]

    # -- timers ----------------------------------------------------------------------------------------------
    def _in_flight(self) -> bool:
        """A request's head has come and its response is not complete."""
        return self.cycle is not None and not self.cycle.response_complete

    def _watch_body(self) -> None:
        cycle = self.cycle
        if cycle.more_body and not cycle.disconnected:
            self._arm(self.guard.limits.body_stall_s, self._body_stalled)
        else:
            self._disarm()

    def _arm(self, delay_s: float, callback: Any) -> None:
        self._disarm()
        self._timer = self.loop.call_later(delay_s, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timed_out(self) -> None:
        self._timer = None
        if self.transport.is_closing() or self._in_flight():
            return  # closed, or a request came in the same turn as the timer
        if not self._head_started:  # idle (kept alive, or opened ahead by a browser): closed without a word
            self.guard.idle_closed += 1
            self.transport.close()
            return
        self.guard.head_timeouts += 1
        limit = self.guard.limits.head_timeout_s
        self.guard.problems.log("closed a connection from %s: no complete request head within %g s",
                                self._client_key, limit)
        self.transport.write(error_response(408, "Request Timeout", "request_timeout",
                                            f"no complete request line and headers within {limit:g} s"))
        self.transport.close()

    def _body_stalled(self) -> None:
        self._timer = None
        cycle = self.cycle
        if self.transport.is_closing() or cycle is None or cycle.response_complete or not cycle.more_body:
            return
        if self.flow.read_paused or cycle.waiting_for_100_continue:
            # The daemon is not reading (or has not asked for the body yet): the client waits on us.
            self._arm(self.guard.limits.body_stall_s, self._body_stalled)
            return
        self.guard.body_stalls += 1
        limit = self.guard.limits.body_stall_s
        self.guard.problems.log("closed a connection from %s: its request body sent nothing for %g s",
                                self._client_key, limit)
        self.transport.close()  # the route reads a disconnect and stops
