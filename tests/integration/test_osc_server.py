"""OscServer and OscSender on real UDP sockets on loopback, with python-osc's own client and server.

Not the daemon: an OscServer and a ParamStore only. Timing bounds are 10x looser than the targets.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import pytest
from pythonosc.dispatcher import Dispatcher
from pythonosc.osc_bundle_builder import OscBundleBuilder
from pythonosc.osc_message_builder import OscMessageBuilder
from pythonosc.osc_server import AsyncIOOSCUDPServer
from pythonosc.udp_client import SimpleUDPClient

from sdbridge.bridge.osc import OscSender, OscServer
from sdbridge.bridge.osc_parse import OscCall, parse_datagram
from sdbridge.errors import ParamError, ProtocolError
from sdbridge.params import ParamStore

pytestmark = pytest.mark.timeout(60)


async def until(predicate, timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.002)
    return predicate()


async def started(store: ParamStore | None = None, **options) -> tuple[OscServer, SimpleUDPClient]:
    server = OscServer(store or ParamStore(), **options)
    await server.start("127.0.0.1", 0)
    assert server.port and server.port > 0
    return server, SimpleUDPClient("127.0.0.1", server.port)


def osc_bundle(*messages: tuple[str, object], time_tag: float = 0.0):
    builder = OscBundleBuilder(time_tag) if time_tag else OscBundleBuilder(0)
    for address, value in messages:
        message = OscMessageBuilder(address)
        message.add_arg(*value) if isinstance(value, tuple) else message.add_arg(value)
        builder.add_content(message.build())
    return builder.build()


def test_a_float_sets_strength():
    async def scenario():
        server, client = await started()
        client.send_message("/sd/strength", 0.25)
        assert await until(lambda: server.store.get("strength") == 0.25)
        assert (server.stats.datagrams, server.stats.good, server.stats.messages) == (1, 1, 1)
        server.close()

    asyncio.run(scenario())


def test_a_bundle_lands_in_one_version_bump():
    async def scenario():
        server, client = await started()
        changes: list[dict] = []
        server.store.subscribe(changes.append)
        client.send(osc_bundle(("/sd/prompt", "a heron"), ("/sd/seed", (4294967295, "h"))))
        assert await until(lambda: server.store.version > 0)
        assert server.store.version == 1
        assert changes == [{"prompt": "a heron", "seed": 4294967295}]
        server.close()

    asyncio.run(scenario())


def test_a_bundle_an_hour_ahead_applies_at_once():
    async def scenario():
        server, client = await started()
        sent_at = time.monotonic()
        client.send(osc_bundle(("/sd/prompt", "later?"), ("/sd/steps", 3.0), time_tag=time.time() + 3600))
        assert await until(lambda: server.store.get("steps") == 3, timeout_s=5.0)
        assert time.monotonic() - sent_at < 1.0  # it never waits for the time tag
        assert server.store.get("prompt") == "later?"
        server.close()

    asyncio.run(scenario())


BAD = [b"garbage", b"/sd/strength\x00\x00\x00\x00,f\x00", b"#bundle\x00" + bytes(3),
       b"/sd/\xff\xfe\x00\x00,f\x00\x00\x3f\x00\x00\x00",
       b"#bundle\x00" + bytes(8) + b"\xff\xff\xff\xfc" + b"/a\x00\x00",  # hangs python-osc's own parser
       b"/sd/x\x00\x00\x00,q\x00\x00"]


def test_a_flood_of_malformed_datagrams_then_a_valid_one(caplog):
    async def scenario():
        server, client = await started()
        lags: list[float] = []

        async def ticker():
            while True:
                before = time.monotonic()
                await asyncio.sleep(0.01)
                lags.append(time.monotonic() - before - 0.01)

        tick = asyncio.create_task(ticker())
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            for start in range(0, 1000, 100):
                for index in range(start, start + 100):
                    sock.sendto(BAD[index % len(BAD)], ("127.0.0.1", server.port))
                # Wait for the server to catch up, so that no datagram is lost in a full socket buffer.
                assert await until(lambda: server.stats.datagrams == start + 100)
        client.send_message("/sd/strength", 0.375)
        assert await until(lambda: server.store.get("strength") == 0.375)
        await asyncio.sleep(0.05)
        tick.cancel()
        server.close()
        return server.stats, lags

    with caplog.at_level(logging.WARNING, logger="sdbridge.bridge.osc"):
        stats, lags = asyncio.run(scenario())
    assert stats.malformed == 1000 and stats.good == 1 and stats.datagrams == 1001
    assert stats.internal_errors == 0 and stats.rejected_source == 0
    assert max(lags) < 1.0  # 10x looser than the 10 ms target
    records = [r for r in caplog.records if r.name == "sdbridge.bridge.osc"]
    assert 1 <= len(records) <= 4  # the first in full, then summaries: the log is not flooded
    assert "malformed OSC packet" in records[0].getMessage()
    assert "more problems not logged (malformed +" in records[-1].getMessage()  # flushed at close


def test_empty_datagram_is_malformed():
    async def scenario():
        server, _ = await started()
        errors = []
        server.on_error = lambda error, source: errors.append((error, source))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"", ("127.0.0.1", server.port))
            assert await until(lambda: server.stats.datagrams == 1)
        server.close()
        return server.stats, errors

    stats, errors = asyncio.run(scenario())
    assert stats.malformed == 1
    [(error, source)] = errors
    assert isinstance(error, ProtocolError) and "empty datagram" in str(error) and source[0] == "127.0.0.1"


def test_a_source_outside_the_allow_list_is_refused_unparsed():
    async def scenario():
        server, client = await started(allowed_sources=("10.0.0.0/8",))
        client.send_message("/sd/strength", 0.9)
        client._sock.sendto(b"garbage", ("127.0.0.1", server.port))
        assert await until(lambda: server.stats.rejected_source == 2)
        assert server.store.get("strength") == 0.5
        assert (server.stats.good, server.stats.malformed, server.stats.datagrams) == (0, 0, 2)
        server.close()

    asyncio.run(scenario())


def test_errors_and_commands_reach_the_callbacks_and_good_values_still_apply():
    async def scenario():
        errors, commands = [], []
        server, client = await started(on_error=lambda e, s: errors.append(e),
                                       on_command=lambda c, s: commands.append(c))
        client.send(osc_bundle(("/sd/strength", 4.0), ("/sd/guidance", 2.0), ("/sd/preset", "dusk")))
        assert await until(lambda: commands)
        assert server.store.get("guidance") == 2.0 and server.stats.param_errors == 1
        server.close()
        return errors, commands

    errors, commands = asyncio.run(scenario())
    assert [str(e) for e in errors] == ["/sd/strength: strength 4.0 not in [0, 1]"]
    assert isinstance(errors[0], ParamError)
    assert commands == [OscCall("/sd/preset", ("dusk",))]


def test_a_datagram_s_errors_are_told_up_to_a_bound_then_counted():
    """A bundle of 1024 refused messages was 1024 log lines and 1024 errors to the feedback target and every
    WebSocket client, 10-20 ms on the event loop per datagram (QA 53 F7)."""
    from sdbridge.bridge.osc import MAX_ERRORS_TOLD

    async def scenario():
        errors = []
        server, client = await started(on_error=lambda e, s: errors.append(e))
        client.send(osc_bundle(*[(f"/sd/nope{index}", 1.0) for index in range(100)], ("/sd/guidance", 2.0)))
        assert await until(lambda: server.store.get("guidance") == 2.0 and len(errors) == MAX_ERRORS_TOLD + 1)
        client.send(osc_bundle(("/sd/strength", 4.0), ("/sd/guidance", 3.0)))  # a new datagram: told again
        assert await until(lambda: server.store.get("guidance") == 3.0 and len(errors) == MAX_ERRORS_TOLD + 2)
        server.close()
        return server, errors

    server, errors = asyncio.run(scenario())
    assert server.stats.param_errors == 101
    assert [str(e).split(":")[0] for e in errors[:MAX_ERRORS_TOLD]] == [f"/sd/nope{i}" for i in range(MAX_ERRORS_TOLD)]
    assert str(errors[MAX_ERRORS_TOLD]) == (f"{100 - MAX_ERRORS_TOLD} more refused messages in this datagram; only "
                                            f"the first {MAX_ERRORS_TOLD} are told one by one")
    assert errors[MAX_ERRORS_TOLD].code == "bad_param"
    assert str(errors[-1]) == "/sd/strength: strength 4.0 not in [0, 1]"


def test_a_rule_the_store_checks_names_the_address_too():
    """QA 5: a schedule's spec and an LFO's target are checked by the store, after the parser; their errors lacked
    the OSC address the parser's errors start with."""
    async def scenario():
        errors = []
        server, client = await started(on_error=lambda e, s: errors.append(e))
        client.send(osc_bundle(("/sd/schedule", "45,32@50"), ("/sd/lfo1/target", "seed"), ("/sd/guidance", 2.0)))
        assert await until(lambda: len(errors) == 2)
        assert server.store.get("guidance") == 2.0
        server.close()
        return errors

    errors = asyncio.run(scenario())
    assert sorted(str(e).split(": ", 1)[0] for e in errors) == ["/sd/lfo1/target", "/sd/schedule"]
    assert all(isinstance(e, ParamError) for e in errors)


