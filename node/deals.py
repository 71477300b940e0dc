"""Deals and the ledger in the node's database.

`DealBook` stores each deal once both parties have signed its terms (and
negotiations that ended in a reject, for the record), and moves it through
`protocol.deal`'s table: every state change goes through `step`, so the
stored state is always one the machine allows.

`Ledger` appends countersigned receipts to a hash chain (see
`protocol.ledger`). The deal ID is unique in the ledger, so a deal is paid
at most once even if its receipt arrives again after a crash.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from typing import Any

import msgpack

from node.store import Database
from protocol.codec import decode_as, encode, pack
from protocol.deal import TERMINAL, DealEvent, DealState, step
from protocol.identity import peer_id_to_text
from protocol.ledger import GENESIS, LedgerEntry, balances, chain_hash, verify_chain
from protocol.messages import Accept, DealTerms, Manifest, Offer, Outcome, Receipt, Role


@dataclass(frozen=True)
class DealRecord:
    deal_id: bytes
    role: Role
    state: DealState
    offer_id: bytes
    offer: Offer
    counterparty: bytes
    terms: DealTerms
    accept: Accept | None
    price: int
    expires_ms: int
    created_ms: int
    updated_ms: int
    manifest: bytes | None
    chunks_total: int
    chunks_done: int
    bytes_done: int
    reason: str
    detail: str
    receipt: Receipt | None
    gain_ppm: int | None
    accuracy_delta_ppm: int | None
    model: str
    model_version: int | None

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL

    def view(self) -> dict[str, Any]:
        """JSON for the control API."""
        return {
            "deal_id": self.deal_id.hex(),
            "role": self.role.name.lower(),
            "state": self.state.value,
            "offer_id": self.offer_id.hex(),
            "offer_key": self.offer.offer_key,
            "family": self.offer.family.hex(),
            "counterparty": peer_id_to_text(self.counterparty),
            "price": self.price,
            "payment": self.terms.payment.name.lower(),
            "min_gain_ppm": self.terms.min_gain_ppm,
            "total_bytes": self.terms.total_bytes,
            "expires_ms": self.expires_ms,
            "created_ms": self.created_ms,
            "updated_ms": self.updated_ms,
            "chunks_total": self.chunks_total,
            "chunks_done": self.chunks_done,
            "bytes_done": self.bytes_done,
            "reason": self.reason,
            "detail": self.detail,
            "gain_ppm": self.gain_ppm,
            "accuracy_delta_ppm": self.accuracy_delta_ppm,
            "model": f"{self.model}@{self.model_version}" if self.model and self.model_version else self.model,
            "receipt_id": self.receipt.receipt_id.hex() if self.receipt is not None else None,
            "countersigned": bool(self.receipt is not None and self.receipt.countersigned),
        }


def _record(row: sqlite3.Row) -> DealRecord:
    accept = decode_as(Accept, row["accept"]) if row["accept"] else None
    return DealRecord(
        deal_id=row["deal_id"],
        role=Role[row["role"].upper()],
        state=DealState(row["state"]),
        offer_id=row["offer_id"],
        offer=decode_as(Offer, row["offer"]),
        counterparty=row["counterparty"],
        terms=_decode_terms(row["terms"]),
        accept=accept,
        price=row["price"],
        expires_ms=row["expires_ms"],
        created_ms=row["created_ms"],
        updated_ms=row["updated_ms"],
        manifest=row["manifest"],
        chunks_total=row["chunks_total"],
        chunks_done=row["chunks_done"],
        bytes_done=row["bytes_done"],
        reason=row["reason"],
        detail=row["detail"],
        receipt=decode_as(Receipt, row["receipt"]) if row["receipt"] else None,
        gain_ppm=row["gain_ppm"],
        accuracy_delta_ppm=row["accuracy_delta_ppm"],
        model=row["model"],
        model_version=row["model_version"],
    )


def _encode_terms(terms: DealTerms) -> bytes:
    return pack(terms._wire_fields())


def _decode_terms(data: bytes) -> DealTerms:
    return DealTerms._from_wire_fields(msgpack.unpackb(data, raw=False), "stored terms")


class DealBook:
    def __init__(self, db: Database) -> None:
        self.db = db

    def insert(
        self,
        *,
        role: Role,
        state: DealState,
        offer: Offer,
        terms: DealTerms,
        accept: Accept | None,
        now_ms: int,
        reason: str = "",
        detail: str = "",
        model: str = "",
        model_version: int | None = None,
    ) -> DealRecord:
        counterparty = terms.seller if role == Role.BUYER else terms.buyer
        self.db.execute(
            """INSERT OR IGNORE INTO deals (deal_id, role, state, offer_id, offer, counterparty, terms, accept, price,
                   expires_ms, created_ms, updated_ms, reason, detail, model, model_version)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                terms.deal_id,
                role.name.lower(),
                state.value,
                terms.offer_id,
                encode(offer),
                counterparty,
                _encode_terms(terms),
                encode(accept) if accept is not None else b"",
                terms.price,
                terms.expires_ms,
                now_ms,
                now_ms,
                reason,
                detail,
                model,
                model_version,
            ),
        )
        record = self.get(terms.deal_id)
        assert record is not None
        return record

    def get(self, deal_id: bytes) -> DealRecord | None:
        row = self.db.query_one("SELECT * FROM deals WHERE deal_id = ?", (deal_id,))
        return _record(row) if row is not None else None

    def find_prefix(self, prefix_hex: str) -> list[DealRecord]:
        rows = self.db.query("SELECT * FROM deals WHERE hex(deal_id) LIKE ?", (prefix_hex.upper() + "%",))
        return [_record(row) for row in rows]

    def list(self, *, role: Role | None = None, states: set[DealState] | None = None) -> list[DealRecord]:
        rows = self.db.query("SELECT * FROM deals ORDER BY created_ms, deal_id")
        records = [_record(row) for row in rows]
        return [
            r for r in records if (role is None or r.role == role) and (states is None or r.state in states)
        ]

    def apply(
        self,
        deal_id: bytes,
        event: DealEvent,
        *,
        now_ms: int,
        connection: sqlite3.Connection | None = None,
        **fields: Any,
    ) -> DealRecord:
        """Move a deal by `event` through its role's table and store `fields` with it.

        Raises protocol.deal.InvalidTransition if the deal cannot take the
        event. Pass `connection` inside `Database.transaction()` to commit
        together with other statements.
        """
        record = self.get(deal_id)
        if record is None:
            raise KeyError(deal_id.hex())
        new_state = step(record.role, record.state, event, now_ms=now_ms, expires_ms=record.expires_ms)
        self.update(deal_id, now_ms=now_ms, connection=connection, state=new_state.value, **fields)
        updated = self.get(deal_id)
        assert updated is not None
        return updated

    def update(self, deal_id: bytes, *, now_ms: int, connection: sqlite3.Connection | None = None, **fields: Any) -> None:
        allowed = {
            "state", "manifest", "chunks_total", "chunks_done", "bytes_done", "reason", "detail", "receipt",
            "gain_ppm", "accuracy_delta_ppm", "model", "model_version",
        }
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"cannot update deal column(s) {', '.join(sorted(unknown))}")
        values = {key: (encode(value) if isinstance(value, Receipt) else value) for key, value in fields.items()}
        assignments = ", ".join(f"{key} = ?" for key in values)
        sql = f"UPDATE deals SET {assignments}, updated_ms = ? WHERE deal_id = ?"
        parameters = (*values.values(), now_ms, deal_id)
        if connection is not None:
            connection.execute(sql, parameters)
        else:
            self.db.execute(sql, parameters)

    def exposure(self, counterparty: bytes) -> int:
        """Sum of prices of this node's sales to `counterparty` that are agreed but not settled."""
        open_states = ("agreed", "transferring", "delivered")
        row = self.db.query_one(
            f"SELECT COALESCE(SUM(price), 0) AS total FROM deals WHERE role = 'seller' AND counterparty = ? "
            f"AND state IN ({', '.join('?' for _ in open_states)})",
            (counterparty, *open_states),
        )
        return int(row["total"]) if row is not None else 0

    def manifest_of(self, record: DealRecord) -> Manifest | None:
        return decode_as(Manifest, record.manifest) if record.manifest else None


