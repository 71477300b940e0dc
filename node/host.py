"""The libp2p host and the connections it keeps.

The host speaks TCP, Noise and Yamux only. py-libp2p's `new_host` also
accepts plaintext and secio unless configured otherwise, so the security options
are always passed explicitly.

Connection limits: py-libp2p 0.8.1's own global limit closed more
connections than it should in tests (with max_connections=1 no connection
survived), so the node enforces `[limits] max_connections` itself when a
connection opens (`Node._on_connected`) and gives py-libp2p a looser limit
as a backstop. py-libp2p's auto-connector, which dials random peerstore
peers to reach a connection target, is switched off: this node dials only
its bootstrap peers and, with mDNS on, the peers mDNS finds.

`Connector` keeps the node connected to its bootstrap peers and, with mDNS
on, to peers that mDNS put in the peerstore: a pure `plan_dials` decides
whom to dial from each peer's backoff, and a loop acts on it. A failed dial
doubles the peer's backoff (1 s up to 60 s, with jitter); a connection that
drops is redialled the same way.

mDNS: py-libp2p 0.8.1 advertises the host's listen addresses in the TXT
records as they are, so a node listening on /ip4/0.0.0.0 would advertise
an address that makes a peer dial its own machine. `MdnsAddresses` gives the mDNS
broadcaster this machine's interface addresses in place of a wildcard.
mDNS writes the peers it finds into the peerstore from zeroconf's thread,
so `Connector` tolerates a peerstore scan that races with such a write.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import random
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import multiaddr
import trio
from libp2p import new_host
from libp2p.abc import INetConn, INetStream, INetwork, INotifee
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.network.config import ConnectionConfig
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo, info_from_p2p_addr
from libp2p.peer.peerstore import PeerStoreError
from libp2p.rcmgr import new_resource_manager
from libp2p.rcmgr.manager import ResourceLimits
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from node.config import Config
from node.datadir import Identity
from node.libp2p_tuning import TunedNoiseTransport, tune_host

logger = logging.getLogger(__name__)

DIAL_TIMEOUT_S = 10.0
MIN_BACKOFF_S = 1.0
MAX_BACKOFF_S = 60.0


class ListenError(Exception):
    """A listen address the node cannot use; the message names the address and a fix."""


def check_listen_addrs(addresses: Iterable[str]) -> None:
    """Check that each listen address is TCP on an IP of this machine, with its port free.

    py-libp2p 0.8.1 opens its listeners with SO_REUSEPORT, so a second node
    given a port that is in use binds it too, and the kernel then splits the
    incoming connections between the two processes. It also only logs a
    listener that fails to open. This check binds each address once without
    SO_REUSEPORT, which fails while any other socket listens there.
    """
    for text in addresses:
        address = multiaddr.Multiaddr(text)
        names = [protocol.name for protocol in address.protocols()]
        if names not in (["ip4", "tcp"], ["ip6", "tcp"]):
            raise ListenError(
                f"listen address {text!r} is not supported: a node listens on TCP over IPv4 or IPv6, "
                "for example /ip4/127.0.0.1/tcp/4001 (/tcp/0 picks a free port)"
            )
        ip = address.value_for_protocol(names[0])
        port = int(address.value_for_protocol("tcp"))
        family = socket.AF_INET if names[0] == "ip4" else socket.AF_INET6
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # SO_REUSEADDR lets a restarted node take its port back from
            # connections in TIME_WAIT, but not from a socket that listens.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((ip, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise ListenError(
                        f"cannot listen on {text}: port {port} is already in use on {ip}; "
                        "choose another port, or /tcp/0 for a free one"
                    ) from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise ListenError(
                        f"cannot listen on {text}: {ip} is not an address of this machine; "
                        "use one of its addresses, such as 127.0.0.1"
                    ) from None
                raise ListenError(f"cannot listen on {text}: {exc.strerror or exc}") from None


def build_host(identity: Identity, config: Config, listen: Iterable[str]) -> Any:
    """Build a py-libp2p host with Noise and Yamux only and the configured limits.

    Noise and Yamux are the faster variants of `node.libp2p_tuning`, which
    send the same bytes on the wire as py-libp2p's own.
    """
    security = {
        NOISE_PROTOCOL_ID: TunedNoiseTransport(identity.key_pair, noise_privkey=new_x25519_key_pair().private_key)
    }
    muxers = {YAMUX_PROTOCOL_ID: Yamux}
    limits = config.limits
    backstop = 2 * limits.max_connections + 16
    connection_config = ConnectionConfig(
        max_connections=backstop,
        min_connections=0,
        low_watermark=0,
        high_watermark=backstop,
        max_connections_per_peer=limits.max_connections_per_peer,
    )
    resource_manager = new_resource_manager(
        limits=ResourceLimits(max_connections=backstop, max_streams=limits.max_streams)
    )
    host = new_host(
        key_pair=identity.key_pair,
        sec_opt=security,
        muxer_opt=muxers,  # type: ignore[arg-type]
        listen_addrs=[multiaddr.Multiaddr(address) for address in listen],
        connection_config=connection_config,
        resource_manager=resource_manager,
        enable_mDNS=config.node.mdns,
    )
    network: Any = host.get_network()
    network.auto_connector.maybe_connect = _no_auto_connect
    mdns = getattr(host, "mDNS", None)
    if mdns is not None:
        mdns.broadcaster.host = MdnsAddresses(host)
    tune_host(host)
    return host


async def _no_auto_connect() -> None:
    """Replaces py-libp2p's auto-connector step (see the module docstring)."""


