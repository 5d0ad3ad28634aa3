"""Which addresses an mDNS advert names, for each way the daemon can be bound."""

from __future__ import annotations

import pytest

from sdbridge.bridge.mdns import advert_addresses, host_label

INTERFACES = ["127.0.0.1", "::1", "192.168.1.20", "fe80::fc:ff:fe00:1%eth0", "fd00::2", "10.0.0.7", "192.168.1.20"]


@pytest.mark.parametrize("host, expected", [
    ("127.0.0.1", ["127.0.0.1"]),
    ("localhost", ["127.0.0.1"]),
    ("192.168.1.20", ["192.168.1.20"]),
    ("[::1]", ["::1"]),
    # A wildcard: each address a peer elsewhere can use, once; no loopback, no link-local, IPv6 only for ::.
    ("0.0.0.0", ["192.168.1.20", "10.0.0.7"]),
    ("::", ["192.168.1.20", "fd00::2", "10.0.0.7"]),
    # Any spelling of a wildcard, as the access policy reads it: 0:0::0 was announced as the address "::".
    ("0:0::0", ["192.168.1.20", "fd00::2", "10.0.0.7"]),
    ("[::]", ["192.168.1.20", "fd00::2", "10.0.0.7"]),
])
def test_the_addresses_a_peer_can_reach(host: str, expected: list[str]) -> None:
    assert advert_addresses(host, INTERFACES) == expected


def test_a_wildcard_on_a_machine_with_no_network_falls_back_to_loopback() -> None:
    assert advert_addresses("0.0.0.0", ["127.0.0.1", "::1", "not an address"]) == ["127.0.0.1"]


def test_a_bad_host_is_named() -> None:
    with pytest.raises(ValueError, match="stage-pc"):
        advert_addresses("stage-pc", INTERFACES)


@pytest.mark.parametrize("hostname, label", [
    ("stage-pc", "stage-pc"), ("Jo's MacBook Pro.local", "Jo-s-MacBook-Pro"), ("vj_rig.lan", "vj-rig"),
    ("...", "sdbridge"),
])
def test_host_labels_are_dns_labels(hostname: str, label: str) -> None:
    assert host_label(hostname) == label
