import base64
import json

import pytest

from sdbridge.bridge.security import AccessPolicy, Refusal
from sdbridge.config import Settings


@pytest.fixture
def loopback() -> AccessPolicy:
    return AccessPolicy(Settings(), port=7860)


def test_native_clients_without_origin_pass(loopback):
    assert loopback.check_host("127.0.0.1:7860") is None
    assert loopback.check_host("localhost:7860") is None
    assert loopback.check_origin(None) is None
    assert loopback.check_token({}, "") is None


def test_dns_rebinding_host_refused(loopback):
    reason = loopback.check_host("evil.example:7860")
    assert reason is not None and "evil.example" in reason


def test_foreign_origin_refused_own_page_allowed(loopback):
    assert loopback.check_origin("http://127.0.0.1:7860") is None
    assert loopback.check_origin("http://localhost:7860/") is None
    reason = loopback.check_origin("https://some-site.example")
    assert reason is not None and "some-site.example" in reason
    assert loopback.check_origin("http://127.0.0.1:9999") is not None  # another local app's page
    assert loopback.check_origin("null") is not None


def test_configured_origin_allowed():
    policy = AccessPolicy(Settings(allowed_origins=["http://my-touchdesigner.local:8080"]), port=7860)
    assert policy.check_origin("http://my-touchdesigner.local:8080") is None


def test_the_page_served_at_the_host_asked_is_the_daemons_own():
    """QA 10: on a wildcard bind with a token, the page opened at the machine's LAN address was refused its own
    WebSocket (its Origin is that address). An Origin equal to the Host the request came to is the daemon's page,
    once that Host is allowed; another port or name on it is not."""
    token = "s3cret-stage-token-0123456789"
    lan = AccessPolicy(Settings(host="0.0.0.0", token=token), port=7860)
    asked = {"host": "192.168.1.20:7860", "authorization": f"Bearer {token}"}
    assert lan.check({**asked, "origin": "http://192.168.1.20:7860"}, "") is None
    refused = lan.check({**asked, "origin": "http://192.168.1.20:9999"}, "")
    assert refused is not None and refused.status == 403
    assert lan.check({"host": "192.168.1.20:7860", "origin": "http://192.168.1.20:7860"}, "").status == 401
    named = AccessPolicy(Settings(allowed_hosts=["stage.local"]), port=7860)
    assert named.check({"host": "stage.local:7860", "origin": "http://stage.local:7860"}, "") is None
    # Loopback only: a rebinding page's own name fails the Host check before its Origin is looked at.
    loopback = AccessPolicy(Settings(), port=7860)
    assert loopback.check({"host": "evil.example:7860", "origin": "http://evil.example:7860"}, "").status == 403
    assert loopback.check({"host": "127.0.0.1:7860", "origin": "http://127.0.0.1:9999"}, "").status == 403


def test_a_bracketed_host_with_anything_after_it_is_not_that_host(loopback):
    """QA 34: ``[::1]evil`` was read as ``[::1]``."""
    assert loopback.check_host("[::1]:7860") is None and loopback.check_host("[::1]") is None
    for host in ("[::1]evil.test:7860", "[::1]:78x0", "[::1]."):
        assert loopback.check_host(host) is not None, host


def test_token_forms():
    policy = AccessPolicy(Settings(host="0.0.0.0", token="s3cret-stage-token-0123456789"), port=7860)
    assert policy.check_token({}, "") is not None
    assert policy.check_token({"authorization": "Bearer s3cret-stage-token-0123456789"}, "") is None
    assert policy.check_token({"authorization": "Bearer wrong-token"}, "") is not None
    basic = base64.b64encode(b"user:s3cret-stage-token-0123456789").decode()
    assert policy.check_token({"authorization": f"Basic {basic}"}, "") is None
    assert policy.check_token({"authorization": "Basic !!!notbase64"}, "") is not None
    assert policy.check_token({}, "token=s3cret-stage-token-0123456789") is None
    assert policy.check_token({}, "token=nope") is not None
    # Beyond loopback with a token, any Host name is accepted (the token is the defence).
    assert policy.check_host("192.168.1.20:7860") is None