class MdnsAddresses:
    """A view of the host for py-libp2p's mDNS broadcaster, with wildcard listen IPs replaced.

    The broadcaster calls only `get_transport_addrs`, once, when mDNS starts
    after the host listens, so the ports are the bound ones even for tcp/0.
    """

    def __init__(self, host: Any) -> None:
        self._host = host

    def get_transport_addrs(self) -> list[multiaddr.Multiaddr]:
        addresses = advertised_addrs(self._host.get_transport_addrs(), interface_ips())
        logger.info("Advertising %s by mDNS", ", ".join(str(a) for a in addresses) or "no addresses")
        return addresses


def interface_ips() -> list[str]:
    """Return the IP addresses of the network interfaces in this process's network namespace."""
    import ifaddr  # installed with zeroconf, which py-libp2p's mDNS uses

    ips: list[str] = []
    for adapter in ifaddr.get_adapters():
        for ip in adapter.ips:
            # ifaddr gives an IPv6 address as (address, flowinfo, scope_id).
            ips.append(ip.ip[0] if isinstance(ip.ip, tuple) else ip.ip)
    return ips


def advertised_addrs(listen: Sequence[multiaddr.Multiaddr], ips: Iterable[str]) -> list[multiaddr.Multiaddr]:
    """Expand each wildcard listen address (0.0.0.0 or ::) to one address per interface IP.

    Loopback IPs are used only when the family has no other IP, because a
    peer on another machine cannot reach them. IPv6 link-local IPs are left
    out because dialling them needs a zone index. Addresses with a specific
    IP are kept as they are.
    """
    usable = [ipaddress.ip_address(ip) for ip in ips]
    usable = [ip for ip in usable if not ip.is_unspecified and not (ip.version == 6 and ip.is_link_local)]
    result: list[multiaddr.Multiaddr] = []
    for address in listen:
        parts = str(address).split("/")  # "/ip4/0.0.0.0/tcp/4001" -> ["", "ip4", "0.0.0.0", "tcp", "4001"]
        if len(parts) < 3 or parts[1] not in ("ip4", "ip6") or not ipaddress.ip_address(parts[2]).is_unspecified:
            result.append(address)
            continue
        version = 4 if parts[1] == "ip4" else 6
        family = [ip for ip in usable if ip.version == version]
        chosen = [ip for ip in family if not ip.is_loopback] or family
        for ip in chosen:
            result.append(multiaddr.Multiaddr("/".join(["", parts[1], str(ip), *parts[3:]])))
    return result


