"""A1111 request bodies: read and parsed off the event loop, and bounded (QA 9, finding 4)."""

from __future__ import annotations

import base64
import json
import socket
import threading
import time

import httpx
import numpy as np
import pytest

from sdbridge.bridge import a1111_body
from tests.clients import recv_json, ws_connect


def big_body(field: str, images: int, megabytes: int) -> bytes:
    """A JSON body whose ``field`` holds ``images`` strings of ``megabytes`` of valid base64 (random bytes, no
    image), encoded once here, so that the client (in this process, beside the daemon) holds the GIL as little as
    it can while it sends."""
    rng = np.random.default_rng(0)
    data = [base64.b64encode(rng.integers(0, 256, megabytes * 3 // 4 * 2**20, dtype=np.uint8).tobytes()).decode()
            for _ in range(images)]
    return json.dumps({field: data if field == "init_images" else data[0], "prompt": "a \"cat\", caf\u00e9"}).encode()


class Pinger(threading.Thread):
    """A WebSocket client pinging the daemon back to back, recording each round trip."""

    def __init__(self, daemon: object) -> None:
        super().__init__(daemon=True)
        self.ws = ws_connect(daemon)
        recv_json(self.ws, "hello")
        self.round_trips_s: list[tuple[float, float]] = []  # (sent at, round trip)
        self.stop = threading.Event()

    def run(self) -> None:
        ping = 0
        while not self.stop.is_set():
            ping += 1
            sent = time.perf_counter()
            self.ws.send(json.dumps({"type": "ping", "id": ping}))
            while recv_json(self.ws, "pong", timeout=60).get("id") != ping:
                pass
            self.round_trips_s.append((sent, time.perf_counter() - sent))
            time.sleep(0.01)
        self.ws.close()

    def worst_s(self, since: float, until: float) -> float:
        return max(rtt for sent, rtt in self.round_trips_s if since <= sent + rtt and sent <= until)


# The QA's 4K PNG (a 33 MB body), and a batch of eight such images to img2img (96 MB).
@pytest.mark.parametrize("path, field, images, megabytes", [("/sdapi/v1/png-info", "image", 1, 33),
                                                             ("/sdapi/v1/img2img", "init_images", 8, 12)])
def test_a_big_body_is_parsed_while_websocket_pings_keep_answering(start_daemon, path, field, images, megabytes):
    daemon = start_daemon(params={"engine": "identity", "width": 64, "height": 64})
    body = big_body(field, images, megabytes)
    pinger = Pinger(daemon)
    pinger.start()
    try:
        time.sleep(1.0)
        baseline_s = max(rtt for _, rtt in pinger.round_trips_s)
        with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=120) as http:
            started = time.perf_counter()
            response = http.post(path, content=body, headers={"content-type": "application/json"})
            ended = time.perf_counter()
        time.sleep(0.3)
    finally:
        pinger.stop.set()
        pinger.join(60)
    # Valid JSON and valid base64, but no image: the route read it and answered (422, or 503 without a model).
    assert response.status_code in (422, 503), response.text
    worst_s = pinger.worst_s(started, ended)
    print(f"{path}: {len(body) / 2**20:.0f} MB body answered in {ended - started:.2f} s; ping baseline "
          f"{baseline_s * 1000:.0f} ms, worst while posting {worst_s * 1000:.0f} ms")
    # Measured here (2 cores): 35-140 ms, against 170-940 ms with the body parsed on the loop (the QA, on a loaded
    # box: 1-2.5 s). The bound is 10x the measure, for a shared CI machine: it catches a loop frozen for seconds,
    # not the old code on an idle machine (the figures are in the commit that made the parse off the loop).
    assert worst_s < 1.5, f"a ping waited {worst_s:.2f} s while a {len(body)} byte body was parsed"


def test_a_body_declared_past_the_limit_is_a_413_before_it_is_read(start_daemon):
    daemon = start_daemon(params={"engine": "identity"})
    declared = a1111_body.MAX_BODY_BYTES + 1
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=30) as sock:
        sock.sendall(f"POST /sdapi/v1/img2img HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {declared}\r\n\r\n{{\"init_images\": [\"".encode())
        response = b""
        while b"\r\n\r\n" not in response or not response.endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), response[:200]
    detail = f"request body of {declared} bytes is too large (at most {a1111_body.MAX_BODY_BYTES})"
    # A1111's error shape (its api_middleware): the exception's type, detail, body and errors.
    assert json.loads(body) == {"error": "HTTPException", "detail": detail, "body": "", "errors": f"413: {detail}"}


def test_a_streamed_body_past_the_limit_is_a_413_and_the_next_request_is_served(start_daemon, monkeypatch):
    monkeypatch.setattr(a1111_body, "MAX_BODY_BYTES", 4 * 2**20, raising=False)  # 256 MiB in the daemon
    daemon = start_daemon(params={"engine": "identity"})

    def chunks():  # no Content-Length: chunked, counted as it comes
        yield b'{"image": "'
        for _ in range(8):
            yield b"A" * 2**20
        yield b'"}'

    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", timeout=60) as http:
        response = http.post("/sdapi/v1/png-info", content=chunks(), headers={"content-type": "application/json"})
        assert response.status_code == 413, response.text
        assert response.json()["detail"] == (f"request body of more than {4 * 2**20} bytes is too large (at most "
                                             f"{4 * 2**20})")
        # Under the limit, the same route answers as before: the body parsed, its error a 422 naming the field.
        small = http.post("/sdapi/v1/png-info", json={"image": "not base64!"})
        assert small.status_code == 422 and small.json() == {
            "error": "HTTPException", "detail": "image: not valid base64", "body": "",
            "errors": "422: image: not valid base64"}
        missing = http.post("/sdapi/v1/png-info", json={})
        assert missing.status_code == 422 and missing.json()["detail"][0]["loc"] == ["body", "image"]
        broken = http.post("/sdapi/v1/png-info", content=b'{"image": "AAAA"',
                           headers={"content-type": "application/json"})
        assert broken.status_code == 422 and broken.json()["detail"][0]["type"] == "json_invalid"
        # Within the body's limit, but too many values: refused before they are parsed (QA 53 F1)
        numbers = json.dumps({"prompt": "x", "unread": [0] * 600_000}).encode()
        fields = http.post("/sdapi/v1/txt2img", content=numbers)
        assert fields.status_code == 413 and fields.json()["detail"].startswith(
            f"the request's JSON has {numbers.count(b',') + numbers.count(b':')} commas and colons, more than")
