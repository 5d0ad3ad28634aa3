"""Hostile WebSocket traffic: 100,000 malformed messages, each answered, the session unharmed."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time

from websockets.asyncio.client import connect

from sdbridge.bridge import codec
from sdbridge.bridge.protocol import HEADER_SIZE, FrameHeader, PixelFormat
from tests.clients import header_frame, make_image, recv_frame, recv_json, ws_connect

COUNT = 100_000


def malformed_corpus() -> list[str | bytes]:
    """Bad JSON, wrong types, unknown keys and types, huge strings; lying headers, bad images, bad sizes."""
    good_raw = header_frame(bytes(8 * 8 * 3), PixelFormat.RGB8, 8, 8)
    jpeg = codec.encode_jpeg(make_image(16, 16), 80)
    return [
        "{not json", "[]", "42", '"text"', "null", '{"type": 5}', '{"type": "dance"}', '{"no_type": 1}',
        '{"type": "set"}', '{"type": "set", "params": []}', '{"type": "set", "params": {"strength": "lots"}}',
        '{"type": "set", "params": {"strength": 9}}', '{"type": "set", "params": {"no_such": 1}}',
        '{"type": "set", "params": {"seed": -1}}', '{"type": "set", "params": {"width": 65}}',
        '{"type": "subscribe", "stats": "yes"}', json.dumps({"type": "set", "params": {"prompt": "x" * 10_000}}),
        good_raw[:HEADER_SIZE] + bytes(10),                    # header lies about its size
        good_raw[:HEADER_SIZE - 4],                            # truncated header
        jpeg[: len(jpeg) // 2],                                # truncated JPEG
        header_frame(bytes(3), PixelFormat.RGB8, 0, 0),        # zero dimensions
        header_frame(bytes(12), PixelFormat.RGB8, 60000, 1),   # huge dimensions
        b"\x00\x01\x02", b"",
    ]


def huge_corpus() -> list[str]:
    """Messages of hundreds of kilobytes: a few hundred of them say as much as thousands (and cost seconds each
    thousand on the loopback)."""
    return ["[" * 100_000, "x" * 300_000]


HUGE_EVERY = 250  # one message in this many is a huge one
WINDOW = 32  # messages in flight; the daemon keeps up to 64 unsent control messages per client


async def hammer(port: int) -> tuple[int, int, bytes]:
    corpus, huge = malformed_corpus(), huge_corpus()
    rng = random.Random(0)
    received = {"errors": 0}
    window = asyncio.Semaphore(WINDOW)
    async with connect(f"ws://127.0.0.1:{port}/ws", compression=None, max_size=None, proxy=None) as ws:
        done = asyncio.Event()

        async def reader() -> None:
            async for message in ws:
                if isinstance(message, str) and json.loads(message).get("type") == "error":
                    received["errors"] += 1
                    window.release()
                    if received["errors"] == COUNT:
                        done.set()

        task = asyncio.create_task(reader())
        for i in range(COUNT):
            await window.acquire()
            await ws.send(rng.choice(huge if i % HUGE_EVERY == 0 else corpus))
        await asyncio.wait_for(done.wait(), timeout=240)
        task.cancel()
    async with connect(f"ws://127.0.0.1:{port}/ws", compression=None, max_size=None, proxy=None) as ws:
        await ws.send(codec.encode_jpeg(make_image(), 90))
        while isinstance(reply := await asyncio.wait_for(ws.recv(), 30), str):
            pass
    return COUNT, received["errors"], reply


def test_hundred_thousand_malformed_messages_each_get_an_error(start_daemon):
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64})
    sent, errors, reply = asyncio.run(hammer(daemon.port))
    assert errors == sent
    assert reply[:3] == b"\xff\xd8\xff"  # the daemon still serves frames
    stats = daemon.collect_stats()
    assert stats["errors_sent"] >= sent


# --- QA 3 findings: each bad message answered, the connection kept, the log bounded ---------------------------


def test_an_error_flood_logs_the_first_error_then_a_summary(start_daemon, caplog):
    """Every bad message is answered, but one client's flood is one log line and a summary, not a line each."""
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64})
    count = 400
    with caplog.at_level(logging.INFO, logger="sdbridge.bridge.websocket"):
        with ws_connect(daemon) as ws:
            recv_json(ws, "hello")
            codes = []
            for start in range(0, count, 20):  # in windows: a client is kept at most 64 unsent messages
                for index in range(start, start + 20):
                    ws.send(b"\x00garbage" if index % 2 else '{"type":"set","params":{"strength":5}}')
                codes += [recv_json(ws, "error")["code"] for _ in range(20)]
        assert codes.count("bad_param") == codes.count("bad_frame") == count // 2  # the client still hears each
        deadline = time.monotonic() + 10

        def client_lines() -> list[str]:
            return [r.getMessage() for r in caplog.records if r.name == "sdbridge.bridge.websocket"
                    and r.getMessage().startswith("client ")]

        while not any("not logged" in line for line in client_lines()) and time.monotonic() < deadline:
            time.sleep(0.05)  # the summary is flushed when the server sees the connection close
    lines = client_lines()
    assert len(lines) == 2, lines
    assert "strength 5" in lines[0] and "(bad_param)" in lines[0]
    assert f"{count - 1} more errors not logged (bad_param +{count // 2 - 1}, bad_frame +{count // 2})" in lines[1]


