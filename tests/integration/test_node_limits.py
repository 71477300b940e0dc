"""Connection and stream limits, reconnect with backoff, and quiet logs."""

from __future__ import annotations

import itertools
import logging
import socket
from pathlib import Path

import pytest
import trio

from node.config import Config
from node.daemon import Node, NodeOptions
from node.datadir import DataDir, init, load_identity
from node.gossip import ALL_TOPIC, SYNC_PROTOCOL
from node.host import DialState, backoff, plan_dials
from protocol.codec import encode
from tests.integration.helpers import make_offer, node_config, start_node, wait_until

pytestmark = pytest.mark.network


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def test_connection_limit(nursery: trio.Nursery, tmp_path: Path) -> None:
    config = node_config()
    config.limits.max_connections = 1
    data_dir = DataDir(tmp_path / "b")
    b = Node(data_dir, config, init(data_dir), NodeOptions())
    await nursery.start(b.run)
    a = await start_node(nursery, tmp_path, "a")
    c = await start_node(nursery, tmp_path, "c")
    await a.connect(b.addrs()[0])
    await wait_until(lambda: len(b.host.get_connected_peers()) == 1, what="A connected to B")
    await c.connect(b.addrs()[0])
    await wait_until(lambda: b.host.get_id() not in c.host.get_connected_peers(), what="B closing C's connection")
    assert b.host.get_connected_peers() == [a.host.get_id()]


async def test_inbound_stream_limit_per_peer(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = await start_node(nursery, tmp_path, "a")
    b = await start_node(nursery, tmp_path, "b")
    await a.connect(b.addrs()[0])
    limit = b.config.limits.max_inbound_streams_per_peer
    # B keeps `limit` streams open waiting for a request and resets the rest,
    # which A sees either while the stream is negotiated or on its first read.
    reset = 0
    for _ in range(limit + 4):
        try:
            stream = await a.host.new_stream(b.host.get_id(), [SYNC_PROTOCOL])
        except Exception:
            reset += 1
            continue
        with trio.move_on_after(0.5):
            try:
                await stream.read(1)
            except Exception:
                reset += 1
    assert reset == 4


async def test_bootstrap_peer_redialled(nursery: trio.Nursery, tmp_path: Path) -> None:
    port = free_port()
    a_dir = DataDir(tmp_path / "a")
    init(a_dir)
    listen = [f"/ip4/127.0.0.1/tcp/{port}"]
    a = Node(a_dir, node_config(), load_identity(a_dir), NodeOptions(listen=listen))
    await nursery.start(a.run)

    b = await start_node(nursery, tmp_path, "b", bootstrap=[a.addrs()[0]])
    await wait_until(lambda: a.host.get_id() in b.host.get_connected_peers(), what="B dials its bootstrap peer")

    a.request_stop()
    await wait_until(lambda: a.host.get_id() not in b.host.get_connected_peers(), what="B sees A go")
    again = Node(a_dir, node_config(), load_identity(a_dir), NodeOptions(listen=listen))
    await nursery.start(again.run)
    await wait_until(lambda: again.host.get_id() in b.host.get_connected_peers(), timeout=20.0, what="B redials A")


async def test_rejections_do_not_flood_log(
    nursery: trio.Nursery, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="node")
    a = await start_node(nursery, tmp_path, "a")
    b = await start_node(nursery, tmp_path, "b")
    await a.connect(b.addrs()[0])
    await trio.sleep(1.5)
    a.gossip.pubsub.remove_topic_validator(ALL_TOPIC)
    expired = [make_offer(a, key=f"old-{i}", created_ms=a.now_ms() - 120_000, lifetime_ms=60_000) for i in range(40)]
    for offer in expired:
        await a.gossip.pubsub.publish([ALL_TOPIC], encode(offer))
        await trio.sleep(0.02)
    await wait_until(lambda: b.metrics.rejected_by_reason().get("expired") == 40, what="40 rejections at B")
    # A logs its own deliveries of these offers too, so both nodes write
    # lines; each writes at most its burst and suppresses the rest.
    rejection_lines = [r for r in caplog.records if r.name == "node.gossip" and "Rejected offer" in r.getMessage()]
    burst = b.gossip._log_limit.burst
    assert 1 <= len(rejection_lines) <= 2 * burst
    assert b.gossip._log_limit.suppressed == 40 - burst
    assert all(r.levelno == logging.DEBUG for r in rejection_lines)
    assert not [r for r in caplog.records if r.name.startswith("node") and r.levelno >= logging.WARNING]


def test_backoff_grows_and_caps() -> None:
    delays = [backoff(n, 0.5) for n in range(1, 12)]
    assert delays[0] == pytest.approx(1.0)
    assert delays[1] == pytest.approx(2.0)
    assert all(later >= earlier for earlier, later in itertools.pairwise(delays))
    assert delays[-1] == pytest.approx(60.0)
    assert backoff(3, 0.0) == pytest.approx(4.0 * 0.75)
    assert backoff(3, 0.999) < 4.0 * 1.25


def test_plan_dials_skips_connected_and_waiting() -> None:
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import PeerInfo

    peers = [ID(bytes([0, 4, i, i, i, i])) for i in range(4)]
    wanted = {
        peers[0]: DialState(PeerInfo(peers[0], [])),
        peers[1]: DialState(PeerInfo(peers[1], []), next_attempt=50.0),
        peers[2]: DialState(PeerInfo(peers[2], []), dialing=True),
        peers[3]: DialState(PeerInfo(peers[3], [])),
    }
    assert plan_dials(10.0, wanted, connected={peers[3]}) == [peers[0]]
    assert plan_dials(50.0, wanted, connected=set()) == [peers[0], peers[1], peers[3]]


def test_config_rejects_unknown_key() -> None:
    from node.config import ConfigError, parse

    with pytest.raises(ConfigError, match="unknown key 'listn'"):
        parse('[node]\nlistn = []\n')
    with pytest.raises(ConfigError, match="must end in /p2p"):
        parse('[node]\nbootstrap = ["/ip4/127.0.0.1/tcp/4001"]\n')
    with pytest.raises(ConfigError, match="max_connections must be positive"):
        parse("[limits]\nmax_connections = 0\n")
    assert isinstance(parse(""), Config)
