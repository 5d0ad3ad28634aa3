"""ConnectionGuard's counting and the raw error answer, without a server (the daemon's use: test_http_guard in
tests/integration)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from sdbridge.bridge.http_guard import ConnectionGuard, HttpLimits, _supported, error_response


def test_admit_counts_per_address_and_in_all_and_release_gives_places_back():
    guard = ConnectionGuard(HttpLimits(max_connections=3, max_connections_per_client=2))
    assert guard.admit("10.0.0.5") is None and guard.admit("10.0.0.5") is None
    reason = guard.admit("10.0.0.5")
    assert reason is not None and "10.0.0.5 holds 2 connections" in reason and "max_connections_per_client 2" in reason
    assert guard.admit("10.0.0.6") is None
    reason = guard.admit("10.0.0.7")
    assert reason is not None and "holds 3 connections, its limit (max_connections 3)" in reason
    assert guard.open == 3
    guard.release("10.0.0.5")
    assert guard.admit("10.0.0.7") is None  # the place given back is anyone's
    guard.release("10.0.0.6")
    guard.release("10.0.0.7")
    guard.release("10.0.0.5")
    assert guard.open == 0 and not guard.per_client  # no address is remembered once it holds nothing


def test_error_response_is_whole_http_with_the_error_json():
    raw = error_response(408, "Request Timeout", "request_timeout", "no head within 10 s")
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "HTTP/1.1 408 Request Timeout"
    assert f"content-length: {len(body)}" in lines and "connection: close" in lines
    assert json.loads(body) == {"type": "error", "code": "request_timeout", "message": "no head within 10 s"}


def test_the_installed_uvicorn_has_the_protocol_the_guard_extends():
    # If this fails, uvicorn moved what http_guard subclasses: the daemon still starts, unguarded (/stats says so).
    assert _supported()


def test_a_uvicorn_without_the_h11_module_leaves_the_daemon_importable_and_unguarded():
    # Where uvicorn has moved h11_impl, importing the daemon must not fail: it runs uvicorn's protocol, unbounded.
    script = textwrap.dedent("""
        import sys
        class Moved:
            def find_spec(self, name, path=None, target=None):
                if name == "uvicorn.protocols.http.h11_impl":
                    raise ModuleNotFoundError(name)
        sys.meta_path.insert(0, Moved())
        import sdbridge.bridge.server
        from sdbridge.bridge.http_guard import ConnectionGuard, HttpLimits, guarded_protocol
        print(guarded_protocol(ConnectionGuard(HttpLimits())))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"
    assert "slow or surplus HTTP connections are not bounded" in result.stderr


def test_the_open_file_limit_is_raised_towards_the_hard_one_in_a_process_started_low():
    resource = pytest.importorskip("resource")  # not on Windows
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 300:
        pytest.skip(f"the hard open-file limit here is {hard}")
    script = textwrap.dedent("""
        import json, resource
        from sdbridge.bridge.http_guard import FILES_BESIDE_CONNECTIONS, raise_open_file_limit
        changed = raise_open_file_limit(100)
        print(json.dumps([changed, resource.getrlimit(resource.RLIMIT_NOFILE)[0], FILES_BESIDE_CONNECTIONS]))
    """)
    # A child started at 256, as macOS starts programs.
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True,
                            preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard)))
    changed, soft, beside = json.loads(result.stdout.strip().splitlines()[-1])
    wanted = 100 + beside if hard == resource.RLIM_INFINITY else min(100 + beside, hard)
    assert changed == [256, wanted] and soft == wanted
