"""Deterministic example messages for docs/protocol.md and its tests.

The keys come from fixed seeds and Ed25519 signatures are deterministic, so
every vector is the same on every machine. `scripts/protocol-vectors` prints
them as the Markdown section of docs/protocol.md; tests check that the page
and this module agree and that every vector decodes and verifies.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable

from protocol import limits
from protocol.codec import Message, encode
from protocol.errors import Reason
from protocol.identity import Signer
from protocol.ledger import GENESIS, chain_hash
from protocol.manifest import build_manifest, family_hash, manifest_root, parse_header
from protocol.messages import (
    UNSIGNED,
    ChunkHeader,
    ChunkRequest,
    DealTerms,
    ErrorMessage,
    Offer,
    OfferSyncRequest,
    Outcome,
    PaymentTerms,
    Receipt,
    Reject,
    countersign_receipt,
    sign_accept,
    sign_bid,
    sign_counter,
    sign_offer,
    sign_receipt,
    sign_reject,
)

SELLER_SEED = bytes(range(1, 33))
BUYER_SEED = bytes(range(101, 133))
CREATED_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z
NONCE = bytes(range(16))


def example_weights() -> bytes:
    """Build a two-tensor safetensors stream: F32 bias [2] and F32 weight [2, 2]."""
    header = {
        "bias": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
        "weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [8, 24]},
    }
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the library pads headers to 8 bytes
    data = struct.pack("<6f", 0.5, -0.5, 1.0, 2.0, 3.0, 4.0)
    return struct.pack("<Q", len(text)) + text + data


def build() -> dict[str, tuple[Message | bytes, str]]:
    """Name -> (message or derived bytes, one-line description), in page order."""
    seller = Signer.from_seed(SELLER_SEED)
    buyer = Signer.from_seed(BUYER_SEED)
    weights = example_weights()
    manifest = build_manifest(weights, chunk_size=limits.MIN_CHUNK_SIZE)
    root = manifest_root(manifest)
    family = family_hash(parse_header(manifest.header).tensors)

    offer = sign_offer(
        Offer(
            seller=seller.peer_id,
            family=family,
            offer_key="example-mlp",
            task="digits",
            tensors=(),
            manifest_root=root,
            total_bytes=manifest.total_bytes,
            chunk_size=manifest.chunk_size,
            price=250,
            payment=PaymentTerms.GAIN,
            min_gain_ppm=10_000,
            metrics=(("val_accuracy", 912_500), ("val_loss", 301_000)),
            seq=7,
            created_ms=CREATED_MS,
            expires_ms=CREATED_MS + 3_600_000,
            signature=UNSIGNED,
        ),
        seller,
    )
    terms = DealTerms(
        offer_id=offer.offer_id,
        seller=seller.peer_id,
        buyer=buyer.peer_id,
        manifest_root=root,
        total_bytes=manifest.total_bytes,
        price=200,
        payment=PaymentTerms.GAIN,
        min_gain_ppm=10_000,
        nonce=NONCE,
        expires_ms=CREATED_MS + 600_000,
    )
    bid = sign_bid(terms, 0, buyer)
    countered = dataclasses.replace(terms, price=230)
    counter = sign_counter(countered, 1, seller)
    accept = sign_accept(counter, buyer)
    reject = sign_reject(
        Reject(offer.offer_id, NONCE, 1, seller.peer_id, Reason.PRICE_BELOW_RESERVE, "ask is 250", UNSIGNED),
        seller,
    )
    receipt = countersign_receipt(
        sign_receipt(
            Receipt(
                deal_id=accept.deal_id,
                seller=seller.peer_id,
                buyer=buyer.peer_id,
                outcome=Outcome.PAID,
                amount=230,
                reason=Reason.OK,
                gain_ppm=41_250,
                accuracy_delta_ppm=12_000,
                created_ms=CREATED_MS + 5_000,
                buyer_signature=UNSIGNED,
                seller_signature=b"",
            ),
            buyer,
        ),
        seller,
    )
    return {
        "seller_peer_id": (seller.peer_id, "peer ID of the seller key (seed 01 02 ... 20)"),
        "buyer_peer_id": (buyer.peer_id, "peer ID of the buyer key (seed 65 66 ... 84)"),
        "weights": (weights, "the safetensors stream offered: bias F32 [2], weight F32 [2, 2]"),
        "family": (family, "family hash of those weights"),
        "manifest": (manifest, "its manifest with 64 KiB chunks (one chunk)"),
        "manifest_root": (root, "the manifest root that the offer signs"),
        "offer": (offer, "the seller's offer"),
        "offer_id": (offer.offer_id, "its offer ID"),
        "offer_sync_request": (OfferSyncRequest((family,), 100), "a catch-up request for one family"),
        "bid": (bid, "the buyer bids 200"),
        "counter": (counter, "the seller counters 230 in round 1"),
        "accept": (accept, "the buyer accepts the counter"),
        "deal_id": (accept.deal_id, "the deal ID of the accepted terms"),
        "reject": (reject, "a seller's reject, for comparison"),
        "chunk_request": (ChunkRequest(accept.deal_id, True, ((0, 1),)), "manifest and chunk 0"),
        "chunk_header": (ChunkHeader(0, manifest.total_bytes), "header before chunk 0's raw bytes"),
        "receipt": (receipt, "paid receipt, countersigned"),
        "receipt_id": (receipt.receipt_id, "its receipt ID"),
        "ledger_entry_0": (chain_hash(GENESIS, receipt.receipt_id), "ledger hash of that receipt as entry 0"),
        "error": (ErrorMessage(Reason.UNKNOWN_DEAL, "no such deal"), "an error frame"),
    }


def vector_hex(value: Message | bytes) -> str:
    return (value if isinstance(value, bytes) else encode(value)).hex()


def render_markdown(write: Callable[[str], None]) -> None:
    """Write the test-vector section of docs/protocol.md."""
    for name, (value, description) in build().items():
        write(f"`{name}`: {description}.\n\n```vector {name}\n")
        text = vector_hex(value)
        for start in range(0, len(text), 96):
            write(text[start : start + 96] + "\n")
        write("```\n\n")
