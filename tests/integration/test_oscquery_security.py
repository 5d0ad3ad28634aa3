"""The OSCQuery port under the main port's policy, and refused WebSocket handshakes that say why."""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.clients import recv_json, wait_for, ws_connect

TOKEN = "a-long-stage-token-0123456789"


def _oscquery(daemon, host: str = "127.0.0.1") -> httpx.Client:
    return httpx.Client(base_url=f"http://{host}:{daemon.oscquery.port}", trust_env=False, timeout=10)


def test_oscquery_refuses_a_host_it_does_not_serve(start_daemon):
    daemon = start_daemon(params={"engine": "identity"})
    with _oscquery(daemon) as http:
        rebound = http.get("/", headers={"Host": "evil.example"})
        assert rebound.status_code == 403
        assert rebound.json()["type"] == "error" and rebound.json()["code"] == "forbidden"
        assert "evil.example" in rebound.json()["message"]
        assert http.get("/sd/prompt?VALUE", headers={"Origin": "https://evil.example"}).status_code == 403
        assert http.get("/", headers={"Host": f"localhost:{daemon.oscquery.port}"}).status_code == 200
        assert http.get("/?HOST_INFO").json()["OSC_IP"] == "127.0.0.1"
    assert daemon.oscquery.refused == 2 and daemon.collect_stats()["refused_requests"] == 2


def test_a_refused_oscquery_request_logs_no_token(start_daemon, caplog):
    """QA 36: the refusal's log line had the request's query, ``?token=`` and all, in clear."""
    import logging

    daemon = start_daemon(params={"engine": "identity"}, token=TOKEN)
    with caplog.at_level(logging.WARNING), _oscquery(daemon) as http:
        assert http.get(f"/sd/prompt?VALUE&token={TOKEN}", headers={"Origin": "https://evil.example"}).status_code \
            == 403
    lines = [record.getMessage() for record in caplog.records if "refused OSCQuery" in record.getMessage()]
    assert lines and "/sd/prompt" in lines[0] and TOKEN not in "\n".join(lines)


def test_oscquery_needs_the_token_when_one_is_set(start_daemon):
    daemon = start_daemon(params={"engine": "identity", "prompt": "a red fox"}, token=TOKEN)
    with _oscquery(daemon) as http:
        refused = http.get("/sd/prompt?VALUE")
        assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Basic")
        assert refused.json()["code"] == "unauthorized" and "a red fox" not in refused.text
        assert http.get("/?HOST_INFO").status_code == 401
        assert http.get("/sd/prompt?VALUE&token=wrong-token-here").status_code == 401
        # The token beside OSCQuery's attribute, either order, or as a header.
        assert http.get(f"/sd/prompt?VALUE&token={TOKEN}").json() == {"VALUE": ["a red fox"]}
        assert http.get(f"/?token={TOKEN}&HOST_INFO").json()["OSC_PORT"] == daemon.osc_port
        assert http.get(f"/?token={TOKEN}").json()["CONTENTS"]["sd"]["FULL_PATH"] == "/sd"
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        assert http.get("/sd/prompt?VALUE", headers=bearer).json() == {"VALUE": ["a red fox"]}
        # The main port refuses with the same body.
        main = httpx.get(f"http://127.0.0.1:{daemon.port}/params", trust_env=False)
        assert main.status_code == 401 and main.json().keys() == refused.json().keys()


def test_oscquery_beyond_loopback(start_daemon):
    # Bound to all interfaces; 127.0.0.2 stands for the LAN address a controller reaches (Linux routes 127/8 to lo).
    daemon = start_daemon(params={"engine": "identity", "prompt": "a red fox"}, host="0.0.0.0", token=TOKEN)
    with _oscquery(daemon, "127.0.0.2") as http:
        assert http.get("/sd/prompt?VALUE").status_code == 401  # QA's repro: the prompt for anyone
        info = http.get("/?HOST_INFO&token=" + TOKEN).json()
        assert info["OSC_IP"] == "127.0.0.2" and info["OSC_PORT"] == daemon.osc_port
        # Beyond loopback the token is the defence, so a LAN name in Host passes with it.
        lan = {"Host": f"studio-pc.local:{daemon.oscquery.port}", "Authorization": f"Bearer {TOKEN}"}
        assert http.get("/sd/prompt?VALUE", headers=lan).json() == {"VALUE": ["a red fox"]}


