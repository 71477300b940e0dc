"""Reason codes and the two exception classes of the protocol.

`RemoteProtocolError` is for what a peer sent wrong: a decoder, a signature
check or a rule raises it with a `Reason`, and the node turns it into a reject,
an error frame or a closed stream. `LocalProtocolError` is for this node's own
misuse of the API (encoding an out-of-range value, signing with the wrong key,
an event that its deal cannot take), which is a bug to fix here, not a peer to
blame.
"""

from __future__ import annotations

import enum


class Reason(enum.IntEnum):
    """Why a message, a deal or a transfer was rejected. Stable wire values."""

    OK = 0
    # Encoding and decoding.
    MALFORMED = 1
    UNKNOWN_TYPE = 2
    UNSUPPORTED_VERSION = 3
    INVALID_FIELD = 4
    TOO_LARGE = 5
    NON_CANONICAL = 6
    TRAILING_BYTES = 7
    # Signatures and identity.
    BAD_SIGNATURE = 10
    BAD_PEER_ID = 11
    WRONG_PEER = 12
    # Time.
    EXPIRED = 20
    NOT_YET_VALID = 21
    # Offers and the offer book.
    STALE_SEQUENCE = 30
    FAMILY_MISMATCH = 31
    BOOK_FULL = 32
    UNKNOWN_OFFER = 33
    # Negotiation and deals.
    UNKNOWN_DEAL = 40
    INVALID_STATE = 41
    PRICE_ABOVE_LIMIT = 42
    PRICE_BELOW_RESERVE = 43
    BUDGET_EXCEEDED = 44
    CREDIT_LIMIT = 45
    TOO_MANY_ROUNDS = 46
    TERMS_MISMATCH = 47
    DECLINED = 48
    # Transfer.
    MANIFEST_MISMATCH = 50
    CHUNK_HASH_MISMATCH = 51
    TRUNCATED = 52
    UNKNOWN_CHUNK = 53
    TIMEOUT = 54
    BUSY = 55
    # Evaluation of delivered weights.
    TENSOR_MISMATCH = 60
    NON_FINITE = 61
    INVALID_WEIGHTS = 62
    GAIN_BELOW_MINIMUM = 63
    # Settlement.
    AMOUNT_MISMATCH = 70
    DUPLICATE_RECEIPT = 71
    REFUSAL_NOT_ALLOWED = 72
    # Anything else that went wrong on the sending side.
    INTERNAL = 99


class RemoteProtocolError(Exception):
    """A peer sent something that breaks the protocol.

    `reason` is the code to send back or count; `detail` is a short
    human-readable sentence naming the offending value. Neither ever contains
    key material.
    """

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.name.lower()}: {detail}")
        self.reason = reason
        self.detail = detail


class LocalProtocolError(Exception):
    """This node used the protocol API wrongly; a bug in the caller."""
