"""Offer validation and the offer book.

`validate_offer` is the single check an offer passes before a node keeps or
forwards it, whether it came by gossip or by a catch-up pull: size, strict
decoding, signature, lifetime, expiry, creation time not in the future, and,
when it arrived on a family topic, that its family is the topic's.

The book keeps the newest offer per (seller, family, offer key), ordered by
the seller's sequence number. It is bounded:

* at most `max_per_seller` offers per seller; a new key from a seller at the
  limit replaces that seller's offer that expires first;
* at most `max_offers` offers in all; when full, the offer that expires first
  is evicted, unless the new offer itself expires first, in which case the new
  offer is rejected with BOOK_FULL.

Expired offers are evicted by `evict_expired(now_ms)`. Nothing here reads a
clock: every time is an argument.
"""

from __future__ import annotations

import enum
import heapq
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from protocol import limits
from protocol.codec import decode_signed
from protocol.errors import Reason, RemoteProtocolError
from protocol.identity import verify
from protocol.messages import OFFER_ID_TAG, OFFER_TAG, Offer, tagged_hash

OfferKey = tuple[bytes, bytes, str]  # (seller, family, offer_key)


@dataclass(frozen=True, slots=True)
class ValidOffer:
    """An offer that passed `validate_offer`, with its ID and wire bytes."""

    offer: Offer
    offer_id: bytes
    data: bytes

    @property
    def key(self) -> OfferKey:
        return (self.offer.seller, self.offer.family, self.offer.offer_key)


def validate_offer(
    data: bytes,
    *,
    now_ms: int,
    topic_family: bytes | None = None,
    max_clock_skew_ms: int = limits.MAX_CLOCK_SKEW_MS,
) -> ValidOffer:
    """Decode and check an offer from a peer; raise RemoteProtocolError if invalid."""
    offer, body = decode_signed(Offer, data)
    if topic_family is not None and offer.family != topic_family:
        raise RemoteProtocolError(
            Reason.FAMILY_MISMATCH,
            f"offer for family {offer.family.hex()[:16]} arrived on the topic of {topic_family.hex()[:16]}",
        )
    if offer.expires_ms <= offer.created_ms:
        raise RemoteProtocolError(Reason.INVALID_FIELD, "offer expires before it is created")
    if offer.expires_ms - offer.created_ms > limits.MAX_OFFER_LIFETIME_MS:
        raise RemoteProtocolError(
            Reason.INVALID_FIELD,
            f"offer lives {offer.expires_ms - offer.created_ms} ms, more than {limits.MAX_OFFER_LIFETIME_MS}",
        )
    if offer.expires_ms <= now_ms:
        raise RemoteProtocolError(Reason.EXPIRED, f"offer expired at {offer.expires_ms}, now is {now_ms}")
    if offer.created_ms > now_ms + max_clock_skew_ms:
        raise RemoteProtocolError(
            Reason.NOT_YET_VALID, f"offer is created at {offer.created_ms}, in the future of {now_ms}"
        )
    verify(offer.seller, OFFER_TAG, body, offer.signature)
    return ValidOffer(offer, tagged_hash(OFFER_ID_TAG, data), data)


class AddResult(enum.Enum):
    ADDED = "added"
    REPLACED = "replaced"  # superseded an older sequence number for the same key
    DUPLICATE = "duplicate"  # this exact offer is already in the book


