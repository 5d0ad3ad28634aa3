"""Hostile HTTP bodies (QA 3): each answered with a code and a sentence, no traceback, no unbounded memory or echo."""

from __future__ import annotations

import base64
import logging
import socket
import time

import httpx
import pytest

MAX_JSON_BODY = 256 * 1024  # the limit docs/protocol.md gives for the daemon's own JSON routes
DEEP = "[" * 100_000 + "]" * 100_000


@pytest.fixture
def daemon(start_daemon):
    return start_daemon(params={"engine": "identity"})


@pytest.fixture
def http(daemon):
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", trust_env=False, timeout=30) as client:
        yield client


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [record for record in caplog.records if record.exc_info or record.levelno >= logging.ERROR]


@pytest.mark.parametrize("route", ["/params", "/presets"])
@pytest.mark.parametrize("body, words", [
    pytest.param(DEEP, "nested too deep", id="deep"),
    pytest.param('{"strength": ' + "1" * 5000 + "}",
                 "request body is not JSON: it holds an integer of more than 4300 digits, too long to read",
                 id="long_int"),
    pytest.param(b"\xff\xfe{", "request body is not JSON: not UTF-8", id="not_utf8"),
    pytest.param('{"strength": 0.5,', "request body is not JSON: Expecting property name enclosed in double quotes "
                 "at line 1 column 18", id="truncated"),
])
def test_bodies_that_are_not_json_are_bad_json(http, caplog, route, body, words):
    with caplog.at_level(logging.INFO):
        response = http.post(route, content=body)
    assert response.status_code == 400, response.text
    assert response.json()["code"] == "bad_json" and words in response.json()["message"]
    assert "sys.set_int_max_str_digits" not in response.text  # qa8 #12: Python's own sentence, cut mid-word
    assert not tracebacks(caplog)
    assert http.post("/params", json={"strength": 0.25}).json()["applied"] == {"strength": 0.25}


@pytest.mark.parametrize("route", ["/params", "/presets"])
def test_a_body_over_the_limit_is_413_without_being_read(http, route):
    big = b'{"prompt": "' + b"a" * MAX_JSON_BODY + b'"}'
    response = http.post(route, content=big)  # with a Content-Length
    assert response.status_code == 413
    assert response.json() == {"type": "error", "code": "too_large",
                               "message": f"request body of {len(big)} bytes is too large (at most {MAX_JSON_BODY})"}

    def chunks():  # no Content-Length: counted as it streams in
        for start in range(0, len(big), 64 * 1024):
            yield big[start:start + 64 * 1024]

    streamed = http.post(route, content=chunks())
    assert streamed.status_code == 413 and streamed.json()["code"] == "too_large"
    assert f"more than {MAX_JSON_BODY} bytes" in streamed.json()["message"]
    assert http.post("/params", json={"prompt": "a" * 1000}).status_code == 200  # a normal body still fits


def test_the_a1111_routes_keep_bodies_over_the_limit(http):
    """img2img bodies carry base64 images: the daemon's own limit does not apply to /sdapi."""
    response = http.post("/sdapi/v1/png-info", json={"image": "A" * (2 * MAX_JSON_BODY)})
    assert response.status_code == 422 and "image" in response.json()["detail"]


def test_a_client_gone_mid_body_leaves_no_traceback(daemon, http, caplog):
    with caplog.at_level(logging.DEBUG, logger="sdbridge.bridge.http"), caplog.at_level(logging.INFO):
        for route in ("/params", "/presets"):
            with socket.create_connection(("127.0.0.1", daemon.port)) as sock:
                sock.sendall(f"POST {route} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                             f"Content-Length: 5000\r\n\r\n{{\"strength\"".encode())
                time.sleep(0.2)  # the route is reading the body when the client goes
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not tracebacks(caplog) and sum(
                "disconnected before its body ended" in record.getMessage() for record in caplog.records) < 2:
            time.sleep(0.05)
        assert not tracebacks(caplog), [record.getMessage() for record in tracebacks(caplog)]
    assert http.post("/params", json={"strength": 0.5}).status_code == 200


def test_a1111_422_does_not_echo_a_huge_body(http):
    response = http.post("/sdapi/v1/png-info", json={"image": ["A" * 5_000_000]})
    assert response.status_code == 422
    assert len(response.content) < 2000, len(response.content)
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "image"] and len(error["input"]) <= 200 and error["input"].startswith("['AAA")
    short = http.post("/sdapi/v1/png-info", json={"image": 5})  # a short input is echoed as it was
    assert short.status_code == 422 and short.json()["detail"][0]["input"] == 5


def test_png_info_error_names_no_python_object(http):
    response = http.post("/sdapi/v1/png-info", json={"image": base64.b64encode(b"not an image at all").decode()})
    assert response.status_code == 422
    detail = response.json()["detail"]
    assert "not a readable image (19 bytes)" in detail and "cannot identify image file" in detail
    assert "object at 0x" not in detail and "BytesIO" not in detail


def test_a1111_422_about_a_lone_surrogate_is_encodable(http):
    """pydantic refuses the string; its 422 echoes it, escaped (it was a 500 and a reset connection)."""
    response = http.post("/sdapi/v1/txt2img", content=b'{"prompt": "\\ud800 evil", "\\udcff": 1}',
                         headers={"Content-Type": "application/json"})
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == ["body", "prompt"] and error["input"] == "\\ud800 evil"


@pytest.mark.parametrize("method, path, status, code, words", [
    ("GET", "/nope", 404, "not_found", "no route for GET '/nope'"),
    ("POST", "/health", 405, "method_not_allowed", "POST '/health' is not allowed: this path takes GET"),
    ("DELETE", "/params", 405, "method_not_allowed", "this path takes GET, POST"),
])
def test_an_unknown_route_or_method_gets_the_error_json(http, method, path, status, code, words):
    """qa8 #12: the documented {"type": "error", "code", "message"} (docs/protocol.md, HTTP), not {"detail": ...}."""
    response = http.request(method, path)
    assert response.status_code == status
    body = response.json()
    assert body["type"] == "error" and body["code"] == code and words in body["message"], body
    assert "detail" not in body


def test_the_a1111_and_webrtc_routes_keep_their_own_error_shapes(http):
    assert http.get("/sdapi/v1/nope").json() == {"detail": "Not Found"}  # what AUTOMATIC1111 itself answers
    assert http.get("/controlnet/nope").json() == {"detail": "Not Found"}
    assert http.post("/sdapi/v1/txt2img", json={"steps": 0}).status_code == 422
    assert "detail" in http.post("/sdapi/v1/txt2img", json={"steps": 0}).json()
    whip = http.get("/whip/x")
    assert whip.status_code == 405 and whip.json()["code"] == "method_not_allowed"
