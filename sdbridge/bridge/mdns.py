"""Announcing the daemon over mDNS (zeroconf), so that OSC controllers on the network find it by name.

Two services, as ossia score and Vezér announce theirs: ``_oscjson._tcp`` (the OSCQuery HTTP port,
which OSCQuery clients browse for) and ``_osc._udp`` (the OSC port itself, which TouchOSC and other
controllers list as a host to send to). An advert names the addresses a peer can reach: the one the
daemon is bound to, or for a wildcard bind each address of this machine's interfaces. Bound to
loopback, the advert goes out on loopback only: announcing 127.0.0.1 to the network would send each
peer to itself.

zeroconf is optional (``pip install "sdbridge[mdns]"``); :func:`advert_addresses` is free of I/O.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import re
import socket
from collections.abc import Iterable
from typing import Any

from sdbridge.bridge.listen import is_wildcard_host

log = logging.getLogger(__name__)

OSCQUERY_SERVICE = "_oscjson._tcp.local."
OSC_SERVICE = "_osc._udp.local."
REGISTER_TIMEOUT_S = 10.0  # probing and announcing take about 1.5 s; a stuck network must not hold shutdown


def interface_addresses() -> list[str]:
    """Every IP address of this machine's interfaces (through ifaddr, which zeroconf depends on)."""
    import ifaddr

    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            found.append(ip.ip if isinstance(ip.ip, str) else ip.ip[0])  # IPv6 comes as (address, flow, scope)
    return found


def advert_addresses(host: str, interfaces: Iterable[str]) -> list[str]:
    """The addresses to announce for a server bound to ``host``, given this machine's ``interfaces``.

    A specific address is announced as it is. A wildcard announces every interface address a peer
    elsewhere can use: not loopback, not link-local (a link-local IPv6 address needs a scope the
    record cannot carry), IPv6 only for ``::``. With none of those, loopback.
    """
    bare = host.strip("[]")
    if bare == "localhost":
        return ["127.0.0.1"]
    if not is_wildcard_host(host):
        return [str(ipaddress.ip_address(bare))]
    ipv6 = ":" in bare  # ::, 0:0::0: the IPv6 wildcard, which takes IPv4 peers too
    chosen: list[str] = []
    for text in interfaces:
        try:
            address = ipaddress.ip_address(text.split("%", 1)[0])
        except ValueError:
            continue
        if address.is_loopback or address.is_link_local or address.is_unspecified:
            continue
        if address.version == 6 and not ipv6:
            continue
        if str(address) not in chosen:
            chosen.append(str(address))
    return chosen or ["127.0.0.1"]


def addresses_for(host: str) -> list[str]:
    """:func:`advert_addresses` for this machine: its interfaces are read only for a wildcard bind."""
    return advert_addresses(host, interface_addresses() if is_wildcard_host(host) else ())


def host_label(hostname: str) -> str:
    """A DNS label for this machine: mDNS host names take letters, digits and hyphens."""
    label = re.sub(r"[^A-Za-z0-9-]+", "-", hostname.split(".", 1)[0]).strip("-")
    return label[:63] or "sdbridge"


class MdnsAdvert:
    """The two services, registered on start and withdrawn (with goodbye packets) on close."""

    def __init__(self, host: str, oscquery_port: int, osc_port: int, name: str = "sdbridge") -> None:
        self.addresses = addresses_for(host)
        self.loopback_only = all(ipaddress.ip_address(a).is_loopback for a in self.addresses)
        self.host = host
        label = host_label(socket.gethostname())
        self.instance = f"{name} on {label}"
        # A host name of this daemon's own: its address records are the addresses it serves. Two daemons on one
        # machine under one name would merge them, and a loopback-only one would be announced on the LAN's.
        self.server = f"{label[:57]}-{oscquery_port}.local."
        self.ports = {OSCQUERY_SERVICE: oscquery_port, OSC_SERVICE: osc_port}
        self._zeroconf: Any = None
        self._task: asyncio.Task[None] | None = None

    def infos(self) -> list[Any]:
        from zeroconf import ServiceInfo

        return [ServiceInfo(kind, f"{self.instance}.{kind}", port=port, parsed_addresses=self.addresses,
                            server=self.server, properties={"txtvers": "1"})
                for kind, port in self.ports.items()]

    async def start(self) -> None:
        """Begin announcing; the probing runs in the background so that start-up does not wait for it."""
        from zeroconf import InterfaceChoice, IPVersion
        from zeroconf.asyncio import AsyncZeroconf

        six = any(ipaddress.ip_address(a).version == 6 for a in self.addresses)
        interfaces: Any = InterfaceChoice.All if is_wildcard_host(self.host) else self.addresses
        self._zeroconf = AsyncZeroconf(interfaces=interfaces, ip_version=IPVersion.All if six else IPVersion.V4Only)
        self._task = asyncio.create_task(self._register(), name="sdbridge-mdns")

    async def _register(self) -> None:
        try:
            # Both probed at once. A second daemon on this machine gets a new name rather than a conflict.
            infos = self.infos()
            waiting = [await self._zeroconf.async_register_service(info, allow_name_change=True) for info in infos]
            await asyncio.wait_for(asyncio.gather(*waiting), REGISTER_TIMEOUT_S)
        except Exception as exc:  # a network without multicast must not stop the daemon
            log.warning("mDNS: could not announce %s: %s", self.instance, exc)
            return
        where = "loopback only" if self.loopback_only else ", ".join(self.addresses)
        self.instance = infos[0].name.removesuffix("." + OSCQUERY_SERVICE)  # renamed if another had the name
        log.info("mDNS: announced %r (OSCQuery tcp %d, OSC udp %d) on %s", self.instance,
                 self.ports[OSCQUERY_SERVICE], self.ports[OSC_SERVICE], where)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._zeroconf is not None:
            try:
                await asyncio.wait_for(self._zeroconf.async_unregister_all_services(), REGISTER_TIMEOUT_S)
            except Exception as exc:
                log.debug("mDNS: goodbye not sent: %s", exc)
            await self._zeroconf.async_close()
            self._zeroconf = None