def test_internal_errors_are_counted_logged_once_and_the_server_serves_on(caplog):
    async def scenario():
        server, client = await started(on_command=lambda c, s: 1 / 0)

        def broken_listener(changed):
            raise RuntimeError("listener bug")

        server.store.subscribe(broken_listener)
        for value in (0.1, 0.2, 0.3):
            client.send_message("/sd/strength", value)
        client.send_message("/sd/preset", "x")
        assert await until(lambda: server.stats.datagrams == 4)
        server.store.unsubscribe(broken_listener)
        client.send_message("/sd/strength", 0.75)
        assert await until(lambda: server.store.get("strength") == 0.75)
        server.close()
        return server.stats

    with caplog.at_level(logging.WARNING, logger="sdbridge.bridge.osc"):
        stats = asyncio.run(scenario())
    assert stats.internal_errors == 4 and stats.good == 5 and stats.malformed == 0
    assert sum(1 for r in caplog.records if r.exc_info) == 1  # one traceback, not one per datagram


def test_ipv6_loopback():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")

    async def scenario():
        server = OscServer(ParamStore())
        try:
            await server.start("::1", 0)
        except OSError as exc:
            pytest.skip(f"cannot bind ::1: {exc}")
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"/sd/strength\x00\x00\x00\x00,f\x00\x00\x3f\x00\x00\x00", ("::1", server.port))
            assert await until(lambda: server.store.get("strength") == 0.5)
        server.close()

    asyncio.run(scenario())