def _refused_handshake(uri: str, port: int, **kwargs) -> InvalidStatus:
    """Open the handshake to 127.0.0.1:``port`` while ``uri`` names the Host (a rebinding page's name)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    with pytest.raises(InvalidStatus) as info:
        connect(uri, sock=sock, proxy=None, compression=None, open_timeout=10, **kwargs)
    sock.close()
    return info.value


@pytest.mark.filterwarnings("ignore:The `websockets` implementation is deprecated")  # uvicorn 0.54's, still offered
@pytest.mark.parametrize("ws_impl", ["wsproto", "websockets", "websockets-sansio"])
def test_refused_handshake_says_why(start_daemon, ws_impl):
    daemon = start_daemon(params={"engine": "identity"}, token=TOKEN, ws_impl=ws_impl)
    no_token = _refused_handshake(f"ws://127.0.0.1:{daemon.port}/ws", daemon.port)
    assert no_token.response.status_code == 401
    body = json.loads(no_token.response.body)
    assert body["type"] == "error" and body["code"] == "unauthorized" and "token" in body["message"]
    wrong = _refused_handshake(f"ws://127.0.0.1:{daemon.port}/ws?token=wrong-token-here", daemon.port)
    assert wrong.response.status_code == 401
    rebound = _refused_handshake(f"ws://evil.example:{daemon.port}/ws?token={TOKEN}", daemon.port)
    assert rebound.response.status_code == 403
    assert json.loads(rebound.response.body)["code"] == "forbidden"
    assert "evil.example" in json.loads(rebound.response.body)["message"]
    foreign = _refused_handshake(f"ws://127.0.0.1:{daemon.port}/ws?token={TOKEN}", daemon.port,
                                 origin="https://evil.example")
    assert foreign.response.status_code == 403 and b"evil.example" in foreign.response.body
    with ws_connect(daemon, f"?token={TOKEN}") as ws:
        assert recv_json(ws, "hello")



class _Browser:
    """An mDNS browser on loopback: ``found`` maps each service name to its info, or to None once withdrawn."""

    def __init__(self, kinds: list[str]) -> None:
        from zeroconf import IPVersion, ServiceBrowser, Zeroconf

        self.found: dict[str, object] = {}
        self.changed = threading.Event()
        self.zeroconf = Zeroconf(interfaces=["127.0.0.1"], ip_version=IPVersion.V4Only)
        self.browser = ServiceBrowser(self.zeroconf, kinds, self)

    def add_service(self, zc, kind, name):
        self.found[name] = zc.get_service_info(kind, name, timeout=3000)
        self.changed.set()

    def update_service(self, zc, kind, name):
        self.add_service(zc, kind, name)

    def remove_service(self, zc, kind, name):
        self.found[name] = None
        self.changed.set()

    def wait(self, until, timeout_s: float = 10.0) -> dict[str, object]:
        deadline = time.monotonic() + timeout_s
        while not until(self.found) and time.monotonic() < deadline:
            self.changed.wait(0.2)
            self.changed.clear()
        return dict(self.found)

    def close(self) -> None:
        self.browser.cancel()
        self.zeroconf.close()


def test_oscquery_and_osc_are_announced_over_mdns_and_withdrawn_on_stop(tmp_path):
    pytest.importorskip("zeroconf")  # in the test extras; the daemon itself runs without it
    from sdbridge.bridge.server import DaemonThread
    from sdbridge.config import Settings

    settings = Settings(port=0, osc_port=0, oscquery_port=0, feedback_port=0, oscquery_advertise=True,
                        presets_dir=str(tmp_path))
    settings.params = {"engine": "identity"}
    thread = DaemonThread(settings)
    daemon = thread.start()
    browser = _Browser(["_oscjson._tcp.local.", "_osc._udp.local."])
    try:
        found = browser.wait(lambda f: sum(info is not None for info in f.values()) == 2)
        ports = {name.split(".", 1)[1]: info.port for name, info in found.items() if info is not None}
        assert ports == {"_oscjson._tcp.local.": daemon.oscquery.port, "_osc._udp.local.": daemon.osc_port}
        for name, info in found.items():
            assert name.startswith("sdbridge on ")
            assert info.server.endswith(f"-{daemon.oscquery.port}.local.")  # its own host name: its own addresses
            assert info.parsed_addresses() == ["127.0.0.1"]  # bound to loopback: loopback is all it names
        # What the advert points at answers: the namespace over OSCQuery.
        namespace = httpx.get(f"http://127.0.0.1:{ports['_oscjson._tcp.local.']}/", trust_env=False, timeout=10)
        assert namespace.json()["CONTENTS"]["sd"]["FULL_PATH"] == "/sd"

        thread.stop()  # sends goodbyes: a browser that was listening sees both services go
        gone = browser.wait(lambda f: all(info is None for info in f.values()))
        assert sorted(gone) == sorted(found) and all(info is None for info in gone.values()), gone
    finally:
        browser.close()
        thread.stop()


def test_every_listener_on_the_ipv6_wildcard_takes_ipv4_too(start_daemon):
    """QA 44 F14: `--host ::` is documented as every interface, but asyncio's server turns dual-stack off, so
    OSCQuery refused an IPv4 controller (on Windows, whose default is IPv6 only, HTTP and OSC did too)."""
    daemon = start_daemon(params={"engine": "identity", "prompt": "a red fox"}, host="::", token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with _oscquery(daemon) as http:
        assert http.get("/sd/prompt?VALUE", headers=bearer).json() == {"VALUE": ["a red fox"]}
    assert httpx.get(f"http://127.0.0.1:{daemon.port}/health", headers=bearer, trust_env=False,
                     timeout=10).status_code == 200
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as controller:
        controller.sendto(b"/sd/strength\x00\x00\x00\x00,f\x00\x00" + struct.pack(">f", 0.25),
                          ("127.0.0.1", daemon.osc_port))
    assert wait_for(lambda: httpx.get(f"http://127.0.0.1:{daemon.port}/params", headers=bearer, trust_env=False,
                                      timeout=5).json()["values"]["strength"] == 0.25, timeout=10)
    listeners = [daemon.oscquery.sock, daemon.osc.transport.get_extra_info("socket")]
    assert all(sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0 for sock in listeners)


def test_the_bracketed_ipv6_wildcard_serves_lan_clients_with_the_token(start_daemon):
    """QA 74 F5: ``--host [::]`` bound every interface, yet every LAN client got 403 with the right token on the main
    port and on OSCQuery (127.0.0.2 stands for the LAN address)."""
    daemon = start_daemon(params={"engine": "identity", "prompt": "a red fox"}, host="[::]", token=TOKEN)
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    with _oscquery(daemon, "127.0.0.2") as http:
        assert http.get("/sd/prompt?VALUE", headers=bearer).json() == {"VALUE": ["a red fox"]}
        assert http.get("/sd/prompt?VALUE").status_code == 401
    assert httpx.get(f"http://127.0.0.2:{daemon.port}/health", headers=bearer, trust_env=False,
                     timeout=10).status_code == 200


def test_a_non_ascii_token_works_as_bearer_on_both_ports(start_daemon):
    """QA 74 F8: a non-ASCII --token passed as Basic or ?token= but never as Authorization: Bearer (OBS's field)."""
    token = "tökén-qa74-0123456789abcdef"
    daemon = start_daemon(params={"engine": "identity"}, token=token)
    bearer = {"Authorization": b"Bearer " + token.encode()}  # the UTF-8 bytes a client sends
    for port, path in ((daemon.port, "/health"), (daemon.oscquery.port, "/?HOST_INFO")):
        url = f"http://127.0.0.1:{port}{path}"
        assert httpx.get(url, headers=bearer, trust_env=False, timeout=10).status_code == 200, port
        assert httpx.get(url, auth=("x", token), trust_env=False, timeout=10).status_code == 200, port
        wrong = {"Authorization": b"Bearer " + token.encode("latin-1")}
        assert httpx.get(url, headers=wrong, trust_env=False, timeout=10).status_code == 401, port


def test_a_percent_encoded_token_name_is_answered(start_daemon):
    """QA 74 F2: ``?VALUE&tok%65n=TOKEN`` passed the check, then was a 400 whose message echoed the token."""
    daemon = start_daemon(params={"engine": "identity", "prompt": "a red fox"}, token=TOKEN)
    with _oscquery(daemon) as http:
        for query in (f"VALUE&tok%65n={TOKEN}", f"%74oken={TOKEN}&VALUE"):
            answer = http.get(f"/sd/prompt?{query}")
            assert answer.json() == {"VALUE": ["a red fox"]} and TOKEN not in answer.text, query


def _reset(port: int, data: bytes) -> None:
    """Send ``data`` and reset the connection (SO_LINGER 0), as a crashed or impatient client does."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.sendall(data)
    time.sleep(0.05)  # the daemon is reading the head when the reset comes
    sock.close()


def test_a_reset_oscquery_connection_is_counted_not_a_traceback(start_daemon, caplog):
    """QA 74 F1: each client that reset its connection was an asyncio "Unhandled exception" ERROR traceback, before
    the token check, unbounded."""
    import logging

    daemon = start_daemon(params={"engine": "identity"}, token=TOKEN)
    with caplog.at_level(logging.WARNING):
        for _ in range(10):
            _reset(daemon.oscquery.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # a head that never ends
        counted = wait_for(lambda: getattr(daemon.oscquery, "resets", 0) == 10, timeout=10)
        with _oscquery(daemon) as http:  # and the port serves on
            assert http.get(f"/?HOST_INFO&token={TOKEN}").status_code == 200
    errors = [record.getMessage() for record in caplog.records if record.levelno >= logging.ERROR]
    assert errors == [] and counted
    assert daemon.collect_stats()["oscquery"]["resets"] == 10  # and /stats tells them


def test_an_oscquery_refusal_flood_logs_the_first_then_a_summary(start_daemon, caplog):
    """QA 74 F10: each refused OSCQuery request was its own WARNING (2000 lines for 2000 requests); the main port
    logs the first and then summaries."""
    import logging

    daemon = start_daemon(params={"engine": "identity"}, token=TOKEN)
    with caplog.at_level(logging.INFO, logger="sdbridge.bridge.oscquery"), _oscquery(daemon) as http:
        for _ in range(60):
            assert http.get("/sd/prompt?VALUE", headers={"Connection": "close"}).status_code == 401
    lines = [r.getMessage() for r in caplog.records if r.name == "sdbridge.bridge.oscquery"]
    assert lines and "refused OSCQuery /sd/prompt" in lines[0], lines
    assert len(lines) <= 3 and all("more refused requests not logged (unauthorized +" in line for line in lines[1:])
    assert daemon.oscquery.refused == 60 and daemon.collect_stats()["refused_requests"] == 60


def _daemon_fds(before: int, ours: int) -> int:
    """Descriptors the daemon holds: the daemon runs in this process, beside ``ours`` client sockets."""
    return len(os.listdir("/proc/self/fd")) - before - ours


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors in /proc")
def test_idle_oscquery_connections_are_capped_and_closed(start_daemon):
    """QA 74 F7: idle connections to the OSCQuery port needed no token, had no cap and were held 5 s each: one client
    took every descriptor, the main port timed out and accept() failed thousands of times a second."""
    from sdbridge.bridge import oscquery

    # The bounds, read so that the old code (without them) fails on what it held, not on an import.
    per_client = getattr(getattr(oscquery, "OSCQUERY_LIMITS", None), "max_connections_per_client", 16)
    lingering = getattr(oscquery, "MAX_LINGERING", 16)
    head_timeout_s = getattr(getattr(oscquery, "OSCQUERY_LIMITS", None), "head_timeout_s", 2.0)
    daemon = start_daemon(params={"engine": "identity"}, host="0.0.0.0", token=TOKEN)
    port = daemon.oscquery.port
    before = len(os.listdir("/proc/self/fd"))
    idle = [socket.create_connection(("127.0.0.1", port), timeout=10) for _ in range(200)]
    time.sleep(0.5)  # every connection accepted
    held = _daemon_fds(before, len(idle))
    assert held <= per_client + lingering + 8, held
    # Past the per-client cap: 503 as the main port says it; another address and the main port are served meanwhile.
    answers = []
    for sock in idle[per_client:][:lingering]:
        try:
            answers.append(sock.recv(4096))
        except OSError:
            answers.append(b"")
    assert any(a.startswith(b"HTTP/1.1 503") and b"too_many_connections" in a for a in answers), answers[:3]
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    transport = httpx.HTTPTransport(local_address="127.0.0.2")  # another client address
    with httpx.Client(transport=transport, trust_env=False, timeout=10) as other:
        assert other.get(f"http://127.0.0.1:{port}/?HOST_INFO", headers=bearer).status_code == 200
    assert httpx.get(f"http://127.0.0.1:{daemon.port}/health", headers=bearer, trust_env=False,
                     timeout=10).status_code == 200
    # The admitted idle ones are closed at the head timeout, without a word.
    started = time.monotonic()
    assert idle[0].recv(4096) == b""
    assert time.monotonic() - started < 10 * head_timeout_s
    assert wait_for(lambda: daemon.oscquery.guard.open == 0, timeout=10)
    assert daemon.oscquery.guard.idle_closed == per_client
    # A head begun and never ended is told so.
    slow = socket.create_connection(("127.0.0.1", port), timeout=10 * head_timeout_s)
    slow.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    assert slow.recv(4096).startswith(b"HTTP/1.1 408")
    slow.close()
    for sock in idle:
        sock.close()
