"""Real nodes on loopback inside one trio process, for integration tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import trio

from node.config import Config
from node.daemon import Node, NodeOptions
from node.datadir import DataDir, init
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
