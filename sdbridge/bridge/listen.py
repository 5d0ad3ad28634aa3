"""How every listener of the daemon binds its address: HTTP and WebSocket, OSC in, OSCQuery, and doctor's check.

The wildcard ``::`` listens on IPv4 and IPv6 alike on every platform, as the docs promise: the system default
is dual-stack on Linux and macOS but IPv6 only on Windows, and asyncio's own servers turn dual-stack off, which
left OSCQuery on ``--host ::`` refusing IPv4 controllers everywhere (QA 44 F14). No asyncio or other heavy import
here: doctor binds through it where the server's imports fail.
"""

from __future__ import annotations

import ipaddress
import socket


def bound_socket(host: str, port: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket of ``kind`` (SOCK_STREAM or SOCK_DGRAM) bound to ``host:port``; port 0 takes a free one.

    TCP takes SO_REUSEADDR on POSIX (a just-stopped daemon's TIME-WAIT connections do not hold the port), not on
    Windows, where it would let a second server take a port in use; UDP has no TIME-WAIT and takes none.

    TCP is made with its protocol named, IPPROTO_TCP: asyncio turns Nagle's algorithm off (TCP_NODELAY) only on a
    connection whose socket says so, and an accepted socket takes the listener's. Made with 0, every keep-alive
    HTTP answer after the first waited 40 ms for the client's delayed ACK between its head and body (QA 53)."""
    address = host.strip("[]")
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, kind, socket.IPPROTO_TCP if kind == socket.SOCK_STREAM else 0)
    try:
        if kind == socket.SOCK_STREAM and hasattr(socket, "SO_REUSEADDR") \
                and not hasattr(socket, "SO_EXCLUSIVEADDRUSE"):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6 and is_wildcard_host(address) and hasattr(socket, "IPV6_V6ONLY"):
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        sock.bind((address, port))
    except BaseException:
        sock.close()
        raise
    return sock


def is_wildcard_host(host: str) -> bool:
    """Whether a bind address is every interface: empty, or an unspecified address however it is written
    (``0.0.0.0``, ``::``, ``[::]``, ``0:0::0``). ``--host [::]`` listens on every interface (bind_socket strips the
    brackets), yet the policy compared the raw string and refused every LAN client 403, token or not (QA 74 F5)."""
    address = host.strip().strip("[]")
    if not address:
        return True
    try:
        return ipaddress.ip_address(address).is_unspecified
    except ValueError:
        return False


def host_port(host: str, port: int) -> str:
    """``host:port`` as URLs and messages write it: an IPv6 address in brackets (``[::]:9000``, not ``:::9000``)."""
    address = host.strip("[]")
    return f"[{address}]:{port}" if ":" in address else f"{address}:{port}"
