"""Rules of the negotiation stream, for both sides.

A negotiation is a short exchange on one stream::

    buyer  -> Bid (round 0)
    seller -> Accept | Counter (round 1) | Reject
    buyer  -> Accept | Bid (round 2) | Reject        after a counter
    seller -> Accept (echo of the buyer's accept)    after the buyer accepts
    ...

Every proposal keeps the first bid's terms except the price, and rounds go
up by one per message up to `MAX_NEGOTIATION_ROUNDS`. The seller echoes a
buyer's accept, so the buyer knows the seller holds the deal before it asks
for chunks.

The checks below are pure: they take the message, what the checker already
holds and the time, and raise RemoteProtocolError with the reason to send
back.
"""

from __future__ import annotations

from protocol import limits
from protocol.errors import Reason, RemoteProtocolError
from protocol.messages import (
    Accept,
    Bid,
    Counter,
    DealTerms,
    Offer,
    Role,
    verify_accept,
    verify_proposal,
)


def check_terms_match_offer(terms: DealTerms, offer: Offer, offer_id: bytes) -> None:
    """The terms a bid proposes must copy the offer they buy."""
    if terms.offer_id != offer_id:
        raise RemoteProtocolError(Reason.UNKNOWN_OFFER, "bid names another offer")
    mismatched = [
        name
        for name, ours in (
            ("seller", offer.seller),
            ("manifest_root", offer.manifest_root),
            ("total_bytes", offer.total_bytes),
            ("payment", offer.payment),
            ("min_gain_ppm", offer.min_gain_ppm),
        )
        if getattr(terms, name) != ours
    ]
    if mismatched:
        raise RemoteProtocolError(Reason.TERMS_MISMATCH, f"bid terms differ from the offer in {', '.join(mismatched)}")


def check_first_bid(bid: Bid, *, offer: Offer, offer_id: bytes, sender: bytes, now_ms: int) -> None:
    """Seller side: check the bid that opens a negotiation."""
    verify_proposal(bid)
    if bid.terms.buyer != sender:
        raise RemoteProtocolError(Reason.WRONG_PEER, "a bid must name the peer that sends it as the buyer")
    if bid.terms.buyer == bid.terms.seller:
        raise RemoteProtocolError(Reason.WRONG_PEER, "a node cannot buy its own offer")
    if bid.round != 0:
        raise RemoteProtocolError(Reason.INVALID_FIELD, f"the first bid has round 0, not {bid.round}")
    check_terms_match_offer(bid.terms, offer, offer_id)
    if offer.expires_ms <= now_ms:
        raise RemoteProtocolError(Reason.EXPIRED, "the offer has expired")
    if bid.terms.expires_ms <= now_ms:
        raise RemoteProtocolError(Reason.EXPIRED, "the bid's deal expiry has passed")
    if bid.terms.expires_ms > now_ms + limits.MAX_DEAL_LIFETIME_MS:
        raise RemoteProtocolError(
            Reason.INVALID_FIELD, f"deal expiry is more than {limits.MAX_DEAL_LIFETIME_MS} ms away"
        )


def check_next_proposal(
    proposal: Bid | Counter, *, previous: Bid | Counter, sender: bytes
) -> None:
    """Check a counter (after a bid) or a new bid (after a counter)."""
    verify_proposal(proposal)
    expected_sender = proposal.terms.buyer if isinstance(proposal, Bid) else proposal.terms.seller
    if expected_sender != sender:
        raise RemoteProtocolError(Reason.WRONG_PEER, f"a {type(proposal).__name__.lower()} must come from its signer")
    if type(proposal) is type(previous):
        raise RemoteProtocolError(Reason.INVALID_STATE, f"two {type(proposal).__name__.lower()}s in a row")
    if proposal.round != previous.round + 1:
        raise RemoteProtocolError(
            Reason.INVALID_FIELD, f"round {proposal.round} does not follow round {previous.round}"
        )
    if proposal.round > limits.MAX_NEGOTIATION_ROUNDS:
        raise RemoteProtocolError(Reason.TOO_MANY_ROUNDS, f"more than {limits.MAX_NEGOTIATION_ROUNDS} rounds")
    if not proposal.terms.same_deal(previous.terms):
        raise RemoteProtocolError(Reason.TERMS_MISMATCH, "a counter or new bid may change only the price")


def check_accept(accept: Accept, *, proposal: Bid | Counter, sender: bytes) -> None:
    """Check an accept of `proposal` (this side's own last proposal)."""
    verify_accept(accept)
    expected_role = Role.SELLER if isinstance(proposal, Bid) else Role.BUYER
    if accept.accepted_by != expected_role:
        raise RemoteProtocolError(Reason.INVALID_STATE, "the accept names the wrong acceptor")
    acceptor = accept.terms.seller if expected_role == Role.SELLER else accept.terms.buyer
    if acceptor != sender:
        raise RemoteProtocolError(Reason.WRONG_PEER, "an accept must come from the acceptor")
    if accept.terms != proposal.terms or accept.round != proposal.round:
        raise RemoteProtocolError(Reason.TERMS_MISMATCH, "the accept's terms are not the proposal's")
    if accept.proposer_signature != proposal.signature:
        raise RemoteProtocolError(Reason.TERMS_MISMATCH, "the accept carries another proposal signature")
