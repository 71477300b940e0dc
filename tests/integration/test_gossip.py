"""Offer gossip between real nodes on loopback."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import trio

from node.gossip import ALL_TOPIC, family_topic
from protocol.codec import encode, pack
from protocol.messages import Offer
from tests.integration.helpers import make_offer, offer_ids, start_node, wait_until

pytestmark = pytest.mark.network

FAMILY = b"\x01" * 32
OTHER_FAMILY = b"\x05" * 32


async def line(nursery: trio.Nursery, root: Path) -> tuple:
    a = await start_node(nursery, root, "a")
    b = await start_node(nursery, root, "b")
    c = await start_node(nursery, root, "c")
    await a.connect(b.addrs()[0])
    await c.connect(b.addrs()[0])
    await wait_until(lambda: len(b.gossip.pubsub.peers) == 2, what="pubsub streams at B")
    # The mesh forms on the first heartbeats.
    await trio.sleep(1.5)
    return a, b, c


async def test_offer_crosses_line(nursery: trio.Nursery, tmp_path: Path) -> None:
    a, b, c = await line(nursery, tmp_path)
    offer = make_offer(a)
    await a.publish_offer(offer)
    await wait_until(lambda: offer.offer_id in offer_ids(c), what="offer at C")
    assert offer.offer_id in offer_ids(b)
    assert c.gossip.received_ms[offer.offer_id] >= offer.created_ms
    assert a.status()["offers_accepted"] == {"local": 1}
    assert c.status()["offers_accepted"] == {"gossip": 1}


async def test_newer_sequence_replaces_older(nursery: trio.Nursery, tmp_path: Path) -> None:
    a, _b, c = await line(nursery, tmp_path)
    first, second = make_offer(a, seq=1), make_offer(a, seq=2, price=20)
    await a.publish_offer(first)
    await a.publish_offer(second)
    await wait_until(lambda: second.offer_id in offer_ids(c), what="second offer at C")
    assert first.offer_id not in offer_ids(c)
    assert len(c.gossip.book) == 1


async def test_invalid_offers_stop_at_first_hop(nursery: trio.Nursery, tmp_path: Path) -> None:
    a, b, c = await line(nursery, tmp_path)
    for node in (b, c):
        await node.gossip.join_family(FAMILY)
    await trio.sleep(1.5)
    # A misbehaves: it forwards anything, without its own validators.
    for topic in (ALL_TOPIC, family_topic(FAMILY)):
        a.gossip.pubsub.remove_topic_validator(topic)

    good = make_offer(a, key="good")
    bad_signature = dataclasses.replace(make_offer(a, key="forged"), price=999)
    expired = make_offer(a, key="expired", created_ms=a.now_ms() - 120_000, lifetime_ms=60_000)
    wrong_family = make_offer(a, key="elsewhere", family=OTHER_FAMILY)
    oversized = encode(make_offer(a, key="big")) + pack("x" * 70_000)

    bad = [
        ([ALL_TOPIC], encode(bad_signature)),
        ([ALL_TOPIC], encode(expired)),
        ([ALL_TOPIC], oversized),
        ([family_topic(FAMILY)], encode(wrong_family)),
    ]
    for topics, data in bad:
        await a.gossip.pubsub.publish(topics, data)
        await trio.sleep(0.05)
    await a.gossip.pubsub.publish([ALL_TOPIC], encode(good))

    await wait_until(lambda: good.offer_id in offer_ids(c), what="the valid offer at C")
    await trio.sleep(0.5)
    rejected = b.metrics.rejected_by_reason()
    assert rejected.get("bad_signature") == 1
    assert rejected.get("expired") == 1
    assert rejected.get("trailing_bytes", 0) + rejected.get("too_large", 0) == 1
    assert rejected.get("family_mismatch") == 1
    assert offer_ids(c) == {good.offer_id}
    assert c.metrics.rejected_by_reason() == {}


async def test_oversized_offer_reason(nursery: trio.Nursery, tmp_path: Path) -> None:
    a, b, _ = await line(nursery, tmp_path)
    a.gossip.pubsub.remove_topic_validator(ALL_TOPIC)
    huge = dataclasses.replace(make_offer(a), tensors=tuple(f"{i:0200d}" for i in range(400)))
    # encode() refuses an offer over the limit, so build the bytes by hand.
    raw = [huge.TYPE, huge.VERSION, *huge._wire_fields()]
    await a.gossip.pubsub.publish([ALL_TOPIC], pack(raw))
    await wait_until(lambda: b.metrics.rejected_by_reason().get("too_large") == 1, what="rejection at B")


async def test_late_joiner_catches_up(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = await start_node(nursery, tmp_path, "a")
    b = await start_node(nursery, tmp_path, "b")
    await a.connect(b.addrs()[0])
    offers = [make_offer(a, key=f"model-{i}") for i in range(5)]
    for offer in offers:
        await a.publish_offer(offer)
    await wait_until(lambda: len(b.gossip.book) == 5, what="five offers at B")

    d = await start_node(nursery, tmp_path, "d")
    await d.connect(b.addrs()[0])
    await wait_until(lambda: offer_ids(d) == offer_ids(b), timeout=5.0, what="D's book to match B's")
    assert d.metrics.total(d.metrics.offers_accepted) == 5
    assert d.status()["offers_accepted"] == {"sync": 5}


async def test_cut_node_catches_up(nursery: trio.Nursery, tmp_path: Path) -> None:
    a, b, c = await line(nursery, tmp_path)
    await c.disconnect(b.host.get_id())
    await wait_until(lambda: not c.host.get_connected_peers(), what="C cut off")

    missed = [make_offer(a, key=f"missed-{i}") for i in range(10)]
    for offer in missed:
        await a.publish_offer(offer)
    await wait_until(lambda: len(b.gossip.book) == 10, what="ten offers at B")
    assert offer_ids(c) == set()

    await c.connect(b.addrs()[0])
    await wait_until(lambda: offer_ids(c) == offer_ids(b), timeout=5.0, what="C's book to match B's")


async def test_burst_is_paced_not_dropped(nursery: trio.Nursery, tmp_path: Path) -> None:
    a, _b, c = await line(nursery, tmp_path)
    burst = [make_offer(a, key=f"burst-{i}") for i in range(60)]
    for offer in burst:
        await a.publish_offer(offer)
    expected = {offer.offer_id for offer in burst}
    await wait_until(lambda: expected <= offer_ids(c), timeout=15.0, what="all 60 offers at C")
    assert c.metrics.total(c.metrics.offers_accepted) == 60


async def test_book_evicts_expired_offer(nursery: trio.Nursery, tmp_path: Path) -> None:
    a = await start_node(nursery, tmp_path, "a")
    b = await start_node(nursery, tmp_path, "b")
    await a.connect(b.addrs()[0])
    await trio.sleep(1.5)
    short = make_offer(a, key="short", lifetime_ms=1_500)
    await a.publish_offer(short)
    await wait_until(lambda: short.offer_id in offer_ids(b), what="offer at B")
    await wait_until(lambda: short.offer_id not in offer_ids(b), timeout=5.0, what="eviction at B")


def test_offer_helper_signs_valid_offers(tmp_path: Path) -> None:
    # Guards the helper itself: an unsigned offer would make every test above vacuous.
    from node.datadir import DataDir, init
    from protocol.messages import verify_offer

    identity = init(DataDir(tmp_path / "x"))

    class Stub:
        peer_id = identity.peer_id

        def now_ms(self) -> int:
            return 1_767_225_600_000

    Stub.identity = identity  # type: ignore[attr-defined]
    offer = make_offer(Stub())  # type: ignore[arg-type]
    assert isinstance(offer, Offer)
    verify_offer(offer)
