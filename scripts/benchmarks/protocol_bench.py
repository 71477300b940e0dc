"""Offers signed and encoded, and decoded and verified, per second on one core.

The baseline is the Ed25519 check alone (the `cryptography` verify call on
the same signed bytes, with the public key already parsed), measured
interleaved with the full path in the same process. Goal: decode plus verify
costs at most 20% more than that check.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from protocol import limits
from protocol.codec import encode, encode_body
from protocol.identity import Signer, _public_key, signed_bytes
from protocol.messages import OFFER_TAG, UNSIGNED, Offer, PaymentTerms, sign_offer
from protocol.offers import validate_offer
from scripts.benchmarks.record import Result, interleaved, median

NOW = 1_767_225_600_000


def example_offer(signer: Signer, seq: int) -> Offer:
    return Offer(
        seller=signer.peer_id,
        family=bytes(range(32)),
        offer_key="digits-mlp",
        task="digits",
        tensors=(),
        manifest_root=bytes(range(32, 64)),
        total_bytes=123_456,
        chunk_size=limits.DEFAULT_CHUNK_SIZE,
        price=250,
        payment=PaymentTerms.GAIN,
        min_gain_ppm=10_000,
        metrics=(("val_accuracy", 912_500), ("val_loss", 301_000)),
        seq=seq,
        created_ms=NOW,
        expires_ms=NOW + 3_600_000,
        signature=UNSIGNED,
    )


@contextmanager
def one_core() -> Iterator[None]:
    """Pin this process to one core, and restore its affinity afterwards.

    The figures are per core, and a second core would only add noise. The
    old affinity comes back so that benchmarks run after this one, and the
    processes they start, get every core again.
    """
    if not hasattr(os, "sched_setaffinity"):
        yield
        return
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(previous)})
    try:
        yield
    finally:
        os.sched_setaffinity(0, previous)


def main() -> Result:
    with one_core():
        return measure()


def measure() -> Result:
    signer = Signer.generate()
    offer = sign_offer(example_offer(signer, 1), signer)
    data = encode(offer)
    key = _public_key(offer.seller)
    message = signed_bytes(OFFER_TAG, encode_body(offer))
    counter = iter(range(2, 10**9))

    samples = interleaved(
        {
            "ed25519_verify": lambda: key.verify(offer.signature, message),
            "decode_verify": lambda: validate_offer(data, now_ms=NOW),
            "decode_verify_new_seller": lambda: (_public_key.cache_clear(), validate_offer(data, now_ms=NOW)),
            "sign_encode": lambda: encode(sign_offer(example_offer(signer, next(counter)), signer)),
        },
        repeat=2000,
        rounds=15,
    )
    verify_s = median(samples["ed25519_verify"])
    decode_s = median(samples["decode_verify"])
    sign_s = median(samples["sign_encode"])
    new_seller_s = median(samples["decode_verify_new_seller"])
    ratios = sorted(d / v for d, v in zip(samples["decode_verify"], samples["ed25519_verify"], strict=True))
    ratio = median(ratios)

    result = Result(
        name="protocol",
        title="offer encoding and signatures, one core",
        columns=["operation", "offers/s (median of 15)", "µs per offer", "vs Ed25519 check"],
    )
    result.rows.append(["Ed25519 check alone (baseline)", f"{1 / verify_s:,.0f}", f"{verify_s * 1e6:.1f}", "1.00"])
    result.rows.append(["decode + validate + verify (seller's key cached)", f"{1 / decode_s:,.0f}", f"{decode_s * 1e6:.1f}", f"{ratio:.3f}"])
    result.rows.append(
        [
            "the same, seller's key not yet cached",
            f"{1 / new_seller_s:,.0f}",
            f"{new_seller_s * 1e6:.1f}",
            f"{new_seller_s / verify_s:.3f}",
        ]
    )
    result.rows.append(["build + sign + encode", f"{1 / sign_s:,.0f}", f"{sign_s * 1e6:.1f}", f"{sign_s / verify_s:.2f}"])
    verdict = "met" if ratio <= 1.2 else "NOT met"
    result.notes.append(
        f"Offer of {len(data)} bytes. Goal (decode plus verify at most 1.20 times the Ed25519 check): "
        f"{verdict}, median ratio {ratio:.3f} (per-round ratios {ratios[0]:.3f} to {ratios[-1]:.3f})."
    )
    return result