def test_check_refuses_host_and_origin_with_403_token_with_401():
    policy = AccessPolicy(Settings(token="s3cret-stage-token-0123456789"), port=7860)
    token = {"authorization": "Bearer s3cret-stage-token-0123456789"}
    assert policy.check({"host": "127.0.0.1:7860", **token}, "") is None
    assert policy.check({"host": "127.0.0.1:7860"}, "token=s3cret-stage-token-0123456789") is None
    # The host is checked first: a rebinding page learns nothing about the token.
    assert policy.check({"host": "evil.example"}, "").status == 403
    assert policy.check({"host": "localhost", "origin": "https://evil.example", **token}, "").status == 403
    refused = policy.check({"host": "localhost"}, "token=wrong")
    assert refused is not None and refused.status == 401 and "does not match" in refused.reason
    missing = policy.check({"host": "localhost", "authorization": "Bearer "}, "")
    assert missing is not None and missing.status == 401 and missing.reason.startswith("a token is required")


def test_refusal_answer():
    forbidden = Refusal(403, "host 'evil.example' is not served here")
    assert json.loads(forbidden.body()) == {"type": "error", "code": "forbidden",
                                            "message": "host 'evil.example' is not served here"}
    assert dict(forbidden.headers())[b"content-length"] == str(len(forbidden.body())).encode()
    assert b"www-authenticate" not in dict(forbidden.headers())
    unauthorized = Refusal(401, "a token is required", challenge=True)
    assert json.loads(unauthorized.body())["code"] == "unauthorized"
    assert dict(unauthorized.headers())[b"www-authenticate"].startswith(b"Basic")
    assert b"www-authenticate" not in dict(Refusal(401, "a token is required").headers())  # a page's request


@pytest.mark.parametrize("host", ["fd00::5", "[fd00::5]", "FD00::5"])
def test_a_daemon_on_an_ipv6_address_serves_its_own_bracketed_host_and_page(host):
    """QA 46 F8: Host and Origin carry an IPv6 address in brackets; --host fd00::5 refused every request 403."""
    token = "t" * 32
    policy = AccessPolicy(Settings(host=host, token=token, port=7860), 7860)
    asked = {"host": "[fd00::5]:7860", "authorization": f"Bearer {token}"}
    assert policy.check(asked, "") is None
    assert policy.check({**asked, "origin": "http://[fd00::5]:7860"}, "") is None
    assert policy.check({**asked, "host": "[fd00::6]:7860"}, "").status == 403


def test_host_port_brackets_ipv6():
    from sdbridge.bridge.listen import host_port

    assert [host_port(h, 9000) for h in ("::", "[::1]", "127.0.0.1", "studio.local")] == [
        "[::]:9000", "[::1]:9000", "127.0.0.1:9000", "studio.local:9000"]


@pytest.mark.parametrize("host", ["[::]", "0:0::0", "::0", "[0:0::0]", "::", "0.0.0.0"])
def test_every_spelling_of_the_wildcard_serves_any_host_with_the_token(host):
    """QA 74 F5: ``--host [::]`` listens on every interface, but the policy compared the raw string with ``::``, so
    every LAN controller got 403 with the right token, and ``http://[::]:7860`` was taken for the daemon's page."""
    token = "t" * 32
    policy = AccessPolicy(Settings(host=host, token=token, port=7860), 7860)
    assert policy.any_host
    assert policy.check({"host": "192.0.2.2:7860", "authorization": f"Bearer {token}"}, "") is None
    assert policy.check({"host": "192.0.2.2:7860"}, "").status == 401  # the token is still the defence
    assert not any("[::]" in origin or "0:0::0" in origin for origin in policy.origins)


def test_a_non_ascii_token_matches_in_every_carrier():
    """QA 74 F8: headers come read as latin-1 (ASGI), so a UTF-8 token sent as Bearer arrives as its UTF-8 bytes read
    as latin-1; it was encoded again as UTF-8 and never matched, while Basic and ?token= did."""
    token = "tökén-qa74-0123456789abcdef"
    policy = AccessPolicy(Settings(token=token), port=7860)
    on_the_wire = token.encode().decode("latin-1")  # what a server hands the policy for the header OBS sends
    assert policy.check_token({"authorization": f"Bearer {on_the_wire}"}, "") is None
    basic = base64.b64encode(f"x:{token}".encode()).decode()
    assert policy.check_token({"authorization": f"Basic {basic}"}, "") is None
    assert policy.check_token({}, "token=t%C3%B6k%C3%A9n-qa74-0123456789abcdef") is None
    # Other bytes are another token: the same letters in latin-1 do not pass.
    assert policy.check_token({"authorization": f"Bearer {token}"}, "") is not None
    latin1 = base64.b64encode(f"x:{token}".encode("latin-1")).decode()
    assert policy.check_token({"authorization": f"Basic {latin1}"}, "") is not None
