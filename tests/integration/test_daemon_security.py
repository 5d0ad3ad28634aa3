"""Who may connect: Origin and Host checks, and the token beyond loopback."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from tests.clients import recv_json, ws_connect


def test_foreign_origin_websocket_refused_own_page_allowed(start_daemon):
    daemon = start_daemon(params={"engine": "identity"})
    with pytest.raises(InvalidStatus) as info:
        ws_connect(daemon, origin="https://evil.example")
    assert info.value.response.status_code == 403
    with ws_connect(daemon, origin=f"http://127.0.0.1:{daemon.port}") as ws:
        assert recv_json(ws, "hello")
    with ws_connect(daemon) as ws:  # native clients send no Origin
        assert recv_json(ws, "hello")
    assert daemon.collect_stats()["refused_requests"] >= 1


def test_a_refusal_flood_logs_the_first_then_a_summary(start_daemon, caplog):
    """A scanner refused in a loop must not fill the log: each refusal answered, the first logged in full."""
    import logging

    daemon = start_daemon(params={"engine": "identity"})
    with caplog.at_level(logging.INFO, logger="sdbridge.bridge.security"), httpx.Client(trust_env=False) as http:
        for _ in range(60):
            response = http.get(f"http://127.0.0.1:{daemon.port}/params", headers={"Host": "attacker.example"})
            assert response.status_code == 403
    lines = [r.getMessage() for r in caplog.records if r.name == "sdbridge.bridge.security"]
    assert "attacker.example" in lines[0], lines
    assert len(lines) <= 3 and all("more refused requests not logged (forbidden +" in line for line in lines[1:])
    assert daemon.collect_stats()["refused_requests"] == 60


def test_dns_rebinding_host_refused(start_daemon):
    daemon = start_daemon(params={"engine": "identity"})
    with httpx.Client(trust_env=False) as http:
        response = http.get(f"http://127.0.0.1:{daemon.port}/params", headers={"Host": "attacker.example"})
        assert response.status_code == 403 and response.json()["code"] == "forbidden"
        assert http.get(f"http://127.0.0.1:{daemon.port}/params").status_code == 200


def test_token_required_when_configured(start_daemon):
    token = "a-long-stage-token-0123456789"
    daemon = start_daemon(params={"engine": "identity"}, token=token)
    base = f"http://127.0.0.1:{daemon.port}"
    with httpx.Client(base_url=base, trust_env=False) as http:
        refused = http.get("/health")
        assert refused.status_code == 401 and "www-authenticate" in refused.headers
        assert http.get("/health", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        basic = base64.b64encode(f"user:{token}".encode()).decode()
        assert http.get("/health", headers={"Authorization": f"Basic {basic}"}).status_code == 200
        assert http.get("/health", headers={"Authorization": "Bearer wrong-token-here"}).status_code == 401
    with pytest.raises(InvalidStatus):
        ws_connect(daemon)
    with ws_connect(daemon, f"?token={token}") as ws:
        assert recv_json(ws, "hello")


@pytest.mark.parametrize("name", ["../../etc", "bad/name", "x" * 65, ".", ".."])
def test_bad_session_name_is_refused_with_a_code_and_a_sentence(start_daemon, name):
    """The same JSON body as the access checks' 403, not a bare status with an empty body."""
    daemon = start_daemon(params={"engine": "identity"})
    with pytest.raises(InvalidStatus) as info:
        ws_connect(daemon, f"?session={name}")
    response = info.value.response
    assert response.status_code == 403 and response.headers["Content-Type"] == "application/json"
    body = json.loads(response.body)
    assert body["type"] == "error" and body["code"] == "bad_session"
    assert "must be 1-64 of A-Z a-z 0-9 _ . -, not . or .." in body["message"] and name[:40] in body["message"]
    with ws_connect(daemon, "?session=good_name-1.2") as ws:  # a good name still opens its session
        assert recv_json(ws, "hello")["session"] == "good_name-1.2"


def test_a_session_name_with_a_trailing_newline_is_refused(start_daemon):
    """'^...$' lets "name\n" through re.match; the name is matched whole."""
    daemon = start_daemon(params={"engine": "identity"})
    with pytest.raises(InvalidStatus) as info:
        ws_connect(daemon, "?session=stage%0A")
    assert info.value.response.status_code == 403 and json.loads(info.value.response.body)["code"] == "bad_session"


def test_a_rebinding_page_is_not_asked_to_sign_in_and_the_token_stays_out_of_the_log(start_daemon, caplog):
    """QA 34, on a wildcard bind with a token (any Host passes there): a DNS-rebinding page's requests reached the
    token check, whose Basic challenge made the browser show "Sign in to evil.test", and a token typed there gave
    the page the daemon. Only a request a person made (an address typed) or a native client's is challenged.
    And uvicorn logged every ``?token=`` WebSocket connect, the daemon's own page's too, token and all."""
    import logging

    token = "a-long-stage-token-0123456789"
    daemon = start_daemon(params={"engine": "identity"}, host="0.0.0.0", token=token)
    base = f"http://127.0.0.1:{daemon.port}"
    rebound = {"Host": f"evil.test:{daemon.port}"}
    with httpx.Client(base_url=base, trust_env=False) as http:
        for page in ({"Origin": f"http://evil.test:{daemon.port}", "Sec-Fetch-Site": "same-origin"},
                     {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "navigate"}):  # its fetch; its reload
            refused = http.get("/params", headers={**rebound, **page})
            assert refused.status_code == 401 and "www-authenticate" not in refused.headers, page
        typed = http.get("/docs", headers={"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate"})
        assert typed.status_code == 401 and typed.headers["www-authenticate"] == 'Basic realm="sdbridge"'
        assert "www-authenticate" in http.get("/health").headers  # a native client (an A1111 script)
    with caplog.at_level(logging.INFO, logger="uvicorn.error"):
        with ws_connect(daemon, query=f"?token={token}") as ws:
            assert recv_json(ws, "hello")
        with ws_connect(daemon, query=f"?x=1&tok%65n={token}") as ws:  # the name percent-encoded is read too (QA 36)
            assert recv_json(ws, "hello")
    logged = "\n".join(record.getMessage() for record in caplog.records)
    assert "WebSocket /ws?token=[redacted]" in logged and "/ws?x=1&tok%65n=[redacted]" in logged
    assert token not in logged


def test_the_daemons_pages_are_not_framed_by_other_sites(start_daemon):
    """QA 34: a site framed the daemon's page unseen, and a click on its bait pressed "start camera"."""
    daemon = start_daemon(params={"engine": "identity"})
    with httpx.Client(base_url=f"http://127.0.0.1:{daemon.port}", trust_env=False) as http:
        for path in ("/", "/webrtc", "/docs"):
            response = http.get(path)
            assert response.status_code == 200
            assert response.headers["content-security-policy"] == "frame-ancestors 'self'", path
    # an origin the artist allowed (a dashboard of their own) may frame them
    dashboard = start_daemon(params={"engine": "identity"}, allowed_origins=["http://dashboard.local:8080/"])
    page = httpx.get(f"http://127.0.0.1:{dashboard.port}/", trust_env=False)
    assert page.headers["content-security-policy"] == "frame-ancestors 'self' http://dashboard.local:8080"