def test_a_5000_digit_integer_is_bad_json_and_the_connection_stays(start_daemon):
    daemon = start_daemon(params={"engine": "identity"})
    with ws_connect(daemon) as ws:
        recv_json(ws, "hello")
        ws.send('{"type":"ping","id":1,"t":' + "1" * 5000 + "}")
        error = recv_json(ws, "error")
        assert error["code"] == "bad_json" and "integer of more than 4300 digits" in error["message"]
        ws.send('{"type":"ping","id":2,"t":3}')
        assert recv_json(ws, "pong") == {"type": "pong", "t": 3, "id": 2}


def test_non_zero_reserved_header_bytes_are_a_bad_frame(start_daemon):
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64})
    frame = bytearray(header_frame(bytes(8 * 8 * 3), PixelFormat.RGB8, 8, 8, frame_id=42))
    frame[9:12] = b"\xff\xff\xff"
    with ws_connect(daemon) as ws:
        recv_json(ws, "hello")
        ws.send(bytes(frame))
        error = recv_json(ws, "error")
        assert error["code"] == "bad_frame" and error["frame_id"] == 42
        assert "reserved header bytes 9-11 are ff ff ff" in error["message"]
        ws.send(header_frame(bytes(8 * 8 * 3), PixelFormat.RGB8, 8, 8, frame_id=43))
        assert FrameHeader.parse(recv_frame(ws))[0].frame_id == 43  # the same connection still serves frames


def test_an_unknown_header_version_is_a_bad_frame_with_its_frame_id(start_daemon):
    """qa8 #12: every error about a header frame carries its frame_id (docs/protocol.md, "Errors"), this one too."""
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64})
    frame = bytearray(header_frame(bytes(8 * 8 * 3), PixelFormat.RGB8, 8, 8, frame_id=44))
    frame[4] = 2
    with ws_connect(daemon) as ws:
        recv_json(ws, "hello")
        ws.send(bytes(frame))
        error = recv_json(ws, "error")
        assert error["code"] == "bad_frame" and error["frame_id"] == 44
        assert "unsupported version 2 (expected 1)" in error["message"]
        ws.send(bytes(frame[:20]))  # a header cut short, but past its frame_id
        error = recv_json(ws, "error")
        assert error["code"] == "bad_frame" and error["frame_id"] == 44


def test_a_connection_whose_greeting_fails_lets_its_session_go(start_daemon, monkeypatch):
    """The greeting was made after the session opened and before the try that lets it go: an error there (the
    worker clearing prepare_error between its check and its read) left the session open and counted for good
    (QA 62 F7)."""
    from tests.clients import wait_for

    daemon = start_daemon(params={"engine": "identity"})
    describe = daemon.engines.describe
    calls = {"n": 0}

    def failing_once():
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("cleared meanwhile")
        return describe()

    monkeypatch.setattr(daemon.engines, "describe", failing_once)
    try:
        with ws_connect(daemon) as ws:
            ws.recv(timeout=5)
    except Exception:  # closed by the server's error
        pass
    assert wait_for(lambda: len(daemon.registry) == 0 and daemon.stats.connections == 0, timeout=10)
    with ws_connect(daemon) as ws:
        assert recv_json(ws, "hello")["session"]
