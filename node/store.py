"""The node's SQLite database: models, published offers, deals and the ledger.

One `Database` per node wraps one connection in WAL mode with
``synchronous=FULL``, so a committed transaction survives a crash or power
loss. Statements are short; a lock serialises them, so worker threads may
use the database too. `transaction()` groups statements that must commit
together (a merged model version and the receipt that pays for it, say).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    task TEXT NOT NULL,
    family BLOB NOT NULL,
    root BLOB NOT NULL,
    total_bytes INTEGER NOT NULL,
    chunk_size INTEGER NOT NULL,
    path TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    source TEXT NOT NULL,
    parent INTEGER,
    deal_id BLOB,
    metrics TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (name, version)
);
CREATE INDEX IF NOT EXISTS models_by_family ON models (family);

CREATE TABLE IF NOT EXISTS published_offers (
    offer_id BLOB PRIMARY KEY,
    model TEXT NOT NULL,
    version INTEGER NOT NULL,
    offer_key TEXT NOT NULL,
    family BLOB NOT NULL,
    seq INTEGER NOT NULL,
    data BLOB NOT NULL,
    path TEXT NOT NULL,
    manifest BLOB NOT NULL,
    reserve INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS published_by_key ON published_offers (family, offer_key, seq);

CREATE TABLE IF NOT EXISTS deals (
    deal_id BLOB PRIMARY KEY,
    role TEXT NOT NULL,
    state TEXT NOT NULL,
    offer_id BLOB NOT NULL,
    offer BLOB NOT NULL,
    counterparty BLOB NOT NULL,
    terms BLOB NOT NULL,
    accept BLOB NOT NULL,
    price INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL,
    manifest BLOB,
    chunks_total INTEGER NOT NULL DEFAULT 0,
    chunks_done INTEGER NOT NULL DEFAULT 0,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    detail TEXT NOT NULL DEFAULT '',
    receipt BLOB,
    gain_ppm INTEGER,
    accuracy_delta_ppm INTEGER,
    model TEXT NOT NULL DEFAULT '',
    model_version INTEGER
);
CREATE INDEX IF NOT EXISTS deals_by_state ON deals (state);

CREATE TABLE IF NOT EXISTS ledger (
    idx INTEGER PRIMARY KEY,
    receipt_id BLOB NOT NULL UNIQUE,
    deal_id BLOB NOT NULL UNIQUE,
    receipt BLOB NOT NULL,
    previous BLOB NOT NULL,
    entry_hash BLOB NOT NULL,
    counterparty BLOB NOT NULL,
    amount INTEGER NOT NULL,
    created_ms INTEGER NOT NULL
);

CREATE TABLE IF NOT EXISTS meta (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
"""


class Database:
    """One SQLite connection shared by the trio thread and worker threads."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None, timeout=30.0)
        self._connection.row_factory = sqlite3.Row
        self._lock = threading.RLock()
        with self._lock:
            self._connection.execute("PRAGMA journal_mode=WAL")
            self._connection.execute("PRAGMA synchronous=FULL")
            self._connection.execute("PRAGMA foreign_keys=ON")
            self._connection.executescript(SCHEMA)
            self._connection.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),)
            )

    def close(self) -> None:
        with self._lock:
            self._connection.close()

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """Run the block's statements as one transaction (BEGIN IMMEDIATE ... COMMIT)."""
        with self._lock:
            self._connection.execute("BEGIN IMMEDIATE")
            try:
                yield self._connection
            except BaseException:
                self._connection.execute("ROLLBACK")
                raise
            self._connection.execute("COMMIT")

    def execute(self, sql: str, parameters: Sequence[Any] = ()) -> sqlite3.Cursor:
        with self._lock:
            return self._connection.execute(sql, parameters)

    def query(self, sql: str, parameters: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._connection.execute(sql, parameters).fetchall()

    def query_one(self, sql: str, parameters: Sequence[Any] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self._connection.execute(sql, parameters).fetchone()
            return row
