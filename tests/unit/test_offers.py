"""Offer validation rules and the bounded offer book."""

from __future__ import annotations

import dataclasses

import pytest

from protocol import limits
from protocol.codec import encode
from protocol.errors import Reason, RemoteProtocolError
from protocol.identity import Signer
from protocol.messages import UNSIGNED, Offer, PaymentTerms, sign_offer
from protocol.offers import AddResult, OfferBook, ValidOffer, validate_offer

NOW = 1_767_225_600_000
SELLERS = [Signer.from_seed(bytes([i]) * 32) for i in range(1, 6)]


def make_offer(
    signer: Signer = SELLERS[0],
    *,
    key: str = "model",
    family: bytes = b"\x01" * 32,
    seq: int = 1,
    created_ms: int = NOW,
    expires_ms: int = NOW + 60_000,
) -> Offer:
    offer = Offer(
        seller=signer.peer_id,
        family=family,
        offer_key=key,
        task="digits",
        tensors=(),
        manifest_root=b"\x02" * 32,
        total_bytes=1000,
        chunk_size=limits.DEFAULT_CHUNK_SIZE,
        price=10,
        payment=PaymentTerms.DELIVERY,
        min_gain_ppm=0,
        metrics=(),
        seq=seq,
        created_ms=created_ms,
        expires_ms=expires_ms,
        signature=UNSIGNED,
    )
    return sign_offer(offer, signer)


def valid(offer: Offer) -> ValidOffer:
    return validate_offer(encode(offer), now_ms=NOW)


def reason(data: bytes, **kwargs: object) -> Reason:
    with pytest.raises(RemoteProtocolError) as info:
        validate_offer(data, **{"now_ms": NOW, **kwargs})  # type: ignore[arg-type]
    return info.value.reason


def test_valid_offer_accepted() -> None:
    offer = make_offer()
    result = valid(offer)
    assert result.offer == offer
    assert result.offer_id == offer.offer_id


def test_bad_signature_rejected() -> None:
    offer = dataclasses.replace(make_offer(), price=11)
    assert reason(encode(offer)) == Reason.BAD_SIGNATURE


def test_expired_rejected() -> None:
    offer = make_offer(created_ms=NOW - 120_000, expires_ms=NOW - 1)
    assert reason(encode(offer)) == Reason.EXPIRED


def test_expiring_now_rejected() -> None:
    offer = make_offer(created_ms=NOW - 120_000, expires_ms=NOW)
    assert reason(encode(offer)) == Reason.EXPIRED


def test_future_dated_rejected() -> None:
    created = NOW + limits.MAX_CLOCK_SKEW_MS + 1
    offer = make_offer(created_ms=created, expires_ms=created + 60_000)
    assert reason(encode(offer)) == Reason.NOT_YET_VALID


def test_small_clock_skew_accepted() -> None:
    created = NOW + limits.MAX_CLOCK_SKEW_MS
    valid(make_offer(created_ms=created, expires_ms=created + 60_000))


def test_lifetime_over_limit_rejected() -> None:
    offer = make_offer(expires_ms=NOW + limits.MAX_OFFER_LIFETIME_MS + 1)
    assert reason(encode(offer)) == Reason.INVALID_FIELD


def test_expiry_before_creation_rejected() -> None:
    offer = make_offer(created_ms=NOW + 10, expires_ms=NOW + 5)
    assert reason(encode(offer)) == Reason.INVALID_FIELD


def test_family_must_match_topic() -> None:
    offer = make_offer(family=b"\x01" * 32)
    assert reason(encode(offer), topic_family=b"\x09" * 32) == Reason.FAMILY_MISMATCH
    validate_offer(encode(offer), now_ms=NOW, topic_family=b"\x01" * 32)


def test_oversized_rejected() -> None:
    assert reason(encode(make_offer()) + b"\x00" * limits.MAX_OFFER_SIZE) == Reason.TOO_LARGE


def test_book_keeps_newest_sequence() -> None:
    book = OfferBook()
    first, second = make_offer(seq=1), make_offer(seq=2)
    assert book.add(valid(first), now_ms=NOW) == AddResult.ADDED
    assert book.add(valid(second), now_ms=NOW) == AddResult.REPLACED
    assert len(book) == 1
    assert book.get(second.offer_id) is not None
    assert book.get(first.offer_id) is None


