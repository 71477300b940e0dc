"""The deal state machine, for the buyer's side and the seller's side.

Rules:

* A deal starts when the buyer sends (or the seller receives) the first bid,
  in state PROPOSED. Bids and counters alternate until one side accepts
  (AGREED) or rejects (REJECTED).
* After agreement the buyer fetches the weights (TRANSFERRING), evaluates
  them (EVALUATING), signs a receipt (SETTLING_PAID or SETTLING_REFUSED) and
  ends in PAID or REFUSED once the seller countersigns. The seller serves
  (TRANSFERRING), has sent every chunk (DELIVERED), and ends in PAID or
  REFUSED when it countersigns the buyer's receipt.
* A transfer that cannot complete ends in FAILED and nothing is paid.
* Expiry: in a state listed in EXPIRING, any event at or after the deal's
  expiry time moves the deal to EXPIRED instead. Once the buyer holds the
  weights (EVALUATING and later) or the seller has delivered them, the deal
  no longer expires: the weights are out and a receipt is owed.
* Terminal states take no events.

Every (state, event) pair not in the table is an error: `step` raises
`InvalidTransition`, which the node reports to a peer as INVALID_STATE.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from protocol.errors import LocalProtocolError
from protocol.messages import Role


class DealState(enum.Enum):
    PROPOSED = "proposed"
    COUNTERED = "countered"
    AGREED = "agreed"
    TRANSFERRING = "transferring"
    EVALUATING = "evaluating"
    DELIVERED = "delivered"
    SETTLING_PAID = "settling_paid"
    SETTLING_REFUSED = "settling_refused"
    PAID = "paid"
    REFUSED = "refused"
    REJECTED = "rejected"
    FAILED = "failed"
    EXPIRED = "expired"


class DealEvent(enum.Enum):
    BID = "bid"  # the buyer bids again after a counter
    COUNTER = "counter"  # the seller counters a bid
    ACCEPT = "accept"  # either side accepts the other's last proposal
    REJECT = "reject"  # either side ends the negotiation
    TRANSFER_STARTED = "transfer_started"  # a transfer (or a resumed one) began
    TRANSFER_DONE = "transfer_done"  # every chunk verified (buyer) or sent (seller)
    TRANSFER_FAILED = "transfer_failed"
    SIGN_PAID = "sign_paid"  # the buyer signed a paying receipt
    SIGN_REFUSAL = "sign_refusal"  # the buyer signed a refusal
    COUNTERSIGNED = "countersigned"  # the seller countersigned the receipt
    TIMEOUT = "timeout"  # an explicit expiry check found the deal expired


S = DealState
E = DealEvent

BUYER_TABLE: Mapping[tuple[DealState, DealEvent], DealState] = {
    (S.PROPOSED, E.COUNTER): S.COUNTERED,
    (S.PROPOSED, E.ACCEPT): S.AGREED,
    (S.PROPOSED, E.REJECT): S.REJECTED,
    (S.COUNTERED, E.BID): S.PROPOSED,
    (S.COUNTERED, E.ACCEPT): S.AGREED,
    (S.COUNTERED, E.REJECT): S.REJECTED,
    (S.AGREED, E.TRANSFER_STARTED): S.TRANSFERRING,
    (S.AGREED, E.TRANSFER_FAILED): S.FAILED,
    (S.TRANSFERRING, E.TRANSFER_STARTED): S.TRANSFERRING,
    (S.TRANSFERRING, E.TRANSFER_DONE): S.EVALUATING,
    (S.TRANSFERRING, E.TRANSFER_FAILED): S.FAILED,
    # A delivery that fails its checks (wrong tensors, non-finite values) is
    # refused from EVALUATING too, so the seller learns why.
    (S.EVALUATING, E.SIGN_PAID): S.SETTLING_PAID,
    (S.EVALUATING, E.SIGN_REFUSAL): S.SETTLING_REFUSED,
    (S.SETTLING_PAID, E.COUNTERSIGNED): S.PAID,
    (S.SETTLING_REFUSED, E.COUNTERSIGNED): S.REFUSED,
}

SELLER_TABLE: Mapping[tuple[DealState, DealEvent], DealState] = {
    (S.PROPOSED, E.COUNTER): S.COUNTERED,
    (S.PROPOSED, E.ACCEPT): S.AGREED,
    (S.PROPOSED, E.REJECT): S.REJECTED,
    (S.COUNTERED, E.BID): S.PROPOSED,
    (S.COUNTERED, E.ACCEPT): S.AGREED,
    (S.COUNTERED, E.REJECT): S.REJECTED,
    (S.AGREED, E.TRANSFER_STARTED): S.TRANSFERRING,
    (S.TRANSFERRING, E.TRANSFER_STARTED): S.TRANSFERRING,
    (S.TRANSFERRING, E.TRANSFER_DONE): S.DELIVERED,
    (S.TRANSFERRING, E.TRANSFER_FAILED): S.TRANSFERRING,
    # A buyer may resume a transfer after the seller thinks it delivered.
    (S.DELIVERED, E.TRANSFER_STARTED): S.TRANSFERRING,
    (S.DELIVERED, E.TRANSFER_DONE): S.DELIVERED,
    # The seller countersigns as it accepts the receipt; a buyer that had
    # every chunk already (from an earlier transfer) may settle at once.
    (S.AGREED, E.SIGN_PAID): S.PAID,
    (S.AGREED, E.SIGN_REFUSAL): S.REFUSED,
    (S.TRANSFERRING, E.SIGN_PAID): S.PAID,
    (S.TRANSFERRING, E.SIGN_REFUSAL): S.REFUSED,
    (S.DELIVERED, E.SIGN_PAID): S.PAID,
    (S.DELIVERED, E.SIGN_REFUSAL): S.REFUSED,
}

TABLES: Mapping[Role, Mapping[tuple[DealState, DealEvent], DealState]] = {
    Role.BUYER: BUYER_TABLE,
    Role.SELLER: SELLER_TABLE,
}

TERMINAL = frozenset({S.PAID, S.REFUSED, S.REJECTED, S.FAILED, S.EXPIRED})

EXPIRING: Mapping[Role, frozenset[DealState]] = {
    Role.BUYER: frozenset({S.PROPOSED, S.COUNTERED, S.AGREED, S.TRANSFERRING}),
    Role.SELLER: frozenset({S.PROPOSED, S.COUNTERED, S.AGREED, S.TRANSFERRING}),
}


class InvalidTransition(LocalProtocolError):
    """An event that the deal cannot take in its current state."""

    def __init__(self, role: Role, state: DealState, event: DealEvent) -> None:
        super().__init__(f"a {role.name.lower()} deal in state {state.value} cannot take event {event.value}")
        self.role = role
        self.state = state
        self.event = event


def step(role: Role, state: DealState, event: DealEvent, *, now_ms: int, expires_ms: int) -> DealState:
    """Return the next state of a deal, or raise InvalidTransition.

    Expiry wins over the event: a deal in an expiring state whose time is up
    moves to EXPIRED whatever the event.
    """
    if state in TERMINAL:
        raise InvalidTransition(role, state, event)
    if state in EXPIRING[role] and now_ms >= expires_ms:
        return S.EXPIRED
    if event is E.TIMEOUT:
        # Not expired yet: a timeout check leaves the deal where it is.
        return state
    try:
        return TABLES[role][(state, event)]
    except KeyError:
        raise InvalidTransition(role, state, event) from None


@dataclass
class Deal:
    """One deal's role, state and expiry; `apply` moves it through the table."""

    role: Role
    expires_ms: int
    state: DealState = S.PROPOSED

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def apply(self, event: DealEvent, now_ms: int) -> DealState:
        self.state = step(self.role, self.state, event, now_ms=now_ms, expires_ms=self.expires_ms)
        return self.state
