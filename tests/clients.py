"""Real clients for the tests: a websockets client, an OSC client, a UDP receiver."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import numpy as np
from websockets.sync.client import ClientConnection, connect

from sdbridge.bridge.protocol import FrameHeader, PixelFormat


def ws_connect(daemon: Any, query: str = "", **kwargs: Any) -> ClientConnection:
    # compression=None: the daemon turns permessage-deflate off; proxy=None: loopback only.
    return connect(f"ws://127.0.0.1:{daemon.port}/ws{query}", compression=None, proxy=None, max_size=None,
                   open_timeout=10, **kwargs)


def recv_frame(ws: ClientConnection, timeout: float = 30.0) -> bytes:
    """The next binary message, skipping JSON (hello, stats...)."""
    deadline = time.monotonic() + timeout
    while True:
        message = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(message, bytes):
            return message


def recv_json(ws: ClientConnection, kind: str, timeout: float = 10.0) -> dict[str, Any]:
    """The next JSON message of type ``kind``, skipping frames and other messages."""
    deadline = time.monotonic() + timeout
    while True:
        message = ws.recv(timeout=max(0.01, deadline - time.monotonic()))
        if isinstance(message, str):
            data = json.loads(message)
            if data.get("type") == kind:
                return data


def make_image(width: int = 64, height: int = 64, seed: int = 0) -> np.ndarray:
    """A smooth gradient with a little noise: JPEG-friendly and different per seed."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    image = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1),
                      np.full_like(x, (seed * 37) % 256)], axis=-1).astype(np.int16)
    image += rng.integers(-8, 8, image.shape, dtype=np.int16)
    return np.clip(image, 0, 255).astype(np.uint8)


def header_frame(payload: bytes, fmt: PixelFormat, width: int, height: int, frame_id: int = 1,
                 client_ts_us: int = 0, reply: PixelFormat = PixelFormat.JPEG, bottom_up: bool = False,
                 channel: int = 0) -> bytes:
    header = FrameHeader(version=1, pixel_format=fmt, flags=1 if bottom_up else 0, channel=channel,
                         reply_format=reply, frame_id=frame_id, client_ts_us=client_ts_us, width=width,
                         height=height, payload_length=len(payload))
    return header.serialize() + payload


class UdpReceiver:
    """A plain UDP socket standing in for a controller that listens for OSC feedback."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]

    def datagrams(self, duration_s: float) -> list[bytes]:
        """Every datagram that came within ``duration_s``, as sent."""
        out: list[bytes] = []
        deadline = time.monotonic() + duration_s
        while (left := deadline - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                out.append(self.sock.recvfrom(65536)[0])
            except (TimeoutError, socket.timeout):
                break
        return out

    def messages(self, duration_s: float) -> list[tuple[str, list[Any]]]:
        from pythonosc.osc_packet import OscPacket

        return [(item.message.address, list(item.message.params))
                for data in self.datagrams(duration_s) for item in OscPacket(data).messages]

    def close(self) -> None:
        self.sock.close()


class StalledViewer:
    """A WebSocket client that completes the handshake and then never reads again.

    Written by hand on a raw socket with a small receive buffer, because a library client reads
    in the background and would hide the stall.
    """

    def __init__(self, port: int, query: str = "") -> None:
        import base64
        import os

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        request = (f"GET /ws{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n")
        self.sock.sendall(request.encode())
        response = b""
        while b"\r\n\r\n" not in response:
            chunk = self.sock.recv(1)
            if not chunk:
                raise ConnectionError("handshake closed")
            response += chunk
        if b" 101 " not in response.split(b"\r\n", 1)[0]:
            raise ConnectionError(response.decode(errors="replace"))

    def close(self) -> None:
        self.sock.close()


def rgb_frame(image: np.ndarray, channel: int = 0, frame_id: int = 1) -> bytes:
    """A raw RGB frame with the v1 header, asking for a raw RGB reply; ``channel`` > 0 makes it a condition frame."""
    height, width = image.shape[:2]
    return header_frame(image.tobytes(), PixelFormat.RGB8, width, height, frame_id=frame_id,
                        reply=PixelFormat.RGB8, channel=channel)


def reply_image(message: bytes) -> np.ndarray:
    """A raw RGB reply's pixels, uint8 [H, W, 3]."""
    header, payload = FrameHeader.parse(message)
    return np.frombuffer(payload, np.uint8).reshape(header.height, header.width, 3)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A port free on 127.0.0.1 now (TCP by default, UDP with SOCK_DGRAM)."""
    with socket.socket(socket.AF_INET, kind) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