class OfferBook:
    """Newest valid offer per (seller, family, offer key), bounded in size."""

    def __init__(self, *, max_offers: int = 10_000, max_per_seller: int = 64) -> None:
        self.max_offers = max_offers
        self.max_per_seller = max_per_seller
        self._by_key: dict[OfferKey, ValidOffer] = {}
        self._by_id: dict[bytes, ValidOffer] = {}
        self._per_seller: dict[bytes, set[OfferKey]] = {}
        # Min-heap of (expires_ms, offer_id); entries of removed offers are
        # skipped lazily when they reach the top.
        self._expiry: list[tuple[int, bytes]] = []

    def __len__(self) -> int:
        return len(self._by_key)

    def __iter__(self) -> Iterator[ValidOffer]:
        return iter(list(self._by_key.values()))

    def get(self, offer_id: bytes) -> ValidOffer | None:
        return self._by_id.get(offer_id)

    def find_prefix(self, prefix_hex: str) -> list[ValidOffer]:
        """Offers whose hex ID starts with `prefix_hex` (as a CLI accepts)."""
        prefix_hex = prefix_hex.lower()
        return [v for v in self._by_id.values() if v.offer_id.hex().startswith(prefix_hex)]

    def check_sequence(self, valid: ValidOffer) -> None:
        """Raise STALE_SEQUENCE if the book holds a newer or conflicting offer for this key."""
        current = self._by_key.get(valid.key)
        if current is None or current.offer_id == valid.offer_id:
            return
        if valid.offer.seq <= current.offer.seq:
            raise RemoteProtocolError(
                Reason.STALE_SEQUENCE,
                f"offer has sequence {valid.offer.seq}, the book holds {current.offer.seq} for the same key",
            )

    def add(self, valid: ValidOffer, *, now_ms: int) -> AddResult:
        """Insert a validated offer; raise RemoteProtocolError if it cannot be kept."""
        if valid.offer_id in self._by_id:
            return AddResult.DUPLICATE
        if valid.offer.expires_ms <= now_ms:
            raise RemoteProtocolError(Reason.EXPIRED, "offer expired before it reached the book")
        self.check_sequence(valid)

        current = self._by_key.get(valid.key)
        if current is not None:
            self._remove(current)
            self._insert(valid)
            return AddResult.REPLACED

        seller_keys = self._per_seller.get(valid.offer.seller, set())
        if len(seller_keys) >= self.max_per_seller:
            oldest = min((self._by_key[k] for k in seller_keys), key=lambda v: v.offer.expires_ms)
            self._remove(oldest)
        if len(self._by_key) >= self.max_offers:
            first = self._first_to_expire()
            if first is not None and first.offer.expires_ms > valid.offer.expires_ms:
                raise RemoteProtocolError(Reason.BOOK_FULL, "offer book is full of offers that live longer")
            if first is not None:
                self._remove(first)
        self._insert(valid)
        return AddResult.ADDED

    def remove(self, offer_id: bytes) -> bool:
        valid = self._by_id.get(offer_id)
        if valid is None:
            return False
        self._remove(valid)
        return True

    def evict_expired(self, now_ms: int) -> list[ValidOffer]:
        """Remove and return every offer with expires_ms <= now_ms."""
        evicted: list[ValidOffer] = []
        while self._expiry and self._expiry[0][0] <= now_ms:
            _, offer_id = heapq.heappop(self._expiry)
            valid = self._by_id.get(offer_id)
            if valid is not None:
                self._remove(valid)
                evicted.append(valid)
        return evicted

    def live(self, now_ms: int, families: Iterable[bytes] | None = None) -> list[ValidOffer]:
        """Unexpired offers, of the given families only when some are given."""
        wanted = set(families) if families is not None else None
        return [
            v
            for v in self._by_key.values()
            if v.offer.expires_ms > now_ms and (wanted is None or v.offer.family in wanted)
        ]

    def _first_to_expire(self) -> ValidOffer | None:
        while self._expiry:
            _, offer_id = self._expiry[0]
            valid = self._by_id.get(offer_id)
            if valid is not None:
                return valid
            heapq.heappop(self._expiry)
        return None

    def _insert(self, valid: ValidOffer) -> None:
        self._by_key[valid.key] = valid
        self._by_id[valid.offer_id] = valid
        self._per_seller.setdefault(valid.offer.seller, set()).add(valid.key)
        heapq.heappush(self._expiry, (valid.offer.expires_ms, valid.offer_id))
        if len(self._expiry) > 2 * len(self._by_id) + 64:
            # Replaced offers leave stale entries; rebuild so the heap stays
            # proportional to the book.
            self._expiry = [(v.offer.expires_ms, i) for i, v in self._by_id.items()]
            heapq.heapify(self._expiry)

    def _remove(self, valid: ValidOffer) -> None:
        # The heap entry stays until it reaches the top or the heap is rebuilt.
        self._by_key.pop(valid.key, None)
        self._by_id.pop(valid.offer_id, None)
        keys = self._per_seller.get(valid.offer.seller)
        if keys is not None:
            keys.discard(valid.key)
            if not keys:
                del self._per_seller[valid.offer.seller]
