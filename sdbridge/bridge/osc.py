"""OSC over UDP on the daemon's event loop: parameters in, feedback and telemetry out.

Our own asyncio datagram protocol around :mod:`sdbridge.bridge.osc_parse` rather than
python-osc's servers, whose dispatcher sleeps until a bundle's time tag (freezing the loop) and
whose parser lets exceptions escape. A bad packet is counted and logged (rate-limited), never fatal.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sdbridge.bridge.osc_parse import OscCall, calls_to_updates, encode_bundles, encode_message, parse_datagram
from sdbridge.errors import ProtocolError, SdbridgeError
from sdbridge.params import ParamStore

log = logging.getLogger(__name__)

LOG_SUMMARY_EVERY_S = 5.0

ErrorHandler = Callable[[SdbridgeError, Any], None]
CommandHandler = Callable[[OscCall, Any], None]


@dataclass
class OscStats:
    datagrams: int = 0
    messages: int = 0
    good: int = 0
    malformed: int = 0
    rejected_source: int = 0
    param_errors: int = 0
    internal_errors: int = 0


class _RateLimitedLog:
    """The first problem is logged in full; then one summary line every few seconds."""

    def __init__(self) -> None:
        self._last = 0.0
        self._suppressed = 0

    def warning(self, message: str, *args: Any) -> None:
        now = time.monotonic()
        if now - self._last >= LOG_SUMMARY_EVERY_S:
            if self._suppressed:
                log.warning("... and %d more OSC problems in the last %.0f s", self._suppressed, now - self._last)
            log.warning(message, *args)
            self._last, self._suppressed = now, 0
        else:
            self._suppressed += 1


class OscServer(asyncio.DatagramProtocol):
    def __init__(self, store: ParamStore, *, prefix: str = "/sd",
                 allowed_sources: Sequence[str] = ("127.0.0.0/8", "::1"),
                 on_error: ErrorHandler | None = None, on_command: CommandHandler | None = None) -> None:
        self.store = store
        self.prefix = prefix
        self.allowed = [ipaddress.ip_network(net, strict=False) for net in allowed_sources]
        self.on_error = on_error
        self.on_command = on_command
        self.stats = OscStats()
        self.transport: asyncio.DatagramTransport | None = None
        self.port: int | None = None
        self._log = _RateLimitedLog()

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=(host.strip("[]"), port))
        self.transport = transport
        self.port = transport.get_extra_info("sockname")[1]

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None

    def _source_allowed(self, address: Any) -> bool:
        try:
            ip = ipaddress.ip_address(address[0].split("%", 1)[0])
        except (ValueError, TypeError, IndexError):
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in self.allowed)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        try:
            self._handle(data, addr)
        except Exception:  # never let one datagram take the loop's protocol down
            self.stats.internal_errors += 1
            log.exception("OSC datagram from %s could not be handled", addr)

    def _handle(self, data: bytes, addr: Any) -> None:
        self.stats.datagrams += 1
        if not self._source_allowed(addr):
            self.stats.rejected_source += 1
            self._log.warning("OSC from %s refused: not in the allowed sources (--osc-allow)", addr)
            return
        try:
            calls = parse_datagram(data)
        except ProtocolError as exc:
            self.stats.malformed += 1
            self._log.warning("OSC from %s: %s", addr, exc)
            self._report(exc, addr)
            return
        self.stats.good += 1
        self.stats.messages += len(calls)
        actions = calls_to_updates(calls, self.store.schema, self.prefix)
        if actions.updates:
            # One update call for the whole datagram: a bundle's values land at the same frame.
            _, errors = self.store.update(actions.updates)
            actions.errors.extend(errors)
        for error in actions.errors:
            self.stats.param_errors += 1
            self._log.warning("OSC from %s: %s", addr, error)
            self._report(error, addr)
        if self.on_command is not None:
            for call in actions.commands:
                self.on_command(call, addr)

    def _report(self, exc: SdbridgeError, addr: Any) -> None:
        if self.on_error is not None:
            self.on_error(exc, addr)

    def error_received(self, exc: Exception) -> None:
        log.debug("OSC socket error: %s", exc)


class OscSender:
    """OSC out to one host:port (feedback and telemetry); never blocks, drops on error."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self.transport: asyncio.DatagramTransport | None = None
        self.sent = 0
        self.dropped = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport, _ = await loop.create_datagram_endpoint(
            asyncio.DatagramProtocol, remote_addr=(self.host.strip("[]"), self.port))

    def _send(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            self.dropped += 1
            return
        try:
            self.transport.sendto(data)
            self.sent += 1
        except OSError:
            self.dropped += 1

    def send(self, address: str, *args: Any) -> None:
        self._send(encode_message(address, *args))

    def send_many(self, messages: Sequence[tuple[str, tuple[Any, ...]]]) -> None:
        for datagram in encode_bundles(messages):
            self._send(datagram)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None
