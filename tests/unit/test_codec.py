"""Canonical encoding and strict decoding of every message type."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest

from protocol import limits
from protocol.codec import decode, decode_as, encode, pack
from protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from protocol.messages import ErrorMessage, Offer, Receipt
from tests.unit.factories import examples


def raw_of(name: str) -> list[object]:
    return msgpack.unpackb(encode(examples()[name]), raw=False)


def reason_of(data: bytes, expected: tuple[type, ...] | None = None) -> Reason:
    with pytest.raises(RemoteProtocolError) as info:
        decode(data, expected)  # type: ignore[arg-type]
    return info.value.reason


@pytest.mark.parametrize("name", sorted(examples()))
def test_round_trip(name: str) -> None:
    message = examples()[name]
    data = encode(message)
    assert decode(data) == message
    assert encode(decode(data)) == data


def test_decode_as_rejects_other_type() -> None:
    data = encode(examples()["bid"])
    with pytest.raises(RemoteProtocolError) as info:
        decode_as(Offer, data)
    assert info.value.reason == Reason.UNKNOWN_TYPE


def test_trailing_bytes() -> None:
    assert reason_of(encode(examples()["offer"]) + b"\x00") == Reason.TRAILING_BYTES


def test_truncated() -> None:
    data = encode(examples()["offer"])
    assert reason_of(data[:-1]) == Reason.MALFORMED


def test_empty_input() -> None:
    assert reason_of(b"") == Reason.MALFORMED


def test_unknown_type() -> None:
    raw = raw_of("error")
    raw[0] = 250
    assert reason_of(pack(raw)) == Reason.UNKNOWN_TYPE


def test_unsupported_version() -> None:
    raw = raw_of("offer")
    raw[1] = 2
    assert reason_of(pack(raw)) == Reason.UNSUPPORTED_VERSION


def test_header_not_array() -> None:
    assert reason_of(pack(7)) == Reason.MALFORMED
    assert reason_of(pack([10])) == Reason.MALFORMED


def test_wrong_field_count() -> None:
    raw = raw_of("error")
    assert reason_of(pack([*raw, "extra"])) == Reason.MALFORMED
    assert reason_of(pack(raw[:-1])) == Reason.MALFORMED


@pytest.mark.parametrize(
    ("index", "value"),
    [
        (2, True),  # reason: bool where an integer belongs
        (2, "1"),  # reason: string
        (2, 1.0),  # reason: float
        (2, None),  # reason: nil
        (2, 12345),  # reason: not a known Reason
        (3, b"bytes"),  # detail: bin where str belongs
        (3, 7),  # detail: integer
    ],
)
def test_wrong_field_types(index: int, value: object) -> None:
    raw = raw_of("error")
    raw[index] = value
    assert reason_of(pack(raw)) == Reason.INVALID_FIELD


def test_bool_field_rejects_integer() -> None:
    raw = raw_of("chunk_request")
    raw[3] = 1
    assert reason_of(pack(raw)) == Reason.INVALID_FIELD


def test_hash_of_wrong_length() -> None:
    raw = raw_of("offer")
    raw[3] = b"\x01" * 31  # family
    assert reason_of(pack(raw)) == Reason.INVALID_FIELD


def test_overlong_string() -> None:
    raw = raw_of("offer")
    raw[4] = "k" * (limits.MAX_OFFER_KEY + 1)
    assert reason_of(pack(raw)) == Reason.INVALID_FIELD


def test_overlong_multibyte_string() -> None:
    raw = raw_of("error")
    raw[3] = "é" * (limits.MAX_DETAIL // 2 + 1)  # 2 bytes per character in UTF-8
    assert reason_of(pack(raw)) == Reason.INVALID_FIELD


def test_overlong_list() -> None:
    raw = raw_of("offer")
    raw[6] = [f"t{i}" for i in range(limits.MAX_OFFER_TENSORS + 1)]
    assert reason_of(pack(raw)) == Reason.INVALID_FIELD


def test_negative_unsigned() -> None:
    raw = raw_of("offer")
    raw[11] = -1  # price
    assert reason_of(pack(raw)) == Reason.INVALID_FIELD


def test_uint_range_limit() -> None:
    raw = raw_of("offer")
    raw[13] = limits.PPM + 1  # min_gain_ppm
    assert reason_of(pack(raw)) == Reason.INVALID_FIELD


def test_message_over_type_size_limit() -> None:
    raw = raw_of("error")
    raw[3] = "x" * (ErrorMessage.MAX_SIZE + 1)
    assert reason_of(pack(raw)) == Reason.TOO_LARGE


def test_input_over_expected_size_limit() -> None:
    data = pack(raw_of("error")) + b"\x00" * ErrorMessage.MAX_SIZE
    assert reason_of(data, (ErrorMessage,)) == Reason.TOO_LARGE


def test_map_rejected() -> None:
    raw = raw_of("error")
    raw[3] = {"a": "b"}
    assert reason_of(pack(raw)) == Reason.MALFORMED


def test_ext_type_rejected() -> None:
    data = msgpack.packb([10, 1, 0, msgpack.ExtType(5, b"x")], use_bin_type=True)
    assert reason_of(data) == Reason.MALFORMED


def test_invalid_utf8_rejected() -> None:
    # fixarray of 4: type 10, version 1, reason 0, fixstr of length 1 holding 0xff
    assert reason_of(bytes([0x94, 0x0A, 0x01, 0x00, 0xA1, 0xFF])) == Reason.MALFORMED


def test_non_canonical_integer() -> None:
    # The reason code 0 as uint16 (0xcd 0x00 0x00) instead of fixint.
    assert reason_of(bytes([0x94, 0x0A, 0x01, 0xCD, 0x00, 0x00, 0xA0])) == Reason.NON_CANONICAL


def test_non_canonical_string_header() -> None:
    # An empty detail as str8 (0xd9 0x00) instead of fixstr.
    assert reason_of(bytes([0x94, 0x0A, 0x01, 0x00, 0xD9, 0x00])) == Reason.NON_CANONICAL


def test_non_canonical_array_header() -> None:
    # The message array as array16 (0xdc 0x00 0x04) instead of fixarray.
    assert reason_of(bytes([0xDC, 0x00, 0x04, 0x0A, 0x01, 0x00, 0xA0])) == Reason.NON_CANONICAL


def test_canonical_error_decodes() -> None:
    assert decode(bytes([0x94, 0x0A, 0x01, 0x00, 0xA0])) == ErrorMessage(Reason.OK, "")


def test_unsorted_metrics_rejected() -> None:
    raw = raw_of("offer")
    raw[14] = [["z", 1], ["a", 2]]
    assert reason_of(pack(raw)) == Reason.INVALID_FIELD


def test_duplicate_offer_tensors_rejected() -> None:
    raw = raw_of("offer")
    raw[6] = ["a", "a"]
    assert reason_of(pack(raw)) == Reason.INVALID_FIELD


def test_chunk_ranges_must_ascend() -> None:
    raw = raw_of("chunk_request")
    raw[4] = [[5, 2], [6, 1]]
    assert reason_of(pack(raw)) == Reason.INVALID_FIELD


def test_receipt_seller_signature_sizes() -> None:
    raw = raw_of("receipt")
    raw[-1] = b"\x01" * 10
    assert reason_of(pack(raw)) == Reason.INVALID_FIELD


def test_encode_rejects_out_of_range_value() -> None:
    offer = examples()["offer"]
    assert isinstance(offer, Offer)
    with pytest.raises(LocalProtocolError):
        encode(dataclasses.replace(offer, price=-5))


def test_encode_rejects_oversized_message() -> None:
    offer = examples()["offer"]
    assert isinstance(offer, Offer)
    huge = tuple(f"{i:0250d}" for i in range(300))  # about 75 KiB of names
    with pytest.raises(LocalProtocolError):
        encode(dataclasses.replace(offer, tensors=huge))


def test_receipt_id_ignores_countersignature() -> None:
    receipt = examples()["receipt"]
    assert isinstance(receipt, Receipt)
    bare = dataclasses.replace(receipt, seller_signature=b"")
    assert bare.receipt_id == receipt.receipt_id