def test_sender_to_python_osc_server_including_a_bundle():
    async def scenario():
        received: list[tuple[str, tuple]] = []
        dispatcher = Dispatcher()
        dispatcher.set_default_handler(lambda address, *args: received.append((address, args)))
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        transport, _ = await AsyncIOOSCUDPServer(("127.0.0.1", port), dispatcher,
                                                 asyncio.get_running_loop()).create_serve_endpoint()
        sender = OscSender("127.0.0.1", port)
        await sender.start()
        sender.send("/sd/status/fps", 29.5)
        sender.send_many([("/sd/strength", (0.5,)), ("/sd/prompt", ("a cat",)), ("/sd/seed", (4294967295,)),
                          ("/sd/plugin/flow/enabled", (True,))])
        assert await until(lambda: len(received) == 5)
        sender.close()
        transport.close()
        return received, sender.stats

    received, stats = asyncio.run(scenario())
    assert received == [("/sd/status/fps", (29.5,)), ("/sd/strength", (0.5,)), ("/sd/prompt", ("a cat",)),
                        ("/sd/seed", (4294967295,)), ("/sd/plugin/flow/enabled", (True,))]
    assert stats.sent == 2 and stats.dropped == 0  # the four went as one bundle


def test_sender_splits_a_long_list_into_mtu_sized_bundles_in_order():
    async def scenario():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as receiver:
            receiver.bind(("127.0.0.1", 0))
            receiver.setblocking(False)
            sender = OscSender("127.0.0.1", receiver.getsockname()[1])
            await sender.start()
            sender.send_many([(f"/sd/status/v{i}", (float(i),)) for i in range(300)])
            datagrams: list[bytes] = []

            def drain() -> bool:
                while True:
                    try:
                        datagrams.append(receiver.recv(65536))
                    except BlockingIOError:
                        return sum(len(parse_datagram(d)) for d in datagrams) == 300

            assert await until(drain)
            sender.close()
            return datagrams, sender.stats

    datagrams, stats = asyncio.run(scenario())
    assert len(datagrams) > 1 and all(len(d) <= 1400 and d.startswith(b"#bundle\x00") for d in datagrams)
    assert [c.address for d in datagrams for c in parse_datagram(d)] == [f"/sd/status/v{i}" for i in range(300)]
    assert stats.sent == len(datagrams)


def test_sender_drops_and_counts_when_not_started_closed_or_nobody_listens():
    async def scenario():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        sender = OscSender("127.0.0.1", port)  # nothing listens on port once the probe is closed
        sender.send("/sd/status/fps", 1.0)
        await sender.start()
        for _ in range(5):
            sender.send("/sd/status/fps", 1.0)  # ICMP port unreachable comes back: no exception
            await asyncio.sleep(0.01)
        sender.close()
        sender.send("/sd/status/fps", 1.0)
        sender.close()  # twice is fine
        return sender.stats

    stats = asyncio.run(scenario())
    assert stats.dropped >= 2 and stats.sent + stats.dropped == 7


