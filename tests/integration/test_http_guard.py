"""The main port's connection bounds on a real daemon with real sockets: a slow head gets 408, a stalled body is
cut, one address cannot hold every socket (bridge/http_guard.py), and none of it touches a well-behaved client."""

from __future__ import annotations

import json
import socket
import time

import httpx
import pytest
from websockets.sync.client import connect

from tests.clients import wait_for

HEAD_S = 0.5
STALL_S = 0.5


@pytest.fixture
def daemon(start_daemon):
    return start_daemon(params={"engine": "identity"}, http_head_timeout_s=HEAD_S, http_body_stall_s=STALL_S,
                        max_connections_per_client=6)


def open_socket(port: int) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    return sock


def read_all(sock: socket.socket) -> bytes:
    """Everything until the daemon closes (a timeout here fails the test: the daemon did not close)."""
    chunks = []
    while chunk := sock.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def error_of(response: bytes) -> tuple[int, dict]:
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def kept_alive(port: int) -> socket.socket:
    """A connection that has had one answer and stays open (HTTP/1.1 keeps it alive)."""
    sock = open_socket(port)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    first = b""
    while b"}" not in first:
        first += sock.recv(65536)
    assert first.startswith(b"HTTP/1.1 200")
    return sock


def http_stats(port: int) -> dict:
    return httpx.get(f"http://127.0.0.1:{port}/stats", trust_env=False, timeout=10).json()["http"]


def test_a_head_that_never_ends_gets_408_and_the_socket_back(daemon):
    slow = [open_socket(daemon.port) for _ in range(4)]
    for sock in slow:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # no blank line: the head never ends
    started = time.monotonic()
    answers = [read_all(sock) for sock in slow]
    assert time.monotonic() - started < HEAD_S * 10 + 5
    for answer in answers:
        status, body = error_of(answer)
        assert status == 408 and body["code"] == "request_timeout"
        assert "within 0.5 s" in body["message"]
    stats = http_stats(daemon.port)
    assert stats["guarded"] is True
    assert stats["head_timeouts"] == 4
    assert stats["open_connections"] <= 2  # the /stats request's own (and perhaps its keep-alive)


def test_a_byte_at_a_time_does_not_stretch_the_head_deadline(daemon):
    sock = open_socket(daemon.port)
    started = time.monotonic()
    sock.settimeout(0.1)
    answer = b""
    for byte in b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"a" * 100:
        try:
            sock.sendall(bytes([byte]))
            answer += sock.recv(65536)
        except TimeoutError:
            continue
        except (BrokenPipeError, ConnectionResetError):
            break
        if answer.endswith(b"}"):
            break
    assert error_of(answer)[0] == 408
    assert time.monotonic() - started < HEAD_S * 10


def test_the_next_head_on_a_kept_alive_connection_is_timed_too(daemon):
    sock = kept_alive(daemon.port)
    sock.sendall(b"GET /health HTTP/1.1\r\n")  # the second request's head never ends
    status, body = error_of(read_all(sock))
    assert status == 408 and body["code"] == "request_timeout"


def test_a_stalled_body_is_cut_and_a_slow_steady_one_is_not(daemon):
    stalled = open_socket(daemon.port)
    stalled.sendall(b"POST /params HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                    b"content-length: 40\r\n\r\n{\"strength\"")
    started = time.monotonic()
    assert read_all(stalled) == b""  # cut without an answer: the route saw a disconnect
    assert time.monotonic() - started < STALL_S * 10 + 5

    body = b'{"strength": 0.25}'
    steady = open_socket(daemon.port)
    steady.sendall(b"POST /params HTTP/1.1\r\nHost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                   b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
    for start in range(0, len(body), 6):  # a piece every 0.2 s: slower in all than the stall limit, never idle
        steady.sendall(body[start:start + 6])
        time.sleep(0.2)
    answer = read_all(steady)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["values"]["strength"] == 0.25
    assert http_stats(daemon.port)["body_stalls"] == 1


def test_one_address_cannot_hold_every_socket_and_websockets_count(daemon):
    url = f"ws://127.0.0.1:{daemon.port}/ws"
    sockets = [connect(url, open_timeout=10) for _ in range(5)]
    try:
        stats = http_stats(daemon.port)
        assert stats["open_connections"] >= 5
        extra = open_socket(daemon.port)  # the sixth: at the limit of 6 with the /stats connection gone
        held = [open_socket(daemon.port) for _ in range(2)]
        refused = held[-1]
        refused.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, body = error_of(read_all(refused))
        assert status == 503 and body["code"] == "too_many_connections"
        assert "127.0.0.1 holds 6 connections" in body["message"] and "max_connections_per_client 6" in body["message"]
        for sock in (extra, *held):
            sock.close()
        # Every WebSocket still works beside the refusal.
        for n, ws in enumerate(sockets):
            ws.send(json.dumps({"type": "ping", "t": n}))
            while (message := json.loads(ws.recv(timeout=10)))["type"] != "pong":
                pass
            assert message["t"] == n
    finally:
        for ws in sockets:
            ws.close()
    deadline = time.monotonic() + 10
    while (stats := http_stats(daemon.port))["open_connections"] > 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert stats["open_connections"] <= 2, stats  # the closed WebSockets gave their places back
    assert stats["refused_connections"] >= 1


def test_an_idle_kept_alive_connection_is_closed_without_an_unasked_for_408(daemon):
    """QA 14: a keep-alive client polling less often than the head timeout read a 408 as the answer to its next
    request. A connection that has sent nothing since its last response is closed without a word, as nginx does."""
    sock = kept_alive(daemon.port)
    assert read_all(sock) == b""  # closed at the head timeout (or uvicorn's keep-alive), nothing written
    fresh = open_socket(daemon.port)
    assert read_all(fresh) == b""  # opened and never used (a browser's preconnect): closed silently too
    assert http_stats(daemon.port)["idle_closed"] >= 1


def test_a_client_connecting_in_a_loop_holds_a_bounded_number_of_refused_sockets(daemon):
    """Each refused connection was held open 1 s for its answer, uncounted: one address connecting in a loop held
    its rate x 1 s sockets until accept() failed for want of descriptors (QA 62 F6). Past MAX_LINGERING a refusal is
    closed at once; the first ones still read their 503."""
    from sdbridge.bridge.http_guard import MAX_LINGERING

    held = [open_socket(daemon.port) for _ in range(6)]       # the address's limit
    refused = [open_socket(daemon.port) for _ in range(MAX_LINGERING + 40)]
    try:
        assert wait_for(lambda: daemon.http_guard.refused >= MAX_LINGERING + 40, timeout=20)
        assert daemon.http_guard.lingering == MAX_LINGERING
        status, body = error_of(read_all(refused[0]))
        assert status == 503 and body["code"] == "too_many_connections"
        try:
            assert read_all(refused[-1]) == b""               # closed at once, nothing written
        except ConnectionResetError:                          # (aborted: a reset)
            pass
    finally:
        for sock in held + refused:
            sock.close()
    assert wait_for(lambda: daemon.http_guard.lingering == 0, timeout=10)
