"""mDNS discovery between two node processes, each in a network namespace of its own.

The test builds a two-machine LAN: two namespaces joined by a veth pair,
with addresses in 10.200.0.0/24 that exist only inside them. Two
namespaces, not one with multicast on its loopback, because then each
node has a network stack of its own, as on two machines: the mDNS packets
cross an interface, and an advertised address that only works locally (a
wildcard, or 127.0.0.1) fails here as it would on a real LAN. Multicast
never leaves the namespaces, and the nodes get no bootstrap peers, so mDNS
is the only way they can find each other.

Needs root and iproute2's `ip`. A namespace that cannot be created fails
the test with the reason, and does not skip it.
"""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.processes import Daemon, run, run_json

pytestmark = [pytest.mark.e2e, pytest.mark.netns]

SUBNET = "10.200.0"
DISCOVERY_TIMEOUT_S = 30.0


@dataclass
class Lan:
    namespaces: list[str]
    addresses: list[str]  # the veth address in each namespace


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    try:
        result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    except FileNotFoundError:
        pytest.fail("iproute2's `ip` command was not found; install iproute2 (Debian package iproute2)")
    if check and result.returncode != 0:
        pytest.fail(
            f"`ip {' '.join(args)}` failed with status {result.returncode}: {result.stderr.strip()} "
            "(this test needs root to create network namespaces)"
        )
    return result


@pytest.fixture
def lan() -> Iterator[Lan]:
    """Two namespaces joined by a veth pair; deleted afterwards, even when setup fails halfway."""
    suffix = str(os.getpid() % 100_000)
    namespaces = [f"pmarket-mdns-{suffix}-{side}" for side in "ab"]
    # Interface names have at most 15 characters.
    devices = [f"pmv{suffix}{side}" for side in "ab"]
    addresses = [f"{SUBNET}.1", f"{SUBNET}.2"]
    created: list[str] = []
    veth_created = False
    try:
        for namespace in namespaces:
            ip("netns", "add", namespace)
            created.append(namespace)
        ip("link", "add", devices[0], "type", "veth", "peer", "name", devices[1])
        veth_created = True
        for namespace, device, address in zip(namespaces, devices, addresses, strict=True):
            ip("link", "set", device, "netns", namespace)
            ip("-n", namespace, "addr", "add", f"{address}/24", "dev", device)
            ip("-n", namespace, "link", "set", "lo", "up")
            ip("-n", namespace, "link", "set", device, "up", "multicast", "on")
            # zeroconf sends to 224.0.0.251; the namespace has no default route.
            ip("-n", namespace, "route", "add", "224.0.0.0/4", "dev", device)
        yield Lan(namespaces, addresses)
    finally:
        for namespace in created:
            ip("netns", "delete", namespace, check=False)
        if veth_created:
            # Deleting a namespace deletes the veth end inside it, and so the
            # pair. Only an end that never moved into a namespace is left.
            for device in devices:
                if ip("link", "show", device, check=False).returncode == 0:
                    ip("link", "delete", device, check=False)


@pytest.fixture
def nodes(lan: Lan) -> Iterator[list[Daemon]]:
    # Depends on `lan`, so the daemons stop before the namespaces go.
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def start_pair(tmp_path: Path, lan: Lan, nodes: list[Daemon], listen: list[str]) -> list[dict[str, Any]]:
    statuses = []
    for index, namespace in enumerate(lan.namespaces):
        data_dir = tmp_path / f"node-{index}"
        run("init", "--data-dir", str(data_dir))
        daemon = Daemon(data_dir, "--mdns", "--listen", listen[index], prefix=["ip", "netns", "exec", namespace])
        nodes.append(daemon)
    for daemon in nodes:
        statuses.append(daemon.wait_ready())
    return statuses


def wait_for_peers(data_dirs: list[Path]) -> list[list[dict[str, Any]]]:
    # The control socket is a file, so `pmarket peers` works from outside the namespaces.
    deadline = time.monotonic() + DISCOVERY_TIMEOUT_S
    while True:
        peers = [run_json("peers", "--data-dir", str(data_dir)) for data_dir in data_dirs]
        if all(peers) or time.monotonic() > deadline:
            return peers
        time.sleep(0.5)


@pytest.mark.parametrize(
    "listen",
    [
        pytest.param([f"/ip4/{SUBNET}.1/tcp/0", f"/ip4/{SUBNET}.2/tcp/0"], id="veth-address"),
        # The same port on both sides, so a node that dialled a wildcard
        # address it was sent would reach its own listener.
        pytest.param(["/ip4/0.0.0.0/tcp/4001", "/ip4/0.0.0.0/tcp/4001"], id="wildcard"),
    ],
)
def test_mdns_nodes_connect(tmp_path: Path, lan: Lan, nodes: list[Daemon], listen: list[str]) -> None:
    statuses = start_pair(tmp_path, lan, nodes, listen)
    peer_ids = [status["peer_id"] for status in statuses]

    peers = wait_for_peers([daemon.data_dir for daemon in nodes])

    logs = [(daemon.data_dir / "node.log").read_text() for daemon in nodes]
    for index, other in ((0, 1), (1, 0)):
        assert [p["peer_id"] for p in peers[index]] == [peer_ids[other]], logs[index]
        # mDNS, not a wildcard address, gave the other node's veth address.
        discovered = f"Discovered peer {peer_ids[other]} at /ip4/{lan.addresses[other]}/tcp/"
        assert discovered in logs[index], logs[index]
