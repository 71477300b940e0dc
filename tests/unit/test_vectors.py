"""docs/protocol.md: its test vectors and limits agree with the code."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest

from protocol import limits
from protocol.codec import Message, decode, encode
from protocol.manifest import decode_manifest
from protocol.messages import (
    Accept,
    Bid,
    Counter,
    Manifest,
    Offer,
    Receipt,
    Reject,
    verify_accept,
    verify_offer,
    verify_proposal,
    verify_receipt,
    verify_reject,
)
from protocol.offers import validate_offer
from protocol.testvectors import CREATED_MS, build, render_markdown

PAGE = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"


def page_vectors() -> dict[str, bytes]:
    text = PAGE.read_text()
    blocks = re.findall(r"```vector (\w+)\n([0-9a-f\n]+)```", text)
    return {name: bytes.fromhex(body.replace("\n", "")) for name, body in blocks}


def test_page_section_is_current() -> None:
    buffer = io.StringIO()
    render_markdown(buffer.write)
    text = PAGE.read_text()
    section = text.split("<!-- vectors:begin -->\n", 1)[1].split("<!-- vectors:end -->", 1)[0]
    assert section.strip() == buffer.getvalue().strip(), "run scripts/protocol-vectors and update docs/protocol.md"


@pytest.mark.parametrize(("name", "entry"), list(build().items()))
def test_vector_matches_page(name: str, entry: tuple[Message | bytes, str]) -> None:
    value, _ = entry
    expected = value if isinstance(value, bytes) else encode(value)
    assert page_vectors()[name] == expected


def test_page_vectors_decode_and_verify() -> None:
    vectors = page_vectors()
    messages = {name: decode(data) for name, data in vectors.items() if name not in NON_MESSAGES}
    for name, message in messages.items():
        assert encode(message) == vectors[name], name

    offer = messages["offer"]
    assert isinstance(offer, Offer)
    verify_offer(offer)
    assert validate_offer(vectors["offer"], now_ms=CREATED_MS).offer_id == vectors["offer_id"]
    assert offer.seller == vectors["seller_peer_id"]
    assert offer.family == vectors["family"]

    manifest, header = decode_manifest(vectors["manifest"], vectors["manifest_root"])
    assert isinstance(manifest, Manifest)
    assert [t.name for t in header.tensors] == ["bias", "weight"]
    assert manifest.total_bytes == len(vectors["weights"])

    bid, counter, accept = messages["bid"], messages["counter"], messages["accept"]
    assert isinstance(bid, Bid)
    assert isinstance(counter, Counter)
    assert isinstance(accept, Accept)
    verify_proposal(bid)
    verify_proposal(counter)
    verify_accept(accept)
    assert accept.deal_id == vectors["deal_id"]

    reject, receipt = messages["reject"], messages["receipt"]
    assert isinstance(reject, Reject)
    assert isinstance(receipt, Receipt)
    verify_reject(reject)
    verify_receipt(receipt)
    assert receipt.receipt_id == vectors["receipt_id"]


NON_MESSAGES = {
    "seller_peer_id",
    "buyer_peer_id",
    "weights",
    "family",
    "manifest_root",
    "offer_id",
    "deal_id",
    "receipt_id",
    "ledger_entry_0",
}


def test_limits_table_matches_code() -> None:
    rows = re.findall(r"^\| ([A-Z_]+) \| (\d+) \|", PAGE.read_text(), flags=re.MULTILINE)
    documented = {name: int(value) for name, value in rows}
    in_code = {
        name: getattr(limits, name)
        for name in dir(limits)
        if name.startswith(("MAX_", "MIN_", "DEFAULT_"))
    }
    assert documented == in_code
