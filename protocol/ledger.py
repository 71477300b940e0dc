"""Rules for receipts and the hash-chained ledger.

Payment is mutual credit. A countersigned receipt moves `amount` from the
buyer's balance to the seller's in both parties' ledgers. A receipt is valid
for a deal when it names the deal's parties, pays exactly the agreed price or
refuses with an amount of 0, and a refusal is one the terms allow:

* under DELIVERY terms a buyer may refuse only weights that failed
  verification (see `DEFECT_REASONS`);
* under GAIN terms it may also refuse when its measured gain is below the
  minimum in the terms (reason GAIN_BELOW_MINIMUM).

Each node's ledger is a chain: entry i stores a receipt and
``hash_i = BLAKE3("pmarket/ledger/v1" | 0x00 | hash_{i-1} | receipt_id)``
with ``hash_{-1}`` 32 zero bytes, so an entry cannot be changed, dropped or
reordered without breaking every later hash.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from protocol.errors import Reason, RemoteProtocolError
from protocol.messages import DealTerms, Outcome, PaymentTerms, Receipt, tagged_hash

LEDGER_TAG = "pmarket/ledger/v1"
GENESIS = b"\x00" * 32

# Reasons for which any terms let a buyer refuse delivered weights.
DEFECT_REASONS = frozenset(
    {
        Reason.MANIFEST_MISMATCH,
        Reason.CHUNK_HASH_MISMATCH,
        Reason.TENSOR_MISMATCH,
        Reason.NON_FINITE,
        Reason.INVALID_WEIGHTS,
    }
)


def check_receipt(receipt: Receipt, terms: DealTerms) -> None:
    """Raise RemoteProtocolError unless `receipt` is a valid outcome of `terms`.

    Signatures are checked separately (`protocol.messages.verify_receipt`).
    """
    if receipt.deal_id != terms.deal_id:
        raise RemoteProtocolError(Reason.UNKNOWN_DEAL, "receipt names another deal")
    if receipt.seller != terms.seller or receipt.buyer != terms.buyer:
        raise RemoteProtocolError(Reason.WRONG_PEER, "receipt names other parties than the deal")
    if receipt.outcome == Outcome.PAID:
        if receipt.amount != terms.price:
            raise RemoteProtocolError(
                Reason.AMOUNT_MISMATCH, f"receipt pays {receipt.amount}, the agreed price is {terms.price}"
            )
        return
    if receipt.amount != 0:
        raise RemoteProtocolError(Reason.AMOUNT_MISMATCH, f"a refusal must pay 0, this one pays {receipt.amount}")
    if receipt.reason in DEFECT_REASONS:
        return
    if (
        terms.payment == PaymentTerms.GAIN
        and receipt.reason == Reason.GAIN_BELOW_MINIMUM
        and receipt.gain_ppm < terms.min_gain_ppm
    ):
        return
    raise RemoteProtocolError(
        Reason.REFUSAL_NOT_ALLOWED,
        f"{terms.payment.name.lower()} terms do not allow a refusal for {receipt.reason.name.lower()} "
        f"with gain {receipt.gain_ppm} ppm (minimum {terms.min_gain_ppm} ppm)",
    )


def chain_hash(previous: bytes, receipt_id: bytes) -> bytes:
    return tagged_hash(LEDGER_TAG, previous + receipt_id)


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    index: int
    receipt: Receipt
    previous: bytes
    entry_hash: bytes


class ChainError(Exception):
    """A ledger whose hashes do not chain."""


def verify_chain(entries: Sequence[LedgerEntry]) -> None:
    previous = GENESIS
    for position, entry in enumerate(entries):
        if entry.index != position:
            raise ChainError(f"entry {entry.index} is at position {position}")
        if entry.previous != previous:
            raise ChainError(f"entry {entry.index} does not follow entry {position - 1}")
        if entry.entry_hash != chain_hash(previous, entry.receipt.receipt_id):
            raise ChainError(f"entry {entry.index} hash does not match its receipt")
        previous = entry.entry_hash


def balances(receipts: Iterable[Receipt], me: bytes) -> dict[bytes, int]:
    """Net balance with each counterparty: earned from it minus spent with it."""
    result: dict[bytes, int] = {}
    for receipt in receipts:
        if receipt.outcome != Outcome.PAID:
            continue
        if receipt.seller == me:
            result[receipt.buyer] = result.get(receipt.buyer, 0) + receipt.amount
        elif receipt.buyer == me:
            result[receipt.seller] = result.get(receipt.seller, 0) - receipt.amount
    return result