def test_an_address_outside_the_prefix_is_counted_and_told_once_per_address():
    """qa8 #6: a controller sending /sd/... to a daemon on /vj applied nothing and heard nothing."""
    async def scenario():
        errors = []
        server, client = await started(prefix="/vj", on_error=lambda e, s: errors.append(e))
        for _ in range(3):
            client.send_message("/sd/strength", 0.9)
        client.send_message("/sd/guidance", 2.0)
        client.send_message("/vj/guidance", 3.0)
        assert await until(lambda: server.store.get("guidance") == 3.0)
        server.close()
        return server, errors

    server, errors = asyncio.run(scenario())
    assert server.store.get("strength") != 0.9
    assert server.stats.unknown_address == 4 and server.stats.param_errors == 0 and server.stats.good == 5
    assert [e.code for e in errors] == ["unknown_address", "unknown_address"]
    assert str(errors[0]) == ("OSC address '/sd/strength' is not under the prefix '/vj': nothing was applied; send "
                              "/vj/<param> (the daemon's --osc-prefix)")
    assert "'/sd/guidance'" in str(errors[1])


def test_the_daemon_shows_an_address_outside_its_prefix_in_stats_and_on_status_error(start_daemon):
    import httpx

    from tests.clients import UdpReceiver, wait_for

    receiver = UdpReceiver()
    try:
        daemon = start_daemon(params={"engine": "identity"}, feedback_port=receiver.port, osc_prefix="/vj")
        client = SimpleUDPClient("127.0.0.1", daemon.osc_port)
        for _ in range(3):
            client.send_message("/sd/strength", 0.9)
        url = f"http://127.0.0.1:{daemon.port}/stats"

        def osc_stats() -> dict:
            return httpx.get(url, trust_env=False).json()["osc"]

        assert wait_for(lambda: osc_stats()["unknown_address"] == 3)
        assert osc_stats()["good"] == 3 and osc_stats()["param_errors"] == 0
        errors = [args for address, args in receiver.messages(1.0) if address == "/vj/status/error"]
        assert errors == [["unknown_address", "OSC address '/sd/strength' is not under the prefix '/vj': nothing was "
                                              "applied; send /vj/<param> (the daemon's --osc-prefix)"]], errors
    finally:
        receiver.close()


def test_a_reset_socket_listens_again_on_the_same_port(caplog):
    """Windows reports an ICMP port-unreachable (an /sd/get answer to a one-shot sender) as a reset, after which
    asyncio's Proactor loop reads the socket no more (CPython gh-127057, QA 44 F2). The reset is handed to the
    server as that loop hands it (Linux raises none on an unconnected UDP socket); the listening is real."""
    async def scenario():
        server, client = await started()
        server.listen_again_on_reset = True
        port, old = server.port, server.transport
        server.error_received(ConnectionResetError(10054, "An existing connection was forcibly closed"))
        server.error_received(ConnectionResetError(10054, "once more, while it listens again"))
        assert await until(lambda: server.listened_again == 1)
        assert server.port == port and server.transport is not old and old.is_closing()
        client.send_message("/sd/strength", 0.75)
        assert await until(lambda: server.store.get("strength") == 0.75)
        server.error_received(ConnectionResetError(10054, "a poller's next answer"))
        assert await until(lambda: server.listened_again == 2)
        client.send_message("/sd/strength", 0.5)
        assert await until(lambda: server.store.get("strength") == 0.5)
        server.close()
        assert server.transport is None
    with caplog.at_level(logging.DEBUG, logger="sdbridge.bridge.osc"):
        asyncio.run(scenario())
    resets = [record.levelno for record in caplog.records if "was reset" in record.getMessage()]
    assert resets == [logging.WARNING, logging.DEBUG]  # a poller's every answer does not warn


def test_a_reset_elsewhere_only_logs():
    """On Linux and macOS the selector loop reads on after an error: the socket stays as it is."""
    async def scenario():
        server, client = await started()
        assert not server.listen_again_on_reset  # this test runs on Linux
        old = server.transport
        server.error_received(ConnectionResetError(104, "reset"))
        await asyncio.sleep(0.05)
        assert server.transport is old and server.listened_again == 0
        client.send_message("/sd/strength", 0.5)
        assert await until(lambda: server.store.get("strength") == 0.5)
        server.close()
    asyncio.run(scenario())
