"""Receipt rules against deal terms, the ledger chain and balances."""

from __future__ import annotations

import dataclasses

import pytest

from protocol.errors import Reason, RemoteProtocolError
from protocol.framing import FrameReader, decode_uvarint, encode_uvarint, frame
from protocol.ledger import (
    GENESIS,
    ChainError,
    LedgerEntry,
    balances,
    chain_hash,
    check_receipt,
    verify_chain,
)
from protocol.messages import Accept, DealTerms, Outcome, PaymentTerms, Receipt
from tests.unit.factories import examples


def deal() -> tuple[DealTerms, Receipt]:
    accept, receipt = examples()["accept"], examples()["receipt"]
    assert isinstance(accept, Accept) and isinstance(receipt, Receipt)
    return accept.terms, receipt


def refusal(receipt: Receipt, reason: Reason, gain_ppm: int) -> Receipt:
    return dataclasses.replace(receipt, outcome=Outcome.REFUSED, amount=0, reason=reason, gain_ppm=gain_ppm)


def test_paid_receipt_matches_terms() -> None:
    terms, receipt = deal()
    check_receipt(receipt, terms)


def test_wrong_amount_rejected() -> None:
    terms, receipt = deal()
    with pytest.raises(RemoteProtocolError) as info:
        check_receipt(dataclasses.replace(receipt, amount=terms.price - 1), terms)
    assert info.value.reason == Reason.AMOUNT_MISMATCH


def test_receipt_for_other_deal_rejected() -> None:
    terms, receipt = deal()
    with pytest.raises(RemoteProtocolError) as info:
        check_receipt(dataclasses.replace(receipt, deal_id=b"\x07" * 32), terms)
    assert info.value.reason == Reason.UNKNOWN_DEAL


def test_gain_refusal_allowed_below_minimum() -> None:
    terms, receipt = deal()
    assert terms.payment == PaymentTerms.GAIN
    check_receipt(refusal(receipt, Reason.GAIN_BELOW_MINIMUM, terms.min_gain_ppm - 1), terms)


def test_gain_refusal_rejected_at_minimum() -> None:
    terms, receipt = deal()
    with pytest.raises(RemoteProtocolError) as info:
        check_receipt(refusal(receipt, Reason.GAIN_BELOW_MINIMUM, terms.min_gain_ppm), terms)
    assert info.value.reason == Reason.REFUSAL_NOT_ALLOWED


def test_delivery_terms_allow_only_defect_refusals() -> None:
    terms, receipt = deal()
    delivery = dataclasses.replace(terms, payment=PaymentTerms.DELIVERY)
    receipt = dataclasses.replace(receipt, deal_id=delivery.deal_id)
    check_receipt(refusal(receipt, Reason.NON_FINITE, 0), delivery)
    with pytest.raises(RemoteProtocolError):
        check_receipt(refusal(receipt, Reason.GAIN_BELOW_MINIMUM, -5), delivery)


def test_refusal_must_pay_zero() -> None:
    terms, receipt = deal()
    bad = dataclasses.replace(refusal(receipt, Reason.NON_FINITE, 0), amount=5)
    with pytest.raises(RemoteProtocolError) as info:
        check_receipt(bad, terms)
    assert info.value.reason == Reason.AMOUNT_MISMATCH


def chain(receipts: list[Receipt]) -> list[LedgerEntry]:
    entries, previous = [], GENESIS
    for index, receipt in enumerate(receipts):
        entry_hash = chain_hash(previous, receipt.receipt_id)
        entries.append(LedgerEntry(index, receipt, previous, entry_hash))
        previous = entry_hash
    return entries


def test_chain_verifies() -> None:
    _, receipt = deal()
    other = dataclasses.replace(receipt, created_ms=receipt.created_ms + 1)
    verify_chain(chain([receipt, other]))


def test_chain_detects_dropped_entry() -> None:
    _, receipt = deal()
    receipts = [dataclasses.replace(receipt, created_ms=receipt.created_ms + i) for i in range(3)]
    entries = chain(receipts)
    dropped = [entries[0], dataclasses.replace(entries[2], index=1)]
    with pytest.raises(ChainError):
        verify_chain(dropped)


def test_chain_detects_changed_receipt() -> None:
    _, receipt = deal()
    entries = chain([receipt])
    changed = [dataclasses.replace(entries[0], receipt=dataclasses.replace(receipt, amount=1))]
    with pytest.raises(ChainError):
        verify_chain(changed)


def test_balances_sum_per_party() -> None:
    _, receipt = deal()
    seller_view = balances([receipt], receipt.seller)
    buyer_view = balances([receipt], receipt.buyer)
    assert seller_view == {receipt.buyer: receipt.amount}
    assert buyer_view == {receipt.seller: -receipt.amount}
    assert balances([refusal(receipt, Reason.NON_FINITE, 0)], receipt.seller) == {}


@pytest.mark.parametrize("value", [0, 1, 127, 128, 300, 2**32, 2**62])
def test_uvarint_round_trip(value: int) -> None:
    encoded = encode_uvarint(value)
    assert decode_uvarint(encoded) == (value, len(encoded))
    assert decode_uvarint(encoded[:-1]) is None


def test_uvarint_rejects_redundant_zero() -> None:
    with pytest.raises(RemoteProtocolError):
        decode_uvarint(bytes([0x81, 0x00]))


def test_frame_reader_splits_frames() -> None:
    reader = FrameReader(max_frame=10)
    data = frame(b"abc") + frame(b"") + frame(b"0123456789")
    for byte in data:
        reader.feed(bytes([byte]))
    # Everything was fed one byte at a time; three frames come out in order.
    assert reader.next_frame() == b"abc"
    assert reader.next_frame() == b""
    assert reader.next_frame() == b"0123456789"
    assert reader.next_frame() is None


def test_frame_reader_rejects_oversized() -> None:
    reader = FrameReader(max_frame=3)
    reader.feed(frame(b"abcd"))
    with pytest.raises(RemoteProtocolError) as info:
        reader.next_frame()
    assert info.value.reason == Reason.TOO_LARGE
