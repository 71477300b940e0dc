"""Every message that crosses the network.

Field order in each dataclass is the wire order (see `protocol.codec`).
Signed messages carry their signatures as trailing fields; `sign_*` helpers
fill them and `verify_*` helpers check them from the signer's peer ID alone.

A deal exists once both parties have signed the same `DealTerms`: the buyer
by a `Bid` (or by accepting a `Counter`), the seller by a `Counter` (or by
accepting a `Bid`). An `Accept` carries the proposer's signature from the bid
or counter and the acceptor's own, so either party can prove the deal.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass
from typing import ClassVar

import blake3

from protocol import limits
from protocol.codec import (
    Bool,
    Bytes,
    Enum,
    Int,
    ListOf,
    Message,
    Nested,
    Str,
    Struct,
    TupleOf,
    UInt,
    encode,
    encode_body,
    pack,
    register,
    wire,
)
from protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from protocol.identity import SIGNATURE_SIZE, Signer, signed_bytes, verify

HASH = Bytes(limits.HASH_SIZE, sizes=(limits.HASH_SIZE,))
NONCE = Bytes(limits.NONCE_SIZE, sizes=(limits.NONCE_SIZE,))
PEER = Bytes(limits.MAX_PEER_ID_SIZE)
SIGNATURE = Bytes(SIGNATURE_SIZE, sizes=(SIGNATURE_SIZE,))
UNSIGNED = b"\x00" * SIGNATURE_SIZE  # placeholder before signing; never verifies.

# Domain tags. The hash tags keep IDs of different kinds apart too.
OFFER_TAG = "pmarket/offer/v1"
BID_TAG = "pmarket/bid/v1"
COUNTER_TAG = "pmarket/counter/v1"
ACCEPT_TAG = "pmarket/accept/v1"
REJECT_TAG = "pmarket/reject/v1"
RECEIPT_TAG = "pmarket/receipt/v1"
COUNTERSIGN_TAG = "pmarket/countersign/v1"
OFFER_ID_TAG = "pmarket/offer-id/v1"
DEAL_ID_TAG = "pmarket/deal-id/v1"


def tagged_hash(tag: str, data: bytes) -> bytes:
    """BLAKE3 of ``tag | 0x00 | data``: the hash behind every protocol ID."""
    return blake3.blake3(signed_bytes(tag, data)).digest()


class PaymentTerms(enum.IntEnum):
    """When a buyer must pay: on delivery of valid weights, or only on gain."""

    DELIVERY = 1
    GAIN = 2


class Outcome(enum.IntEnum):
    PAID = 1
    REFUSED = 2


class Role(enum.IntEnum):
    BUYER = 1
    SELLER = 2


# Offers -------------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True)
class Offer(Message):
    """A seller's signed offer for a set of weights, gossiped to every node.

    `family` is the hash of the whole model's tensor names, dtypes and shapes
    (see `protocol.manifest.family_hash`); `tensors` lists the offered subset,
    empty for all. `seq` orders offers with the same (seller, family,
    offer_key): a higher one supersedes. Metrics are (name, value in parts per
    million) pairs that the seller claims, sorted by name.
    """

    TYPE: ClassVar[int] = 1
    MAX_SIZE: ClassVar[int] = limits.MAX_OFFER_SIZE
    SIGNATURES: ClassVar[tuple[str, ...]] = ("signature",)

    seller: bytes = wire(PEER)
    family: bytes = wire(HASH)
    offer_key: str = wire(Str(limits.MAX_OFFER_KEY, min_bytes=1))
    task: str = wire(Str(limits.MAX_TASK_NAME))
    tensors: tuple[str, ...] = wire(ListOf(Str(limits.MAX_TENSOR_NAME, min_bytes=1), limits.MAX_OFFER_TENSORS))
    manifest_root: bytes = wire(HASH)
    total_bytes: int = wire(UInt())
    chunk_size: int = wire(UInt(limits.MAX_CHUNK_SIZE, minimum=limits.MIN_CHUNK_SIZE))
    price: int = wire(UInt())
    payment: PaymentTerms = wire(Enum(PaymentTerms))
    min_gain_ppm: int = wire(UInt(limits.PPM))
    metrics: tuple[tuple[str, int], ...] = wire(
        ListOf(TupleOf(Str(limits.MAX_METRIC_NAME, min_bytes=1), Int()), limits.MAX_METRICS)
    )
    seq: int = wire(UInt())
    created_ms: int = wire(UInt())
    expires_ms: int = wire(UInt())
    signature: bytes = wire(SIGNATURE)

    def __post_init__(self) -> None:
        names = [name for name, _ in self.metrics]
        if names != sorted(set(names)):
            raise RemoteProtocolError(Reason.INVALID_FIELD, "offer metrics must be sorted by name and unique")
        if len(set(self.tensors)) != len(self.tensors):
            raise RemoteProtocolError(Reason.INVALID_FIELD, "offer lists a tensor twice")

    @property
    def offer_id(self) -> bytes:
        return tagged_hash(OFFER_ID_TAG, encode(self))

    def metric(self, name: str) -> int | None:
        for key, value in self.metrics:
            if key == name:
                return value
        return None


@register
@dataclass(frozen=True, slots=True)
class OfferSyncRequest(Message):
    """Ask a peer for its live offers, optionally of some families only.

    The peer answers with a stream of `Offer` frames and then closes.
    """

    TYPE: ClassVar[int] = 11
    MAX_SIZE: ClassVar[int] = limits.MAX_CONTROL_MESSAGE_SIZE

    families: tuple[bytes, ...] = wire(ListOf(HASH, 256))
    max_offers: int = wire(UInt(1_000_000, minimum=1))


# Negotiation --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DealTerms(Struct):
    """What both parties sign. The deal ID is a hash of these fields."""

    offer_id: bytes = wire(HASH)
    seller: bytes = wire(PEER)
    buyer: bytes = wire(PEER)
    manifest_root: bytes = wire(HASH)
    total_bytes: int = wire(UInt())
    price: int = wire(UInt())
    payment: PaymentTerms = wire(Enum(PaymentTerms))
    min_gain_ppm: int = wire(UInt(limits.PPM))
    nonce: bytes = wire(NONCE)
    expires_ms: int = wire(UInt())

    @property
    def deal_id(self) -> bytes:
        return tagged_hash(DEAL_ID_TAG, pack(self._wire_fields()))

    def same_deal(self, other: DealTerms) -> bool:
        """True when `other` differs from these terms at most in the price."""
        return dataclasses.replace(other, price=self.price) == self


ROUND = UInt(limits.MAX_NEGOTIATION_ROUNDS)


@register
@dataclass(frozen=True, slots=True)
class Bid(Message):
    """The buyer proposes terms (first bid, or a new bid after a counter)."""

    TYPE: ClassVar[int] = 2
    MAX_SIZE: ClassVar[int] = limits.MAX_NEGOTIATION_MESSAGE_SIZE
    SIGNATURES: ClassVar[tuple[str, ...]] = ("signature",)
    TAG: ClassVar[str] = BID_TAG

    terms: DealTerms = wire(Nested(DealTerms))
    round: int = wire(ROUND)
    signature: bytes = wire(SIGNATURE)


@register
@dataclass(frozen=True, slots=True)
class Counter(Message):
    """The seller proposes other terms (a different price) after a bid."""

    TYPE: ClassVar[int] = 3
    MAX_SIZE: ClassVar[int] = limits.MAX_NEGOTIATION_MESSAGE_SIZE
    SIGNATURES: ClassVar[tuple[str, ...]] = ("signature",)
    TAG: ClassVar[str] = COUNTER_TAG

    terms: DealTerms = wire(Nested(DealTerms))
    round: int = wire(ROUND)
    signature: bytes = wire(SIGNATURE)


@register
@dataclass(frozen=True, slots=True)
class Accept(Message):
    """Both signatures on the final terms: the deal itself.

    `accepted_by` says who accepted. The seller accepts a buyer's `Bid`, so
    `proposer_signature` is the bid's; the buyer accepts a seller's `Counter`,
    so it is the counter's. `round` is the proposal's round.
    """

    TYPE: ClassVar[int] = 4
    MAX_SIZE: ClassVar[int] = limits.MAX_NEGOTIATION_MESSAGE_SIZE
    SIGNATURES: ClassVar[tuple[str, ...]] = ("proposer_signature", "acceptor_signature")

    terms: DealTerms = wire(Nested(DealTerms))
    round: int = wire(ROUND)
    accepted_by: Role = wire(Enum(Role))
    proposer_signature: bytes = wire(SIGNATURE)
    acceptor_signature: bytes = wire(SIGNATURE)

    @property
    def deal_id(self) -> bytes:
        return self.terms.deal_id

    def proposal(self) -> Bid | Counter:
        """The bid or counter that was accepted, with its original signature."""
        if self.accepted_by == Role.SELLER:
            return Bid(self.terms, self.round, self.proposer_signature)
        return Counter(self.terms, self.round, self.proposer_signature)


@register
@dataclass(frozen=True, slots=True)
class Reject(Message):
    """Either party ends a negotiation, with a reason."""

    TYPE: ClassVar[int] = 5
    MAX_SIZE: ClassVar[int] = limits.MAX_NEGOTIATION_MESSAGE_SIZE
    SIGNATURES: ClassVar[tuple[str, ...]] = ("signature",)

    offer_id: bytes = wire(HASH)
    nonce: bytes = wire(NONCE)
    round: int = wire(ROUND)
    rejected_by: bytes = wire(PEER)
    reason: Reason = wire(Enum(Reason))
    detail: str = wire(Str(limits.MAX_DETAIL))
    signature: bytes = wire(SIGNATURE)


# Transfer -----------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True)
class Manifest(Message):
    """The safetensors header of the offered tensors and the chunk hashes.

    The weights travel as one safetensors byte stream of `total_bytes`:
    an 8-byte little-endian header length, `header`, then the tensor data.
    Chunk i covers bytes ``[i * chunk_size, min((i + 1) * chunk_size,
    total_bytes))`` of that stream and `chunk_hashes` holds their BLAKE3
    hashes, 32 bytes each, in order. Its hash is the root an offer signs; see
    `protocol.manifest`.
    """

    TYPE: ClassVar[int] = 6
    MAX_SIZE: ClassVar[int] = limits.MAX_MANIFEST_SIZE

    total_bytes: int = wire(UInt())
    chunk_size: int = wire(UInt(limits.MAX_CHUNK_SIZE, minimum=limits.MIN_CHUNK_SIZE))
    header: bytes = wire(Bytes(limits.MAX_HEADER_SIZE))
    chunk_hashes: bytes = wire(Bytes(limits.MAX_CHUNKS * limits.HASH_SIZE))


@register
@dataclass(frozen=True, slots=True)
class ChunkRequest(Message):
    """The buyer asks for the manifest and/or ranges of chunks of a deal.

    Ranges are (first index, count) pairs, ascending and not overlapping.
    """

    TYPE: ClassVar[int] = 7
    MAX_SIZE: ClassVar[int] = limits.MAX_CONTROL_MESSAGE_SIZE

    deal_id: bytes = wire(HASH)
    want_manifest: bool = wire(Bool())
    ranges: tuple[tuple[int, int], ...] = wire(
        ListOf(TupleOf(UInt(limits.MAX_CHUNKS - 1), UInt(limits.MAX_CHUNKS, minimum=1)), limits.MAX_CHUNK_RANGES)
    )

    def __post_init__(self) -> None:
        end = 0
        for start, count in self.ranges:
            if start < end:
                raise RemoteProtocolError(Reason.INVALID_FIELD, "chunk ranges must be ascending and disjoint")
            end = start + count

    def indices(self) -> list[int]:
        return [i for start, count in self.ranges for i in range(start, start + count)]


@register
@dataclass(frozen=True, slots=True)
class ChunkHeader(Message):
    """Precedes `size` raw bytes of chunk `index` on a transfer stream."""

    TYPE: ClassVar[int] = 8
    MAX_SIZE: ClassVar[int] = limits.MAX_CONTROL_MESSAGE_SIZE

    index: int = wire(UInt(limits.MAX_CHUNKS - 1))
    size: int = wire(UInt(limits.MAX_CHUNK_SIZE))


# Settlement ---------------------------------------------------------------


@register
@dataclass(frozen=True, slots=True)
class Receipt(Message):
    """The buyer's signed outcome of a deal, countersigned by the seller.

    `amount` is the agreed price when paid and 0 when refused. `gain_ppm` is
    the relative drop in validation loss the buyer measured and
    `accuracy_delta_ppm` the change in validation accuracy, both in parts per
    million (negative when worse). `seller_signature` is empty until the
    seller countersigns the receipt including the buyer's signature.
    """

    TYPE: ClassVar[int] = 9
    MAX_SIZE: ClassVar[int] = limits.MAX_RECEIPT_SIZE
    SIGNATURES: ClassVar[tuple[str, ...]] = ("buyer_signature", "seller_signature")

    deal_id: bytes = wire(HASH)
    seller: bytes = wire(PEER)
    buyer: bytes = wire(PEER)
    outcome: Outcome = wire(Enum(Outcome))
    amount: int = wire(UInt())
    reason: Reason = wire(Enum(Reason))
    gain_ppm: int = wire(Int())
    accuracy_delta_ppm: int = wire(Int())
    created_ms: int = wire(UInt())
    buyer_signature: bytes = wire(SIGNATURE)
    seller_signature: bytes = wire(Bytes(SIGNATURE_SIZE, sizes=(0, SIGNATURE_SIZE)))

    @property
    def countersigned(self) -> bool:
        return len(self.seller_signature) == SIGNATURE_SIZE

    @property
    def receipt_id(self) -> bytes:
        """Hash of the buyer-signed receipt; stable across countersigning."""
        return tagged_hash(RECEIPT_TAG, encode(dataclasses.replace(self, seller_signature=b"")))


@register
@dataclass(frozen=True, slots=True)
class ErrorMessage(Message):
    """Sent on any stream instead of the expected message when a request fails."""

    TYPE: ClassVar[int] = 10
    MAX_SIZE: ClassVar[int] = limits.MAX_CONTROL_MESSAGE_SIZE

    reason: Reason = wire(Enum(Reason))
    detail: str = wire(Str(limits.MAX_DETAIL))

    @classmethod
    def from_error(cls, error: RemoteProtocolError) -> ErrorMessage:
        detail = error.detail.encode("utf-8")[: limits.MAX_DETAIL].decode("utf-8", "ignore")
        return cls(error.reason, detail)


# Signing and verification -------------------------------------------------


def _check_signer(signer: Signer, expected: bytes, what: str) -> None:
    if signer.peer_id != expected:
        raise LocalProtocolError(f"{what} must be signed by the peer it names")


def sign_offer(offer: Offer, signer: Signer) -> Offer:
    _check_signer(signer, offer.seller, "an offer")
    return dataclasses.replace(offer, signature=signer.sign(OFFER_TAG, encode_body(offer)))


def verify_offer(offer: Offer) -> None:
    verify(offer.seller, OFFER_TAG, encode_body(offer), offer.signature)


def sign_bid(terms: DealTerms, round: int, signer: Signer) -> Bid:
    _check_signer(signer, terms.buyer, "a bid")
    unsigned = Bid(terms, round, UNSIGNED)
    return dataclasses.replace(unsigned, signature=signer.sign(BID_TAG, encode_body(unsigned)))


def sign_counter(terms: DealTerms, round: int, signer: Signer) -> Counter:
    _check_signer(signer, terms.seller, "a counter")
    unsigned = Counter(terms, round, UNSIGNED)
    return dataclasses.replace(unsigned, signature=signer.sign(COUNTER_TAG, encode_body(unsigned)))


def verify_proposal(proposal: Bid | Counter) -> None:
    """Check a bid's signature against the buyer, a counter's against the seller."""
    signer = proposal.terms.buyer if isinstance(proposal, Bid) else proposal.terms.seller
    verify(signer, proposal.TAG, encode_body(proposal), proposal.signature)


def sign_accept(proposal: Bid | Counter, signer: Signer) -> Accept:
    """Accept a verified proposal; the acceptor is the other party."""
    accepted_by = Role.SELLER if isinstance(proposal, Bid) else Role.BUYER
    acceptor = proposal.terms.seller if accepted_by == Role.SELLER else proposal.terms.buyer
    _check_signer(signer, acceptor, "an accept")
    unsigned = Accept(proposal.terms, proposal.round, accepted_by, proposal.signature, UNSIGNED)
    return dataclasses.replace(unsigned, acceptor_signature=signer.sign(ACCEPT_TAG, encode_body(unsigned)))


def verify_accept(accept: Accept) -> None:
    """Check both signatures: the proposal's and the acceptor's."""
    verify_proposal(accept.proposal())
    acceptor = accept.terms.seller if accept.accepted_by == Role.SELLER else accept.terms.buyer
    verify(acceptor, ACCEPT_TAG, encode_body(accept), accept.acceptor_signature)


def sign_reject(reject: Reject, signer: Signer) -> Reject:
    _check_signer(signer, reject.rejected_by, "a reject")
    return dataclasses.replace(reject, signature=signer.sign(REJECT_TAG, encode_body(reject)))


def verify_reject(reject: Reject) -> None:
    verify(reject.rejected_by, REJECT_TAG, encode_body(reject), reject.signature)


def sign_receipt(receipt: Receipt, signer: Signer) -> Receipt:
    """The buyer's signature; clears any seller signature."""
    _check_signer(signer, receipt.buyer, "a receipt")
    unsigned = dataclasses.replace(receipt, seller_signature=b"")
    return dataclasses.replace(unsigned, buyer_signature=signer.sign(RECEIPT_TAG, encode_body(unsigned)))


def _countersigned_body(receipt: Receipt) -> bytes:
    return encode_body(receipt) + receipt.buyer_signature


def countersign_receipt(receipt: Receipt, signer: Signer) -> Receipt:
    """The seller's signature over the receipt and the buyer's signature."""
    _check_signer(signer, receipt.seller, "a countersignature")
    return dataclasses.replace(
        receipt, seller_signature=signer.sign(COUNTERSIGN_TAG, _countersigned_body(receipt))
    )


def verify_receipt(receipt: Receipt, *, require_countersigned: bool = True) -> None:
    verify(receipt.buyer, RECEIPT_TAG, encode_body(receipt), receipt.buyer_signature)
    if receipt.countersigned:
        verify(receipt.seller, COUNTERSIGN_TAG, _countersigned_body(receipt), receipt.seller_signature)
    elif require_countersigned:
        raise RemoteProtocolError(Reason.BAD_SIGNATURE, "receipt is not countersigned by the seller")
