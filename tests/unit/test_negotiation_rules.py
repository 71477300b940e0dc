"""Negotiation rules and pricing, as pure functions."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from protocol import limits
from protocol.errors import Reason, RemoteProtocolError
from protocol.identity import Signer
from protocol.messages import Bid, Counter, DealTerms, Offer, sign_accept, sign_bid, sign_counter
from protocol.negotiation import check_accept, check_first_bid, check_next_proposal
from protocol.pricing import PricingPolicy, SellerPricing, buyer_accepts, seller_price
from protocol.testvectors import BUYER_SEED, CREATED_MS, SELLER_SEED
from tests.unit.factories import examples

SELLER = Signer.from_seed(SELLER_SEED)
BUYER = Signer.from_seed(BUYER_SEED)
OTHER = Signer.from_seed(bytes(32))


def offer() -> Offer:
    value = examples()["offer"]
    assert isinstance(value, Offer)
    return value


def first_bid(**changes: object) -> Bid:
    value = examples()["bid"]
    assert isinstance(value, Bid)
    terms = dataclasses.replace(value.terms, **changes)  # type: ignore[arg-type]
    return sign_bid(terms, 0, BUYER)


def reason(error: pytest.ExceptionInfo[RemoteProtocolError]) -> Reason:
    return error.value.reason


def test_first_bid_accepted() -> None:
    check_first_bid(first_bid(), offer=offer(), offer_id=offer().offer_id, sender=BUYER.peer_id, now_ms=CREATED_MS)


def test_first_bid_from_another_peer() -> None:
    with pytest.raises(RemoteProtocolError) as error:
        check_first_bid(first_bid(), offer=offer(), offer_id=offer().offer_id, sender=OTHER.peer_id, now_ms=CREATED_MS)
    assert reason(error) == Reason.WRONG_PEER


@pytest.mark.parametrize("field", ["manifest_root", "total_bytes", "min_gain_ppm"])
def test_first_bid_terms_must_copy_offer(field: str) -> None:
    changed = {"manifest_root": b"\x09" * 32, "total_bytes": 1, "min_gain_ppm": 7}[field]
    with pytest.raises(RemoteProtocolError) as error:
        check_first_bid(
            first_bid(**{field: changed}), offer=offer(), offer_id=offer().offer_id, sender=BUYER.peer_id, now_ms=CREATED_MS
        )
    assert reason(error) == Reason.TERMS_MISMATCH


def test_first_bid_for_other_offer() -> None:
    with pytest.raises(RemoteProtocolError) as error:
        check_first_bid(first_bid(offer_id=b"\x01" * 32), offer=offer(), offer_id=offer().offer_id,
                        sender=BUYER.peer_id, now_ms=CREATED_MS)
    assert reason(error) == Reason.UNKNOWN_OFFER


def test_first_bid_with_expired_deal() -> None:
    with pytest.raises(RemoteProtocolError) as error:
        check_first_bid(first_bid(expires_ms=CREATED_MS - 1), offer=offer(), offer_id=offer().offer_id,
                        sender=BUYER.peer_id, now_ms=CREATED_MS)
    assert reason(error) == Reason.EXPIRED


def test_first_bid_with_far_expiry() -> None:
    far = CREATED_MS + limits.MAX_DEAL_LIFETIME_MS + 1
    with pytest.raises(RemoteProtocolError) as error:
        check_first_bid(first_bid(expires_ms=far), offer=offer(), offer_id=offer().offer_id,
                        sender=BUYER.peer_id, now_ms=CREATED_MS)
    assert reason(error) == Reason.INVALID_FIELD


def test_counter_may_change_only_price() -> None:
    bid = first_bid()
    good = sign_counter(dataclasses.replace(bid.terms, price=230), 1, SELLER)
    check_next_proposal(good, previous=bid, sender=SELLER.peer_id)
    other_root = sign_counter(dataclasses.replace(bid.terms, price=230, manifest_root=b"\x03" * 32), 1, SELLER)
    with pytest.raises(RemoteProtocolError) as error:
        check_next_proposal(other_root, previous=bid, sender=SELLER.peer_id)
    assert reason(error) == Reason.TERMS_MISMATCH


def test_counter_round_must_follow() -> None:
    bid = first_bid()
    skipped = sign_counter(dataclasses.replace(bid.terms, price=230), 2, SELLER)
    with pytest.raises(RemoteProtocolError) as error:
        check_next_proposal(skipped, previous=bid, sender=SELLER.peer_id)
    assert reason(error) == Reason.INVALID_FIELD


def test_round_over_limit_does_not_decode() -> None:
    from protocol.codec import decode, encode, pack

    raw = msgpack.unpackb(encode(first_bid()), raw=False)
    raw[3] = limits.MAX_NEGOTIATION_ROUNDS + 1
    with pytest.raises(RemoteProtocolError) as error:
        decode(pack(raw))
    assert reason(error) == Reason.INVALID_FIELD


def test_accept_must_carry_proposal() -> None:
    bid = first_bid()
    accept = sign_accept(bid, SELLER)
    check_accept(accept, proposal=bid, sender=SELLER.peer_id)
    other = sign_bid(dataclasses.replace(bid.terms, price=1), 0, BUYER)
    with pytest.raises(RemoteProtocolError) as error:
        check_accept(accept, proposal=other, sender=SELLER.peer_id)
    assert reason(error) == Reason.TERMS_MISMATCH


def test_accept_from_wrong_peer() -> None:
    bid = first_bid()
    with pytest.raises(RemoteProtocolError) as error:
        check_accept(sign_accept(bid, SELLER), proposal=bid, sender=OTHER.peer_id)
    assert reason(error) == Reason.WRONG_PEER


def test_two_counters_in_a_row() -> None:
    terms: DealTerms = first_bid().terms
    first: Counter = sign_counter(terms, 1, SELLER)
    second = sign_counter(terms, 2, SELLER)
    with pytest.raises(RemoteProtocolError) as error:
        check_next_proposal(second, previous=first, sender=SELLER.peer_id)
    assert reason(error) == Reason.INVALID_STATE


def test_nash_price_splits_surplus() -> None:
    pricing = SellerPricing(ask=100, reserve=60, policy=PricingPolicy.NASH, share=0.5)
    assert seller_price(pricing, 90) == 75
    assert seller_price(pricing, 60) == 60
    assert seller_price(pricing, 59) is None
    assert seller_price(pricing, 500) == 100  # capped at the ask


def test_share_sets_bargaining_power() -> None:
    greedy = SellerPricing(ask=1000, reserve=100, share=0.9)
    modest = SellerPricing(ask=1000, reserve=100, share=0.1)
    assert seller_price(greedy, 300) == 280
    assert seller_price(modest, 300) == 120


def test_fixed_price() -> None:
    pricing = SellerPricing(ask=100, reserve=100, policy=PricingPolicy.FIXED)
    assert seller_price(pricing, 150) == 100
    assert seller_price(pricing, 99) is None


def test_reserve_above_ask_is_misuse() -> None:
    with pytest.raises(Exception):  # noqa: B017 - LocalProtocolError
        SellerPricing(ask=10, reserve=11)


amounts = st.integers(0, 10**9)


@given(ask=amounts, reserve_fraction=st.floats(0, 1), value=amounts, share=st.floats(0, 1),
       policy=st.sampled_from(list(PricingPolicy)))
def test_agreed_price_between_reserve_and_value(
    ask: int, reserve_fraction: float, value: int, share: float, policy: PricingPolicy
) -> None:
    reserve = int(ask * reserve_fraction)
    pricing = SellerPricing(ask=ask, reserve=reserve, policy=policy, share=share)
    price = seller_price(pricing, value)
    if reserve > value:
        assert price is None
    if price is not None:
        assert reserve <= price
        assert price <= value
        assert price <= ask
        assert buyer_accepts(price, value)
