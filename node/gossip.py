"""Offer gossip: GossipSub topics, the validator, paced publishing, catch-up.

Topics: one for all families (`pmarket/offers/v1/all`) and one per family
(`pmarket/offers/v1/family/<hex>`), and an offer is published once to both.
A topic validator runs `protocol.offers.validate_offer` plus the book's
sequence check before anything is delivered or forwarded. Rejections are
counted by reason and logged at debug, rate-limited.

py-libp2p drops bursts of publishes without a trace (its per-peer outbound
queue holds 32 RPCs), so this node publishes from one queue with a minimum
interval between publishes. Receivers catch up on anything lost: on every
new connection, and every `sync_interval_s` with a random peer, a node pulls
the peer's live offers over `/pmarket/offers/sync/1.0.0` and validates each
exactly as if it had arrived by gossip.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import trio
from libp2p.custom_types import TProtocol
from libp2p.peer.id import ID
from libp2p.pubsub.gossipsub import GossipSub
from libp2p.pubsub.pubsub import Pubsub
from libp2p.tools.anyio_service import background_trio_service

from node.config import GossipSection
from node.logs import RateLimiter
from node.metrics import Metrics
from node.streams import InboundLimiter, StreamFailed, StreamIO
from protocol import limits
from protocol.codec import encode
from protocol.errors import Reason, RemoteProtocolError
from protocol.framing import frame
from protocol.messages import Offer, OfferSyncRequest
from protocol.offers import AddResult, OfferBook, ValidOffer, validate_offer

logger = logging.getLogger(__name__)

TOPIC_PREFIX = "pmarket/offers/v1/"
ALL_TOPIC = TOPIC_PREFIX + "all"
FAMILY_TOPIC_PREFIX = TOPIC_PREFIX + "family/"
SYNC_PROTOCOL = "/pmarket/offers/sync/1.0.0"
GOSSIP_PROTOCOLS = [TProtocol("/meshsub/1.1.0"), TProtocol("/meshsub/1.0.0")]
SYNC_TIMEOUT_S = 10.0


def family_topic(family: bytes) -> str:
    return FAMILY_TOPIC_PREFIX + family.hex()


def topic_family(topic: str) -> bytes | None:
    """Return the family of a family topic, or None for the all-families topic."""
    if topic.startswith(FAMILY_TOPIC_PREFIX):
        try:
            return bytes.fromhex(topic[len(FAMILY_TOPIC_PREFIX) :])
        except ValueError:
            return b""
    return None


class OfferGossip:
    """GossipSub for offers plus the offer book they fill."""

    def __init__(
        self,
        host: Any,
        *,
        config: GossipSection,
        metrics: Metrics,
        now_ms: Callable[[], int],
        limiter: InboundLimiter,
    ) -> None:
        self.host = host
        self.config = config
        self.metrics = metrics
        self.now_ms = now_ms
        self.book = OfferBook(max_offers=config.max_offers, max_per_seller=config.max_offers_per_seller)
        self.received_ms: dict[bytes, int] = {}
        self.router = GossipSub(
            protocols=GOSSIP_PROTOCOLS,
            degree=6,
            degree_low=4,
            degree_high=12,
            heartbeat_interval=config.heartbeat_s,  # type: ignore[arg-type]
            max_messages_per_topic_per_second=float(config.max_messages_per_second),
        )
        self.pubsub = Pubsub(host, self.router, strict_signing=True)
        host.set_stream_handler(SYNC_PROTOCOL, limiter.wrap(self._serve_sync, "offer sync"))
        self._validated: OrderedDict[bytes, ValidOffer] = OrderedDict()
        self._log_limit = RateLimiter()
        self._publish_send, self._publish_receive = trio.open_memory_channel[Offer](1024)
        self._nursery: trio.Nursery | None = None
        self._topics: set[str] = set()

    # Running -------------------------------------------------------------

    async def run(self, *, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        async with background_trio_service(self.pubsub), background_trio_service(self.router):
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                await self.pubsub.wait_until_ready()
                await self.join(ALL_TOPIC)
                for family in self.config.families:
                    await self.join_family(bytes.fromhex(family))
                nursery.start_soon(self._publish_loop)
                nursery.start_soon(self._expiry_loop)
                nursery.start_soon(self._periodic_sync_loop)
                task_status.started()
                await trio.sleep_forever()

    async def join(self, topic: str) -> None:
        """Subscribe to `topic` with the offer validator, and drain it into the book."""
        if topic in self._topics:
            return
        assert self._nursery is not None, "join() before run() started"
        self._topics.add(topic)
        self.pubsub.set_topic_validator(topic, self._validator(topic), False)
        subscription = await self.pubsub.subscribe(topic)
        self._nursery.start_soon(self._deliver_loop, subscription)

    async def join_family(self, family: bytes) -> None:
        await self.join(family_topic(family))

    # Validation ------------------------------------------------------------

    def _validator(self, topic: str) -> Callable[[ID, Any], bool]:
        family = topic_family(topic)

        def validate(forwarder: ID, message: Any) -> bool:
            try:
                valid = self._check(message.data, topic_family=family)
                if bytes(message.from_id) != valid.offer.seller:
                    raise RemoteProtocolError(Reason.WRONG_PEER, "offer published by another peer than its seller")
            except RemoteProtocolError as exc:
                self._count_rejection(exc, forwarder.to_bytes(), "gossip")
                return False
            self._remember(bytes(message.from_id) + bytes(message.seqno), valid)
            return True

        return validate

    def _check(self, data: bytes, *, topic_family: bytes | None) -> ValidOffer:
        valid = validate_offer(data, now_ms=self.now_ms(), topic_family=topic_family)
        self.book.check_sequence(valid)
        return valid

    def _remember(self, key: bytes, valid: ValidOffer) -> None:
        self._validated[key] = valid
        if len(self._validated) > 2048:
            self._validated.popitem(last=False)

    def _count_rejection(self, error: RemoteProtocolError, peer: bytes, via: str) -> None:
        reason = error.reason.name.lower()
        self.metrics.offers_rejected.labels(reason=reason).inc()
        if self._log_limit.allow((peer, reason)):
            logger.debug("Rejected offer from %s via %s: %s", peer.hex()[-12:], via, error)

    # Delivery into the book --------------------------------------------------

    async def _deliver_loop(self, subscription: Any) -> None:
        async for message in subscription:
            key = bytes(message.from_id) + bytes(message.seqno)
            valid = self._validated.get(key)
            self.metrics.bytes_in.inc(len(message.data))
            if valid is None:
                try:
                    valid = self._check(message.data, topic_family=None)
                except RemoteProtocolError as exc:
                    self._count_rejection(exc, bytes(message.from_id), "gossip")
                    continue
            self._add(valid, "gossip")

    def _add(self, valid: ValidOffer, via: str) -> AddResult | None:
        self.metrics.offers_seen.labels(via=via).inc()
        now = self.now_ms()
        try:
            result = self.book.add(valid, now_ms=now)
        except RemoteProtocolError as exc:
            self._count_rejection(exc, valid.offer.seller, via)
            return None
        if result is not AddResult.DUPLICATE:
            self.received_ms[valid.offer_id] = now
            self.metrics.offers_accepted.labels(via=via).inc()
            logger.debug("Offer %s from %s added via %s", valid.offer_id.hex()[:12], valid.offer.seller.hex()[-12:], via)
        self.metrics.offers_in_book.set(len(self.book))
        return result

    def add_local(self, offer: Offer) -> ValidOffer:
        """Validate one of this node's own offers and put it in the book."""
        valid = validate_offer(encode(offer), now_ms=self.now_ms())
        result = self._add(valid, "local")
        if result is None:
            raise RemoteProtocolError(Reason.STALE_SEQUENCE, "the book holds a newer offer for this key")
        return valid

    # Publishing --------------------------------------------------------------

    async def publish(self, offer: Offer) -> ValidOffer:
        """Add an own offer to the book and queue it for gossip."""
        valid = self.add_local(offer)
        await self._publish_send.send(offer)
        return valid

    async def _publish_loop(self) -> None:
        interval = self.config.publish_interval_ms / 1000
        async for offer in self._publish_receive:
            data = encode(offer)
            topics = [ALL_TOPIC, family_topic(offer.family)]
            try:
                await self.pubsub.publish(topics, data)
                self.metrics.bytes_out.inc(len(data))
            except Exception as exc:  # py-libp2p raises assorted errors on a closing swarm
                logger.warning("Publishing offer %s failed: %s", offer.offer_id.hex()[:12], exc)
            await trio.sleep(interval)

    async def _expiry_loop(self) -> None:
        while True:
            await trio.sleep(1.0)
            for valid in self.book.evict_expired(self.now_ms()):
                self.received_ms.pop(valid.offer_id, None)
            self.metrics.offers_in_book.set(len(self.book))

    # Catch-up over the sync protocol -------------------------------------------

    def on_connected(self, peer: ID) -> None:
        if self._nursery is not None:
            self._nursery.start_soon(self.sync_with, peer)

    async def _periodic_sync_loop(self) -> None:
        while True:
            await trio.sleep(self.config.sync_interval_s * random.uniform(0.8, 1.2))
            peers = self.host.get_connected_peers()
            if peers:
                await self.sync_with(random.choice(peers))

    async def sync_with(self, peer: ID) -> int:
        """Pull a peer's live offers; return how many were new to the book."""
        try:
            stream = await self.host.new_stream(peer, [SYNC_PROTOCOL])
        except Exception as exc:  # py-libp2p raises many error types when a dial or negotiation fails
            logger.debug("Offer sync with %s not possible: %s", peer, exc)
            return 0
        io = StreamIO(stream, on_bytes_in=self.metrics.bytes_in.inc, on_bytes_out=self.metrics.bytes_out.inc)
        added = 0
        try:
            await io.send(OfferSyncRequest((), self.config.max_offers))
            await io.close()
            while True:
                data = await io.read_frame(limits.MAX_OFFER_SIZE, SYNC_TIMEOUT_S)
                if data is None:
                    break
                try:
                    valid = self._check(data, topic_family=None)
                except RemoteProtocolError as exc:
                    self._count_rejection(exc, peer.to_bytes(), "sync")
                    continue
                if self._add(valid, "sync") in (AddResult.ADDED, AddResult.REPLACED):
                    added += 1
        except (StreamFailed, RemoteProtocolError) as exc:
            logger.debug("Offer sync with %s ended early: %s", peer, exc)
        if added:
            logger.info("Caught up %d offers from %s", added, peer)
        return added

    async def _serve_sync(self, stream: Any) -> None:
        io = StreamIO(stream, on_bytes_in=self.metrics.bytes_in.inc, on_bytes_out=self.metrics.bytes_out.inc)
        try:
            request = await io.expect(OfferSyncRequest, timeout=SYNC_TIMEOUT_S)
            families = request.families or None
            for valid in self.book.live(self.now_ms(), families)[: request.max_offers]:
                await io.write(frame(valid.data))
        except RemoteProtocolError as exc:
            logger.debug("Bad offer sync request from %s: %s", io.peer_id.hex()[-12:], exc)
            await io.send_error(exc)
        except StreamFailed as exc:
            logger.debug("Offer sync stream to %s failed: %s", io.peer_id.hex()[-12:], exc)
        finally:
            await io.close()
