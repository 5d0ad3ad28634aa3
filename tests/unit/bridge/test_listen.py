"""bound_socket on real loopback sockets: the wildcard :: takes IPv4 as well on every platform."""

from __future__ import annotations

import socket

import pytest

from sdbridge.bridge.listen import bound_socket


@pytest.mark.parametrize("kind", [socket.SOCK_STREAM, socket.SOCK_DGRAM])
def test_the_ipv6_wildcard_is_dual_stack_whatever_the_system_default(kind):
    """Windows' default is IPv6 only (IPV6_V6ONLY 1), Linux's dual-stack: the option is set, not inherited."""
    with bound_socket("::", 0, kind) as sock:
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        port = sock.getsockname()[1]
        if kind == socket.SOCK_STREAM:
            sock.listen(1)
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                peer, _ = sock.accept()
                peer.close()
        else:
            sock.settimeout(5)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
                sender.sendto(b"ping", ("127.0.0.1", port))
            assert sock.recvfrom(16)[0] == b"ping"


@pytest.mark.parametrize("host", ["127.0.0.1", "::1", "[::1]"])
def test_a_named_address_binds_as_given(host):
    with bound_socket(host, 0) as sock:
        assert sock.getsockname()[0] == host.strip("[]")


def test_a_busy_port_raises_and_closes_its_socket():
    with bound_socket("127.0.0.1", 0) as first:
        first.listen(1)
        with pytest.raises(OSError):
            bound_socket("127.0.0.1", first.getsockname()[1])


def test_a_connection_to_the_daemon_sends_without_nagle(start_daemon):
    """asyncio sets TCP_NODELAY only where the socket names IPPROTO_TCP: the listener made with 0 left Nagle on,
    and every keep-alive HTTP answer after the first waited 40 ms between its head and its body (QA 53)."""
    import httpx

    daemon = start_daemon(params={"engine": "identity"})
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", trust_env=False) as http:
        assert http.get("/health").status_code == 200
        sockets = [connection.transport.get_extra_info("socket")
                   for connection in daemon._server.server_state.connections]
        assert sockets and all(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for sock in sockets)