class LedgerConflict(Exception):
    """Another receipt is already recorded for this deal."""


class Ledger:
    def __init__(self, db: Database, me: bytes) -> None:
        self.db = db
        self.me = me

    def append(self, connection: sqlite3.Connection, receipt: Receipt, now_ms: int) -> LedgerEntry:
        """Append a countersigned receipt inside a transaction; idempotent per deal.

        Appending the same receipt again returns the existing entry; another
        receipt for the same deal raises LedgerConflict.
        """
        existing = connection.execute("SELECT * FROM ledger WHERE deal_id = ?", (receipt.deal_id,)).fetchone()
        if existing is not None:
            entry = _entry(existing)
            if entry.receipt.receipt_id != receipt.receipt_id:
                raise LedgerConflict(f"deal {receipt.deal_id.hex()[:16]} already has receipt {entry.receipt.receipt_id.hex()[:16]}")
            return entry
        last = connection.execute("SELECT idx, entry_hash FROM ledger ORDER BY idx DESC LIMIT 1").fetchone()
        index = last["idx"] + 1 if last is not None else 0
        previous = last["entry_hash"] if last is not None else GENESIS
        entry_hash = chain_hash(previous, receipt.receipt_id)
        counterparty = receipt.buyer if receipt.seller == self.me else receipt.seller
        amount = 0
        if receipt.outcome == Outcome.PAID:
            amount = receipt.amount if receipt.seller == self.me else -receipt.amount
        connection.execute(
            """INSERT INTO ledger (idx, receipt_id, deal_id, receipt, previous, entry_hash, counterparty, amount, created_ms)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (index, receipt.receipt_id, receipt.deal_id, encode(receipt), previous, entry_hash, counterparty, amount, now_ms),
        )
        return LedgerEntry(index, receipt, previous, entry_hash)

    def entry_for_deal(self, deal_id: bytes) -> LedgerEntry | None:
        row = self.db.query_one("SELECT * FROM ledger WHERE deal_id = ?", (deal_id,))
        return _entry(row) if row is not None else None

    def entries(self) -> list[LedgerEntry]:
        return [_entry(row) for row in self.db.query("SELECT * FROM ledger ORDER BY idx")]

    def balances(self) -> dict[bytes, int]:
        return balances([entry.receipt for entry in self.entries()], self.me)

    def balance_with(self, counterparty: bytes) -> int:
        row = self.db.query_one("SELECT COALESCE(SUM(amount), 0) AS total FROM ledger WHERE counterparty = ?", (counterparty,))
        return int(row["total"]) if row is not None else 0

    def totals(self) -> tuple[int, int]:
        """(earned, spent) over the whole ledger."""
        row = self.db.query_one(
            "SELECT COALESCE(SUM(CASE WHEN amount > 0 THEN amount END), 0) AS earned, "
            "COALESCE(-SUM(CASE WHEN amount < 0 THEN amount END), 0) AS spent FROM ledger"
        )
        assert row is not None
        return int(row["earned"]), int(row["spent"])

    def verify(self) -> None:
        verify_chain(self.entries())

    def export(self) -> list[dict[str, Any]]:
        views = []
        for entry in self.entries():
            receipt = entry.receipt
            views.append(
                {
                    "index": entry.index,
                    "deal_id": receipt.deal_id.hex(),
                    "receipt_id": receipt.receipt_id.hex(),
                    "seller": peer_id_to_text(receipt.seller),
                    "buyer": peer_id_to_text(receipt.buyer),
                    "outcome": receipt.outcome.name.lower(),
                    "amount": receipt.amount,
                    "reason": receipt.reason.name.lower(),
                    "gain_ppm": receipt.gain_ppm,
                    "accuracy_delta_ppm": receipt.accuracy_delta_ppm,
                    "created_ms": receipt.created_ms,
                    "entry_hash": entry.entry_hash.hex(),
                    "receipt": encode(receipt).hex(),
                }
            )
        return views


def _entry(row: sqlite3.Row) -> LedgerEntry:
    return LedgerEntry(row["idx"], decode_as(Receipt, row["receipt"]), row["previous"], row["entry_hash"])