class ConnectionEvents(INotifee):
    """Forwards connects and disconnects from the swarm to trio callbacks."""

    def __init__(self, on_connected: Callable[[ID], None], on_disconnected: Callable[[ID], None]) -> None:
        self._on_connected = on_connected
        self._on_disconnected = on_disconnected

    async def opened_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def closed_stream(self, network: INetwork, stream: INetStream) -> None:
        pass

    async def connected(self, network: INetwork, conn: INetConn) -> None:
        self._on_connected(conn.muxed_conn.peer_id)

    async def disconnected(self, network: INetwork, conn: INetConn) -> None:
        self._on_disconnected(conn.muxed_conn.peer_id)

    async def listen(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass

    async def listen_close(self, network: INetwork, multiaddr: multiaddr.Multiaddr) -> None:
        pass


@dataclass
class DialState:
    """Dial state of one peer the connector keeps connected."""

    info: PeerInfo
    failures: int = 0
    next_attempt: float = 0.0  # trio time
    dialing: bool = False


def backoff(failures: int, jitter: float) -> float:
    """Seconds to wait after `failures` failed dials; `jitter` in [0, 1)."""
    base = min(MAX_BACKOFF_S, MIN_BACKOFF_S * float(2 ** max(failures - 1, 0)))
    return base * (0.75 + 0.5 * jitter)


def plan_dials(now: float, wanted: dict[ID, DialState], connected: set[ID]) -> list[ID]:
    """Peers to dial now: wanted, not connected, not being dialled, backoff over."""
    return [
        peer
        for peer, state in wanted.items()
        if peer not in connected and not state.dialing and now >= state.next_attempt
    ]


class Connector:
    """Dials bootstrap and discovered peers and redials them when they drop."""

    def __init__(self, host: Any, bootstrap: Iterable[str], *, discover_from_peerstore: bool) -> None:
        self.host = host
        self.discover_from_peerstore = discover_from_peerstore
        self.wanted: dict[ID, DialState] = {}
        for address in bootstrap:
            self.want(info_from_p2p_addr(multiaddr.Multiaddr(address)))

    def want(self, info: PeerInfo) -> None:
        if info.peer_id == self.host.get_id():
            return
        state = self.wanted.get(info.peer_id)
        if state is None:
            self.wanted[info.peer_id] = DialState(info)
        else:
            state.info = info

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            while True:
                if self.discover_from_peerstore:
                    self._discover()
                connected = set(self.host.get_connected_peers())
                for peer in plan_dials(trio.current_time(), self.wanted, connected):
                    state = self.wanted[peer]
                    state.dialing = True
                    nursery.start_soon(self._dial, state)
                await trio.sleep(0.5)

    def _discover(self) -> None:
        """Add peers that mDNS wrote into the peerstore."""
        peerstore = self.host.get_peerstore()
        try:
            peers = peerstore.peers_with_addrs()
        except RuntimeError:
            # mDNS adds peers from zeroconf's thread, which can change the
            # peerstore's dict while this iterates it; the next tick retries.
            return
        for peer in peers:
            if peer != self.host.get_id() and peer not in self.wanted:
                try:
                    addrs = peerstore.addrs(peer)
                except PeerStoreError:  # the addresses expired since peers_with_addrs
                    continue
                if addrs:
                    logger.info("Discovered peer %s at %s", peer, ", ".join(str(a) for a in addrs))
                    self.want(PeerInfo(peer, addrs))

    async def _dial(self, state: DialState) -> None:
        try:
            with trio.fail_after(DIAL_TIMEOUT_S):
                await self.host.connect(state.info)
        except Exception as exc:  # py-libp2p raises many unrelated types for a failed dial
            state.failures += 1
            delay = backoff(state.failures, random.random())
            state.next_attempt = trio.current_time() + delay
            level = logging.INFO if state.failures in (1, 5) or state.failures % 20 == 0 else logging.DEBUG
            logger.log(level, "Dial to %s failed (%s); retry in %.1f s", state.info.peer_id, exc or type(exc).__name__, delay)
        else:
            if state.failures:
                logger.info("Reconnected to %s after %d failed dials", state.info.peer_id, state.failures)
            state.failures = 0
            state.next_attempt = trio.current_time() + MIN_BACKOFF_S
        finally:
            state.dialing = False
