"""The C fast path for wsproto's unmasking and server framing gives wsproto's own bytes (QA 35)."""

from __future__ import annotations

import os

import pytest
from wsproto import ConnectionType, WSConnection, frame_protocol
from wsproto.events import AcceptConnection, BytesMessage, Request, TextMessage

from sdbridge.bridge import wsproto_fast

ORIGINAL_PROCESS = frame_protocol.XorMaskerSimple.process
ORIGINAL_SERIALIZE = frame_protocol.FrameProtocol._serialize_frame


@pytest.fixture
def pristine():
    """wsproto's own methods, whatever a daemon started earlier in this process installed, and afterwards wsproto
    as it was before the test (the install is process-wide)."""
    before = (frame_protocol.XorMaskerSimple.process, frame_protocol.FrameProtocol._serialize_frame,
              wsproto_fast._installed)
    frame_protocol.XorMaskerSimple.process = ORIGINAL_PROCESS
    frame_protocol.FrameProtocol._serialize_frame = ORIGINAL_SERIALIZE
    wsproto_fast._installed = False
    yield
    (frame_protocol.XorMaskerSimple.process, frame_protocol.FrameProtocol._serialize_frame,
     wsproto_fast._installed) = before


@pytest.fixture
def installed(pristine):
    assert wsproto_fast.install()
    assert frame_protocol.XorMaskerSimple.process is not ORIGINAL_PROCESS


def connected() -> tuple[WSConnection, WSConnection]:
    client, server = WSConnection(ConnectionType.CLIENT), WSConnection(ConnectionType.SERVER)
    server.receive_data(client.send(Request(host="127.0.0.1", target="/ws")))
    assert isinstance(next(server.events()), Request)
    client.receive_data(server.send(AcceptConnection()))
    assert isinstance(next(client.events()), AcceptConnection)
    return client, server


def received(connection: WSConnection, data: bytes, chunk: int) -> bytes | str:
    """Feed ``data`` in ``chunk``-byte pieces (a socket's reads) and join the message's parts."""
    parts: list = []
    for start in range(0, len(data), chunk):
        connection.receive_data(data[start:start + chunk])
        parts += [event.data for event in connection.events() if isinstance(event, (BytesMessage, TextMessage))]
    return b"".join(parts) if parts and isinstance(parts[0], bytes) else "".join(parts)


@pytest.mark.parametrize("size", [0, 1, 125, 126, 65535, 65536, 1024 * 576 * 4])
def test_a_frame_crosses_both_ways_intact(installed, size):
    payload = os.urandom(size)
    client, server = connected()
    # a client's frame, masked, read in chunks that split the key's cycle
    assert received(server, client.send(BytesMessage(data=payload)), 65536 + 3) == payload
    # the server's, framed by the fast path: what wsproto's own client reads back
    assert received(client, server.send(BytesMessage(data=payload)), 65536) == payload
    text = "é" * (size // 2)
    assert received(server, client.send(TextMessage(data=text)), 4093) == text


@pytest.mark.parametrize("size", [0, 125, 126, 65535, 65536, 300000])
def test_the_server_frames_are_the_bytes_wsproto_writes(pristine, size):
    payload = os.urandom(size)
    _, theirs = connected()
    expected = theirs.send(BytesMessage(data=payload))
    assert wsproto_fast.install()
    _, ours = connected()
    assert ours.send(BytesMessage(data=payload)) == expected
    assert frame_protocol.FrameProtocol._serialize_frame is not ORIGINAL_SERIALIZE


def test_nothing_is_installed_where_the_replacement_differs(pristine, monkeypatch, caplog):
    """A wsproto release whose internals changed keeps its own methods: the install checks first."""
    monkeypatch.setattr(wsproto_fast, "_fast_process", lambda apply_mask: lambda self, data: bytearray(data))
    assert not wsproto_fast.install()
    assert frame_protocol.XorMaskerSimple.process is ORIGINAL_PROCESS
    assert "wsproto fast path not installed" in caplog.text


def test_the_daemon_installs_it(start_daemon, pristine):
    start_daemon(params={"engine": "identity"})
    assert frame_protocol.XorMaskerSimple.process is not ORIGINAL_PROCESS
