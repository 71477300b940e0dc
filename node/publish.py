"""This node's own offers: built from a local model, signed, and remembered.

An offer sells a whole model version or the tensors whose names match some
patterns (fnmatch, as in ``'hidden1.*'``). The offered bytes are a
safetensors stream: the model's own file, or a file of the chosen subset.
Its manifest root goes into the signed offer; the row in
``published_offers`` tells the seller's handlers which file serves a deal.

Sequence numbers are ``max(previous + 1, now in ms)``, so they keep rising
even if the database is replaced and a node republishes.
"""

from __future__ import annotations

import fnmatch
import hashlib
import mmap
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from node.models import ModelStore, ModelVersion
from node.store import Database
from protocol import limits
from protocol.codec import decode_as, encode
from protocol.identity import Signer
from protocol.manifest import build_manifest, manifest_root, parse_header
from protocol.messages import UNSIGNED, Manifest, Offer, PaymentTerms, sign_offer


class PublishError(ValueError):
    """An offer that cannot be made; the message names the value and the fix."""


@dataclass(frozen=True)
class PublishedOffer:
    offer: Offer
    offer_id: bytes
    model: str
    version: int
    path: Path
    manifest: Manifest
    reserve: int

    @property
    def manifest_bytes(self) -> bytes:
        return encode(self.manifest)


@dataclass(frozen=True)
class OfferRequest:
    """What `pmarket offer publish` asks for."""

    model: str
    price: int
    reserve: int | None = None
    tensors: tuple[str, ...] = ()
    expires_s: float = 3600.0
    payment: PaymentTerms = PaymentTerms.DELIVERY
    min_gain_ppm: int = 0
    offer_key: str | None = None
    metrics: tuple[tuple[str, int], ...] = ()


def parse_terms(text: str) -> tuple[PaymentTerms, int]:
    """Parse ``delivery`` or ``gain:MIN`` (MIN a relative gain such as 0.01 or 1%)."""
    if text == "delivery":
        return PaymentTerms.DELIVERY, 0
    if text.startswith("gain:"):
        value = text[5:].strip()
        try:
            gain = float(value[:-1]) / 100 if value.endswith("%") else float(value)
        except ValueError:
            gain = -1.0
        if not 0.0 <= gain <= 1.0:
            raise PublishError(f"terms {text!r}: the minimum gain must be a number in [0, 1] or a percentage")
        return PaymentTerms.GAIN, round(gain * limits.PPM)
    raise PublishError(f"terms {text!r} must be 'delivery' or 'gain:MIN' (for example gain:0.01)")


def select_tensors(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """Names matching any pattern, in file order; every pattern must match something."""
    if not patterns:
        return list(names)
    chosen = [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(name, p) for name in names)]
    if unmatched:
        raise PublishError(
            f"tensor pattern(s) {', '.join(map(repr, unmatched))} match no tensor; the model has {', '.join(names[:20])}"
            + (" ..." if len(names) > 20 else "")
        )
    return chosen


def _manifest_of_file(path: Path, chunk_size: int) -> Manifest:
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as view:
        return build_manifest(memoryview(view), chunk_size=chunk_size)


class Publisher:
    def __init__(self, db: Database, models: ModelStore, signer: Signer, *, chunk_size: int) -> None:
        self.db = db
        self.models = models
        self.signer = signer
        self.chunk_size = chunk_size

    def prepare(self, request: OfferRequest, *, now_ms: int, reserve_fraction: float) -> PublishedOffer:
        """Build and sign the offer and write its row; blocks on disk (run in a thread)."""
        version: ModelVersion = self.models.get(request.model)
        if request.price < 0:
            raise PublishError(f"price {request.price} must not be negative")
        reserve = request.reserve if request.reserve is not None else int(request.price * reserve_fraction)
        if not 0 <= reserve <= request.price:
            raise PublishError(f"reserve {reserve} must be between 0 and the price {request.price}")
        if not 1 <= request.expires_s <= limits.MAX_OFFER_LIFETIME_MS / 1000:
            raise PublishError(
                f"expiry of {request.expires_s:g} s must be between 1 s and {limits.MAX_OFFER_LIFETIME_MS // 86_400_000} days"
            )

        # What is offered: the whole file, or a file of the chosen tensors.
        manifest = self.models.read_manifest(version)
        all_names = [t.name for t in parse_header(manifest.header).tensors]
        chosen = select_tensors(all_names, request.tensors)
        offered: tuple[str, ...] = ()
        if len(chosen) == len(all_names):
            path = version.path
        else:
            if len(chosen) > limits.MAX_OFFER_TENSORS:
                raise PublishError(f"{len(chosen)} tensors chosen; an offer lists at most {limits.MAX_OFFER_TENSORS}")
            path = self.models.subset_file(version, chosen)
            manifest = self.models.subset_manifest(version, chosen)
            offered = tuple(chosen)
        if manifest.chunk_size != self.chunk_size and not offered:
            manifest = _manifest_of_file(path, self.chunk_size)

        key = request.offer_key or version.name
        if offered:
            key = f"{version.name}:{hashlib.blake2s('|'.join(offered).encode(), digest_size=4).hexdigest()}"
        offer = sign_offer(
            Offer(
                seller=self.signer.peer_id,
                family=version.family,
                offer_key=key[: limits.MAX_OFFER_KEY],
                task=version.task,
                tensors=offered,
                manifest_root=manifest_root(manifest),
                total_bytes=manifest.total_bytes,
                chunk_size=manifest.chunk_size,
                price=request.price,
                payment=request.payment,
                min_gain_ppm=request.min_gain_ppm,
                metrics=tuple(sorted(request.metrics)),
                seq=max(self._last_seq(version.family, key) + 1, now_ms),
                created_ms=now_ms,
                expires_ms=now_ms + int(request.expires_s * 1000),
                signature=UNSIGNED,
            ),
            self.signer,
        )
        published = PublishedOffer(offer, offer.offer_id, version.name, version.version, path, manifest, reserve)
        self.db.execute(
            """INSERT INTO published_offers (offer_id, model, version, offer_key, family, seq, data, path,
                   manifest, reserve, created_ms, expires_ms) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
            (
                published.offer_id, version.name, version.version, offer.offer_key, offer.family, offer.seq,
                encode(offer), str(path), encode(manifest), reserve, offer.created_ms, offer.expires_ms,
            ),
        )
        return published

    def _last_seq(self, family: bytes, key: str) -> int:
        row = self.db.query_one(
            "SELECT MAX(seq) AS seq FROM published_offers WHERE family = ? AND offer_key = ?", (family, key)
        )
        return int(row["seq"]) if row is not None and row["seq"] is not None else 0

    def get(self, offer_id: bytes) -> PublishedOffer | None:
        row = self.db.query_one("SELECT * FROM published_offers WHERE offer_id = ?", (offer_id,))
        if row is None:
            return None
        offer = decode_as(Offer, row["data"])
        return PublishedOffer(
            offer, row["offer_id"], row["model"], row["version"], Path(row["path"]), decode_as(Manifest, row["manifest"]), row["reserve"]
        )

    def live(self, now_ms: int) -> list[PublishedOffer]:
        rows = self.db.query("SELECT offer_id FROM published_offers WHERE expires_ms > ? ORDER BY created_ms", (now_ms,))
        return [p for p in (self.get(row["offer_id"]) for row in rows) if p is not None]
