"""Hostile WebSocket traffic: 100,000 malformed messages, each answered, the session unharmed."""

from __future__ import annotations

import asyncio
import json
import random

from websockets.asyncio.client import connect

from sdbridge.bridge import codec
from sdbridge.bridge.protocol import HEADER_SIZE, PixelFormat
from tests.clients import header_frame, make_image

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
