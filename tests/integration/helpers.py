"""Real nodes on loopback inside one trio process, for integration tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from node.config import Config
from node.daemon import Node, NodeOptions
from node.datadir import DataDir, init, load_identity
from protocol import limits
from protocol.messages import UNSIGNED, Offer, PaymentTerms, sign_offer


def node_config() -> Config:
    config = Config()
    config.gossip.publish_interval_ms = 10
    config.gossip.sync_interval_s = 3600.0  # tests trigger catch-up explicitly
    return config


async def start_node(nursery: trio.Nursery, root: Path, name: str, **options: object) -> Node:
    data_dir = DataDir(root / name)
    identity = init(data_dir)
    node = Node(data_dir, node_config(), identity, NodeOptions(**options))  # type: ignore[arg-type]
    await nursery.start(node.run)
    return node


async def wait_until(predicate: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `predicate` until true; real sockets, so real time."""
    with trio.move_on_after(timeout):
        while not predicate():
            await trio.sleep(0.05)
        return
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def make_offer(
    node: Node,
    *,
    key: str = "model",
    family: bytes = b"\x01" * 32,
    seq: int = 1,
    lifetime_ms: int = 600_000,
    created_ms: int | None = None,
    price: int = 10,
) -> Offer:
    created = node.now_ms() if created_ms is None else created_ms
    offer = Offer(
        seller=node.peer_id,
        family=family,
        offer_key=key,
        task="",
        tensors=(),
        manifest_root=b"\x02" * 32,
        total_bytes=1000,
        chunk_size=limits.DEFAULT_CHUNK_SIZE,
        price=price,
        payment=PaymentTerms.DELIVERY,
        min_gain_ppm=0,
        metrics=(),
        seq=seq,
        created_ms=created,
        expires_ms=created + lifetime_ms,
        signature=UNSIGNED,
    )
    return sign_offer(offer, node.identity.signer)


def offer_ids(node: Node) -> set[bytes]:
    return {valid.offer_id for valid in node.gossip.book}


def trading_config(*, index: int, orgs: int = 2, chunk_size: int = 64 * 1024) -> Config:
    """A node of the digits task holding shard `index` of a complementary split."""
    config = node_config()
    config.task.name = "digits"
    config.task.orgs = orgs
    config.task.index = index
    config.task.split = "complementary"
    config.task.deduction = 0.1
    config.task.seed = 0
    config.transfer.chunk_size = chunk_size
    config.workers.device = "cpu"
    return config


async def start_trading_node(
    nursery: trio.Nursery, root: Path, name: str, *, index: int, orgs: int = 2, config: Config | None = None, **options: object
) -> Node:
    data_dir = DataDir(root / name)
    identity = init(data_dir) if not data_dir.exists() else load_identity(data_dir)
    node = Node(data_dir, config or trading_config(index=index, orgs=orgs), identity, NodeOptions(**options))  # type: ignore[arg-type]
    await nursery.start(node.run)
    return node


async def wait_for_offer(node: Node, offer_id: bytes, timeout: float = 10.0) -> None:
    await wait_until(lambda: offer_id in offer_ids(node), timeout, f"offer {offer_id.hex()[:12]}")


async def wait_for_deal_end(node: Node, deal_id: bytes, timeout: float = 60.0) -> None:
    """Wait until the node's deal is in a terminal state."""

    def done() -> bool:
        record = node.trades.deals.get(deal_id)
        return record is not None and record.terminal

    await wait_until(done, timeout, f"deal {deal_id.hex()[:12]} to end")
