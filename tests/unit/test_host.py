"""Address choice for mDNS and peer discovery of the connector."""

from __future__ import annotations

from typing import Any

import multiaddr
import pytest
from libp2p.peer.id import ID
from libp2p.peer.peerstore import PeerStoreError

from node.host import Connector, advertised_addrs

IPS = ["127.0.0.1", "10.200.0.1", "192.168.1.5", "::1", "fe80::1", "fd00::2"]


def addrs(*texts: str) -> list[multiaddr.Multiaddr]:
    return [multiaddr.Multiaddr(text) for text in texts]


def test_wildcard_ip4_becomes_interface_ips() -> None:
    result = advertised_addrs(addrs("/ip4/0.0.0.0/tcp/4001"), IPS)

    assert result == addrs("/ip4/10.200.0.1/tcp/4001", "/ip4/192.168.1.5/tcp/4001")


def test_wildcard_ip6_skips_link_local() -> None:
    result = advertised_addrs(addrs("/ip6/::/tcp/4001"), IPS)

    assert result == addrs("/ip6/fd00::2/tcp/4001")


def test_wildcard_falls_back_to_loopback() -> None:
    result = advertised_addrs(addrs("/ip4/0.0.0.0/tcp/4001", "/ip6/::/tcp/4002"), ["127.0.0.1", "::1", "fe80::1"])

    assert result == addrs("/ip4/127.0.0.1/tcp/4001", "/ip6/::1/tcp/4002")


def test_specific_addresses_kept() -> None:
    listen = addrs("/ip4/127.0.0.1/tcp/4001", "/ip4/10.200.0.1/tcp/5000", "/ip6/fd00::2/tcp/4001")

    assert advertised_addrs(listen, IPS) == listen


def test_wildcard_without_interfaces_dropped() -> None:
    assert advertised_addrs(addrs("/ip6/::/tcp/4001", "/ip4/10.0.0.1/tcp/1"), ["127.0.0.1"]) == addrs(
        "/ip4/10.0.0.1/tcp/1"
    )


class RacingPeerstore:
    """A peerstore whose scan fails once, as when zeroconf's thread adds a peer meanwhile."""

    def __init__(self, peer: ID, address: multiaddr.Multiaddr) -> None:
        self.peer = peer
        self.address = address
        self.scans = 0

    def peers_with_addrs(self) -> list[ID]:
        self.scans += 1
        if self.scans == 1:
            raise RuntimeError("dictionary changed size during iteration")
        return [self.peer]

    def addrs(self, peer: ID) -> list[multiaddr.Multiaddr]:
        if self.scans == 2:
            raise PeerStoreError("peer ID is expired")
        return [self.address]


class FakeHost:
    def __init__(self, peerstore: Any) -> None:
        self.peerstore = peerstore
        self.id = ID(b"\x00\x24\x08\x01\x12\x20" + b"\x01" * 32)

    def get_peerstore(self) -> Any:
        return self.peerstore

    def get_id(self) -> ID:
        return self.id


@pytest.fixture
def peer() -> ID:
    return ID(b"\x00\x24\x08\x01\x12\x20" + b"\x02" * 32)


def test_discover_retries_after_racing_scan(peer: ID) -> None:
    peerstore = RacingPeerstore(peer, multiaddr.Multiaddr("/ip4/10.200.0.2/tcp/4001"))
    connector = Connector(FakeHost(peerstore), [], discover_from_peerstore=True)

    connector._discover()  # the scan races with zeroconf's thread
    assert connector.wanted == {}
    connector._discover()  # the address expired between the scan and the lookup
    assert connector.wanted == {}
    connector._discover()

    assert list(connector.wanted) == [peer]
    assert connector.wanted[peer].info.addrs == [peerstore.address]
