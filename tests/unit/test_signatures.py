"""Signatures: every signed field is covered, and tags keep types apart."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable
from typing import Any

import pytest

from protocol.codec import Bool, Bytes, Enum, Int, Kind, ListOf, Message, Nested, Str, TupleOf, UInt
from protocol.errors import RemoteProtocolError
from protocol.identity import (
    Signer,
    peer_id_from_text,
    peer_id_to_text,
    public_key_from_peer_id,
    verify,
)
from protocol.messages import (
    ACCEPT_TAG,
    BID_TAG,
    COUNTER_TAG,
    COUNTERSIGN_TAG,
    OFFER_TAG,
    RECEIPT_TAG,
    REJECT_TAG,
    Accept,
    Bid,
    Counter,
    Offer,
    Receipt,
    Reject,
    verify_accept,
    verify_offer,
    verify_proposal,
    verify_receipt,
    verify_reject,
)
from tests.unit.factories import examples

VERIFIERS: dict[type[Message], Callable[[Any], None]] = {
    Offer: verify_offer,
    Bid: verify_proposal,
    Counter: verify_proposal,
    Accept: verify_accept,
    Reject: verify_reject,
    Receipt: verify_receipt,
}


def mutate(kind: Kind, value: Any) -> Any:
    """A different value of the same kind, valid wherever possible."""
    if isinstance(kind, Bool):
        return not value
    if isinstance(kind, Enum):
        members = list(kind.enum_type)
        return members[(members.index(value) + 1) % len(members)]
    if isinstance(kind, Int):
        return value + 1 if value < kind.maximum else value - 1
    if isinstance(kind, UInt):
        return value + 1 if value < kind.maximum else value - 1
    if isinstance(kind, Bytes):
        if not value:
            return b"\x01"
        return bytes([value[0] ^ 0x01]) + value[1:]
    if isinstance(kind, Str):
        if not value:
            return "a"
        last = "b" if value.endswith("a") else "a"
        return value[:-1] + last
    if isinstance(kind, ListOf):
        if value:
            return (mutate(kind.item, value[0]), *value[1:])
        return (sample_of(kind.item),)
    if isinstance(kind, TupleOf):
        return (mutate(kind.items[0], value[0]), *value[1:])
    if isinstance(kind, Nested):
        name, inner = kind.struct._spec()[0]
        return dataclasses.replace(value, **{name: mutate(inner, getattr(value, name))})
    raise AssertionError(f"no mutation for {kind!r}")


def sample_of(kind: Kind) -> Any:
    if isinstance(kind, Str):
        return "x"
    if isinstance(kind, Bytes):
        return b"\x01" * (kind.sizes[0] if kind.sizes else 1)
    raise AssertionError(f"no sample for {kind!r}")


def signed_examples() -> list[tuple[str, Message]]:
    return [(name, m) for name, m in examples().items() if type(m) in VERIFIERS]


@pytest.mark.parametrize(("name", "message"), signed_examples())
def test_example_verifies(name: str, message: Message) -> None:
    VERIFIERS[type(message)](message)


def tamper_cases() -> list[tuple[str, Message, str]]:
    cases = []
    for name, message in signed_examples():
        for field_name, _ in message._spec():
            cases.append((name, message, field_name))
    return cases


@pytest.mark.parametrize(("name", "message", "field_name"), tamper_cases())
def test_tampered_field_fails(name: str, message: Message, field_name: str) -> None:
    kind = dict(message._spec())[field_name]
    tampered = dataclasses.replace(message, **{field_name: mutate(kind, getattr(message, field_name))})  # type: ignore[type-var]
    assert tampered != message
    with pytest.raises(RemoteProtocolError):
        VERIFIERS[type(message)](tampered)


TAGS = [OFFER_TAG, BID_TAG, COUNTER_TAG, ACCEPT_TAG, REJECT_TAG, RECEIPT_TAG, COUNTERSIGN_TAG]


@pytest.mark.parametrize(("signed_as", "checked_as"), list(itertools.permutations(TAGS, 2)))
def test_signature_never_verifies_under_other_tag(signed_as: str, checked_as: str) -> None:
    signer = Signer.from_seed(bytes(32))
    body = b"the same canonical bytes"
    signature = signer.sign(signed_as, body)
    verify(signer.peer_id, signed_as, body, signature)
    with pytest.raises(RemoteProtocolError):
        verify(signer.peer_id, checked_as, body, signature)


def test_bid_signature_does_not_make_a_counter() -> None:
    bid = examples()["bid"]
    assert isinstance(bid, Bid)
    # The buyer is also the seller here, so only the tag tells a bid from a
    # counter. The bid's signature must still not verify as a counter's.
    self_terms = dataclasses.replace(bid.terms, seller=bid.terms.buyer)
    signer = Signer.from_seed(bytes(range(101, 133)))
    from protocol.messages import sign_bid

    self_bid = sign_bid(self_terms, bid.round, signer)
    with pytest.raises(RemoteProtocolError):
        verify_proposal(Counter(self_terms, self_bid.round, self_bid.signature))


def test_uncountersigned_receipt_rejected_when_required() -> None:
    receipt = examples()["receipt"]
    assert isinstance(receipt, Receipt)
    bare = dataclasses.replace(receipt, seller_signature=b"")
    verify_receipt(bare, require_countersigned=False)
    with pytest.raises(RemoteProtocolError):
        verify_receipt(bare)


def test_peer_id_matches_libp2p() -> None:
    from libp2p.crypto.ed25519 import Ed25519PrivateKey as LibKey
    from libp2p.peer.id import ID

    seed = bytes(range(1, 33))
    ours = Signer.from_seed(seed)
    theirs = ID.from_pubkey(LibKey.new(seed).get_public_key())
    assert ours.peer_id == theirs.to_bytes()
    assert peer_id_to_text(ours.peer_id) == theirs.to_base58()
    assert peer_id_from_text(theirs.to_base58()) == ours.peer_id


def test_hashed_peer_id_rejected() -> None:
    # An RSA-style peer ID is a SHA-256 multihash (0x12 0x20 ...): no key inside.
    with pytest.raises(RemoteProtocolError):
        public_key_from_peer_id(bytes([0x12, 0x20]) + bytes(32))


def test_signer_repr_hides_key() -> None:
    seed = bytes(range(1, 33))
    assert seed.hex() not in repr(Signer.from_seed(seed))
