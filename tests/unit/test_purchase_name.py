"""The name under which a buyer stores weights bought outright."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from node.buyer import Buyer
from node.models import ModelStore, check_name
from node.store import Database
from protocol import limits
from protocol.identity import peer_id_to_text

SELLER = b"\x00\x24\x08\x01\x12\x20" + bytes(range(32))
OTHER_SELLER = b"\x00\x24\x08\x01\x12\x20" + bytes(range(1, 33))
TAIL = peer_id_to_text(SELLER)[-6:]


class Deals:
    """The deal book's `get`: each deal ID maps to the seller it was bought from."""

    def __init__(self) -> None:
        self.sellers: dict[bytes, bytes] = {}

    def get(self, deal_id: bytes) -> Any:
        seller = self.sellers.get(deal_id)
        return None if seller is None else SimpleNamespace(counterparty=seller)


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "node.db")
    yield database
    database.close()


@pytest.fixture
def store(tmp_path: Path, db: Database) -> ModelStore:
    return ModelStore(tmp_path / "models", db, chunk_size=limits.MIN_CHUNK_SIZE)


@pytest.fixture
def deals() -> Deals:
    return Deals()


@pytest.fixture
def buyer(store: ModelStore, deals: Deals) -> Buyer:
    return Buyer(SimpleNamespace(models=store, deals=deals))  # type: ignore[arg-type]


TENSORS = {"w": torch.zeros(4)}


def add(store: ModelStore, deals: Deals, name: str, *, source: str, seller: bytes | None = None) -> Any:
    deal_id = None
    if seller is not None:
        deal_id = bytes([len(deals.sellers)]) * 32
        deals.sellers[deal_id] = seller
    return store.add_tensors(name, TENSORS, task="", source=source, deal_id=deal_id, now_ms=1)


def record_for(store: ModelStore, key: str = "mlp", seller: bytes = SELLER) -> Any:
    family = store.list()[0].family if store.list() else b"\x01" * 32
    return SimpleNamespace(offer=SimpleNamespace(offer_key=key, family=family), counterparty=seller)


def test_free_name_is_the_offer_name(buyer: Buyer, store: ModelStore) -> None:
    assert buyer._purchase_name(record_for(store, "mlp:v2")) == "mlp"


def test_own_model_of_that_name_is_never_extended(buyer: Buyer, store: ModelStore, deals: Deals) -> None:
    for source in ("init", "train", "merge", "import"):
        add(store, deals, "mlp", source=source)
        assert buyer._purchase_name(record_for(store)) == f"mlp-{TAIL}", source


def test_same_seller_adds_version(buyer: Buyer, store: ModelStore, deals: Deals) -> None:
    add(store, deals, "mlp", source="purchase", seller=SELLER)
    assert buyer._purchase_name(record_for(store)) == "mlp"
    # From another seller, the weights go under a name of their own.
    assert buyer._purchase_name(record_for(store, seller=OTHER_SELLER)) == (
        f"mlp-{peer_id_to_text(OTHER_SELLER)[-6:]}"
    )
    # So do weights of another family from the same seller.
    other_family = record_for(store)
    other_family.offer.family = b"\x09" * 32
    assert buyer._purchase_name(other_family) == f"mlp-{TAIL}"


def test_purchase_later_merged_into_is_the_buyer_own(buyer: Buyer, store: ModelStore, deals: Deals) -> None:
    add(store, deals, "mlp", source="purchase", seller=SELLER)
    add(store, deals, "mlp", source="merge")
    assert buyer._purchase_name(record_for(store)) == f"mlp-{TAIL}"


def test_counter_when_the_seller_name_is_taken(buyer: Buyer, store: ModelStore, deals: Deals) -> None:
    add(store, deals, "mlp", source="init")
    add(store, deals, f"mlp-{TAIL}", source="import")
    add(store, deals, f"mlp-{TAIL}-2", source="train")
    assert buyer._purchase_name(record_for(store)) == f"mlp-{TAIL}-3"


@pytest.mark.parametrize(
    ("key", "expected"),
    [("my model", "my-model"), ("..hidden", "hidden"), ("çà", "bought"), ("é-net", "net"), ("x" * 80, "x" * 48)],
)
def test_offer_key_becomes_a_valid_name(buyer: Buyer, store: ModelStore, key: str, expected: str) -> None:
    name = buyer._purchase_name(record_for(store, key))
    assert name == expected
    assert check_name(name) == name
