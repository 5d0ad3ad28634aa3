"""OSC over UDP on the daemon's event loop: parameters in, feedback and telemetry out.

Our own asyncio datagram protocol around :mod:`sdbridge.bridge.osc_parse` rather than
python-osc's servers: their dispatcher sleeps until a bundle's time tag (``strict_timing``
defaults to True, freezing the loop) and their parser lets exceptions escape or hangs on some
malformed packets. Here a bad packet is counted and logged (rate-limited), never fatal, and a
bundle applies at once, in one ``ParamStore.update``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sdbridge.bridge.listen import bound_socket
from sdbridge.bridge.osc_parse import (MAX_DATAGRAM, OscCall, at_address, calls_to_updates, encode_bundles, in_order,
                                       encode_message, outside_prefix, parse_datagram)
from sdbridge.bridge.problem_log import ProblemLog
from sdbridge.errors import ParamError, ProtocolError, SdbridgeError
from sdbridge.params import ParamStore

log = logging.getLogger(__name__)

SEND_BUFFER_LIMIT = 256 * 1024  # bytes queued in the transport before the sender drops instead

ErrorHandler = Callable[[SdbridgeError, Any], None]
CommandHandler = Callable[[OscCall, Any], None]


@dataclass
class OscStats:
    """Counters of OSC in. Every datagram is counted once in datagrams, and once in exactly one
    of good, malformed and rejected_source."""

    datagrams: int = 0
    messages: int = 0  # messages in good datagrams
    good: int = 0
    malformed: int = 0
    rejected_source: int = 0
    param_errors: int = 0
    unknown_address: int = 0  # messages (in good datagrams) to an address outside the prefix: nothing applied
    internal_errors: int = 0


@dataclass
class OscSenderStats:
    sent: int = 0
    dropped: int = 0


_PROBLEM_KINDS = ("malformed", "rejected_source", "param_errors", "unknown_address", "internal_errors")
# Addresses outside the prefix are reported once each (a controller repeats its address at its frame rate); a
# sender spraying new ones stops being told after this many, and is only counted.
MAX_TOLD_ADDRESSES = 256
# The errors of one datagram told one by one (logged, sent to the feedback target and to every WebSocket client);
# the rest are counted and told in one more. A bundle of 1024 refused messages was 1024 of each, 10-20 ms on the
# event loop per datagram, and a flood of them kept every HTTP answer ~300 ms late (QA 53 F7).
MAX_ERRORS_TOLD = 8


class UntoldErrors(ParamError):
    """The one error that counts a datagram's errors past its first MAX_ERRORS_TOLD: a listener that caps what it
    tells still tells this one, or a client would hear 8 refusals and never learn of the rest (QA 58 F2)."""


class OscServer(asyncio.DatagramProtocol):
    """OSC in: parameters under ``prefix``, applied to ``store`` one datagram at a time.

    ``on_error(error, source)`` gets each :class:`ProtocolError` (bad_osc) and :class:`ParamError`;
    ``on_command(call, source)`` each command address (``<prefix>/preset``, ``/get/...``); an address outside
    the prefix is counted in ``unknown_address`` and reported to ``on_error`` once per address. Both run
    on the event loop and must not block. Datagrams from outside ``allowed_sources`` (networks or
    addresses) are counted and dropped unparsed.
    """

    def __init__(self, store: ParamStore, *, prefix: str = "/sd",
                 allowed_sources: Sequence[str] = ("127.0.0.0/8", "::1"),
                 on_error: ErrorHandler | None = None, on_command: CommandHandler | None = None,
                 on_untold_error: ErrorHandler | None = None,
                 apply: Callable[[dict[str, Any]], tuple[dict[str, Any], list]] | None = None) -> None:
        self.store = store
        # How validated updates are applied: the store directly, or the daemon's slew (faders glide).
        self.apply = apply or store.update
        self.prefix = prefix
        self.allowed = [ipaddress.ip_network(net, strict=False) for net in allowed_sources]
        self.on_error = on_error
        self.on_command = on_command
        # An error past a datagram's first MAX_ERRORS_TOLD: counted, not told, but still handed here so that the
        # daemon sends the value that holds back on its address (a fader snaps back: QA 56 F5).
        self.on_untold_error = on_untold_error
        self.stats = OscStats()
        self.transport: asyncio.DatagramTransport | None = None
        self.port: int | None = None
        self._log = ProblemLog(log, "OSC", lambda: {key: getattr(self.stats, key) for key in _PROBLEM_KINDS})
        self._traceback_logged = False
        self._told_addresses: set[str] = set()
        self._errors_told = 0  # in the datagram being handled
        self._errors_untold = 0
        # Windows' asyncio stops reading a UDP socket after a reset (error_received): listen again there.
        self.listen_again_on_reset = sys.platform == "win32"
        self.listened_again = 0
        self._host = ""
        self._listening_again: asyncio.Task | None = None

    async def start(self, host: str, port: int) -> None:
        """Listen on ``host:port`` (UDP); port 0 takes a free one, then ``self.port`` tells it."""
        if self.transport is not None:
            raise RuntimeError(f"OscServer is already listening on port {self.port}")
        loop = asyncio.get_running_loop()
        sock = bound_socket(host, port, socket.SOCK_DGRAM)
        sock.setblocking(False)
        transport, _ = await loop.create_datagram_endpoint(lambda: self, sock=sock)
        self.transport = transport
        self._host = host
        self.port = transport.get_extra_info("sockname")[1]

    def close(self) -> None:
        if self._listening_again is not None:
            self._listening_again.cancel()
            self._listening_again = None
        if self.transport is not None:
            self.transport.close()
            self.transport = None
        self._log.flush()

    def source_allowed(self, source: Any) -> bool:
        try:
            ip = ipaddress.ip_address(source[0].split("%", 1)[0])
        except (ValueError, TypeError, IndexError, AttributeError):
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack socket shows IPv4 senders as ::ffff:a.b.c.d
        return any(ip in network for network in self.allowed)

    # --- the datagram path ------------------------------------------------------------------------

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.stats.datagrams += 1
        classified = False
        try:
            # 1. Who sent it: a refused source is counted, never parsed.
            if not self.source_allowed(addr):
                self.stats.rejected_source += 1
                classified = True
                self._log.warning("OSC from %s refused: not in the allowed sources (--osc-allow)", addr)
                return
            # 2. Parse: all or nothing per datagram.
            try:
                calls = parse_datagram(data)
            except ProtocolError as exc:
                self.stats.malformed += 1
                classified = True
                self._log.warning("OSC from %s: %s", addr, exc)
                self._call(self.on_error, exc, addr)
                return
            self.stats.good += 1
            self.stats.messages += len(calls)
            classified = True
            # 3. Map and apply, in order: the parameters between two commands in one update call, a command (a
            #    preset recall) in its place, all in one transaction, so that a bundle lands in one frame.
            self._errors_told = self._errors_untold = 0
            with self.store.transaction():
                for run in in_order(calls, self.store.schema, self.prefix):
                    self._handle(run, addr)
            if self._errors_untold:
                self._tell(UntoldErrors(f"{self._errors_untold} more refused messages in this datagram; only the "
                                      f"first {MAX_ERRORS_TOLD} are told one by one", code="bad_param"), addr)
        except Exception:  # never let one datagram take the protocol down
            if not classified:
                self.stats.malformed += 1
            self._internal_error(addr)

    def _handle(self, calls: list[OscCall], addr: Any) -> None:
        actions = calls_to_updates(calls, self.store.schema, self.prefix)
        if actions.updates:
            _, errors = self.apply(actions.updates)
            # A rule the store checks (a schedule's spec, an LFO's target) names its address as the parser's do.
            actions.errors.extend(at_address(actions.addresses[error.name], error)
                                  if error.name in actions.addresses else error for error in errors)
        # Report errors and hand on commands. A message outside the prefix is told once per address: a
        # TouchDesigner set up for another prefix would otherwise send into silence (qa8 #6).
        self.stats.unknown_address += len(actions.outside)
        for address in actions.outside:
            if address not in self._told_addresses and len(self._told_addresses) < MAX_TOLD_ADDRESSES:
                self._told_addresses.add(address)
                actions.errors.append(outside_prefix(address, self.prefix))
        for error in actions.errors:
            self.stats.param_errors += error.code != "unknown_address"
            if self._errors_told < MAX_ERRORS_TOLD:
                self._errors_told += 1
                self._tell(error, addr)
            else:
                self._errors_untold += 1
                self._call(self.on_untold_error, error, addr)
        for call in actions.commands:
            self._call(self.on_command, call, addr)

    def _tell(self, error: SdbridgeError, addr: Any) -> None:
        self._log.warning("OSC from %s: %s", addr, error)
        self._call(self.on_error, error, addr)

    def _call(self, handler: Callable[[Any, Any], None] | None, value: Any, addr: Any) -> None:
        """A failing callback is ours to count, and must not stop the others."""
        if handler is None:
            return
        try:
            handler(value, addr)
        except Exception:
            self._internal_error(addr)

    def _internal_error(self, addr: Any) -> None:
        self.stats.internal_errors += 1
        if not self._traceback_logged:
            self._traceback_logged = True
            log.exception("OSC datagram from %s could not be handled (later ones only counted)", addr)
        else:
            self._log.warning("OSC datagram from %s could not be handled (internal error)", addr)

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionResetError) and self.listen_again_on_reset and self.transport is not None:
            # Windows turns the ICMP "port unreachable" that a datagram sent from this socket drew (an /sd/get
            # answer to a sender that has closed its port) into a reset on the next receive, and asyncio's
            # Proactor loop then reads no more (CPython gh-127057): every controller would go unheard until a
            # restart, while WebSocket and HTTP carry on (QA 44 F2).
            if self._listening_again is None:
                # Once a warning: a script that polls /sd/get from a new port each time would repeat it per poll.
                log.log(logging.DEBUG if self.listened_again else logging.WARNING,
                        "OSC port %s was reset (%s): listening on it again (later resets logged at debug level)",
                        self.port, exc)
                self._listening_again = asyncio.get_running_loop().create_task(self._listen_again())
            return
        log.debug("OSC socket error: %s", exc)

    async def _listen_again(self, tries: int = 50) -> None:
        old, self.transport = self.transport, None
        if old is not None:
            old.close()
        error: OSError | None = None
        try:
            for attempt in range(tries):
                await asyncio.sleep(0.02 * attempt)  # the closed socket lets go of the port on the next turn
                try:
                    await self.start(self._host, self.port)
                except OSError as exc:
                    error = exc
                    continue
                self.listened_again += 1
                return
            log.error("OSC could not listen on port %s again: %s; restart the daemon to take OSC", self.port, error)
        finally:
            self._listening_again = None


class OscSender:
    """OSC out to one host:port (feedback and telemetry). Never blocks: drops and counts instead."""

    def __init__(self, host: str, port: int, *, bundles: bool = True) -> None:
        self.host = host
        self.port = port
        self.bundles = bundles
        self.transport: asyncio.DatagramTransport | None = None
        self.stats = OscSenderStats()

    @property
    def sent(self) -> int:
        return self.stats.sent

    @property
    def dropped(self) -> int:
        return self.stats.dropped

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            _SenderProtocol, remote_addr=(self.host.strip("[]"), self.port))

    def _send(self, data: bytes) -> None:
        transport = self.transport
        # asyncio queues what the socket refuses, without bound: a receiver that cannot keep up
        # must cost us datagrams, not memory.
        if transport is None or transport.is_closing() or len(data) > MAX_DATAGRAM \
                or transport.get_write_buffer_size() > SEND_BUFFER_LIMIT:
            self.stats.dropped += 1
            return
        try:
            transport.sendto(data)
            self.stats.sent += 1
        except (OSError, RuntimeError):
            self.stats.dropped += 1

    def send(self, address: str, *args: Any) -> None:
        """One message, as one datagram."""
        self._send(encode_message(address, *args))

    def send_many(self, messages: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
        """Messages as one bundle if they fit one MTU-sized datagram, else as several, in order; one message, or
        any number with ``bundles`` off, as plain messages: receivers that parse no bundles (Arduino's
        OSCMessage, Pd's oscparse, some MIDI-to-OSC bridges) read those (QA 17)."""
        if len(messages) == 1 or not self.bundles:
            for address, args in messages:
                self.send(address, *args)
            return
        for datagram in encode_bundles(messages):
            self._send(datagram)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


class _SenderProtocol(asyncio.DatagramProtocol):
    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable when nothing listens on the feedback port: normal, not worth a warning.
        log.debug("OSC out: %s", exc)