def test_book_rejects_stale_sequence() -> None:
    book = OfferBook()
    book.add(valid(make_offer(seq=5)), now_ms=NOW)
    with pytest.raises(RemoteProtocolError) as info:
        book.add(valid(make_offer(seq=5, expires_ms=NOW + 70_000)), now_ms=NOW)
    assert info.value.reason == Reason.STALE_SEQUENCE
    with pytest.raises(RemoteProtocolError):
        book.add(valid(make_offer(seq=4)), now_ms=NOW)


def test_book_ignores_duplicate() -> None:
    book = OfferBook()
    offer = valid(make_offer())
    book.add(offer, now_ms=NOW)
    assert book.add(offer, now_ms=NOW) == AddResult.DUPLICATE
    assert len(book) == 1


def test_book_keys_are_separate() -> None:
    book = OfferBook()
    book.add(valid(make_offer(key="a")), now_ms=NOW)
    book.add(valid(make_offer(key="b")), now_ms=NOW)
    book.add(valid(make_offer(SELLERS[1], key="a")), now_ms=NOW)
    book.add(valid(make_offer(key="a", family=b"\x03" * 32)), now_ms=NOW)
    assert len(book) == 4


def test_book_evicts_expired() -> None:
    book = OfferBook()
    short = valid(make_offer(key="short", expires_ms=NOW + 1_000))
    long = valid(make_offer(key="long", expires_ms=NOW + 9_000))
    book.add(short, now_ms=NOW)
    book.add(long, now_ms=NOW)
    assert book.evict_expired(NOW + 999) == []
    assert book.evict_expired(NOW + 1_000) == [short]
    assert [v.offer_id for v in book] == [long.offer_id]


def test_book_full_evicts_first_to_expire() -> None:
    book = OfferBook(max_offers=3, max_per_seller=10)
    offers = [valid(make_offer(SELLERS[i], expires_ms=NOW + 10_000 * (i + 1))) for i in range(3)]
    for offer in offers:
        book.add(offer, now_ms=NOW)
    newcomer = valid(make_offer(SELLERS[3], expires_ms=NOW + 50_000))
    assert book.add(newcomer, now_ms=NOW) == AddResult.ADDED
    assert len(book) == 3
    assert book.get(offers[0].offer_id) is None
    assert book.get(newcomer.offer_id) is not None


def test_book_full_rejects_shorter_lived_offer() -> None:
    book = OfferBook(max_offers=2, max_per_seller=10)
    for i in range(2):
        book.add(valid(make_offer(SELLERS[i], expires_ms=NOW + 50_000)), now_ms=NOW)
    with pytest.raises(RemoteProtocolError) as info:
        book.add(valid(make_offer(SELLERS[2], expires_ms=NOW + 1_000)), now_ms=NOW)
    assert info.value.reason == Reason.BOOK_FULL
    assert len(book) == 2


def test_book_limits_offers_per_seller() -> None:
    book = OfferBook(max_offers=100, max_per_seller=2)
    first = valid(make_offer(key="a", expires_ms=NOW + 5_000))
    book.add(first, now_ms=NOW)
    book.add(valid(make_offer(key="b", expires_ms=NOW + 9_000)), now_ms=NOW)
    book.add(valid(make_offer(key="c", expires_ms=NOW + 9_000)), now_ms=NOW)
    assert len(book) == 2
    assert book.get(first.offer_id) is None


def test_book_live_filters_family() -> None:
    book = OfferBook()
    book.add(valid(make_offer(key="a", family=b"\x01" * 32)), now_ms=NOW)
    book.add(valid(make_offer(key="b", family=b"\x02" * 32)), now_ms=NOW)
    assert len(book.live(NOW)) == 2
    assert [v.offer.offer_key for v in book.live(NOW, [b"\x02" * 32])] == ["b"]


def test_book_heap_stays_bounded() -> None:
    book = OfferBook()
    for seq in range(1, 500):
        book.add(valid(make_offer(seq=seq)), now_ms=NOW)
    assert len(book) == 1
    assert len(book._expiry) <= 2 * len(book) + 65


def test_find_prefix() -> None:
    book = OfferBook()
    offer = valid(make_offer())
    book.add(offer, now_ms=NOW)
    assert book.find_prefix(offer.offer_id.hex()[:8].upper()) == [offer]
