"""Property tests: bytes from a peer give a message or RemoteProtocolError, nothing else."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import Any

import msgpack
from hypothesis import given
from hypothesis import strategies as st

from protocol.codec import decode, decode_as, encode, registered_types
from protocol.errors import RemoteProtocolError
from protocol.framing import FrameReader, decode_uvarint
from protocol.manifest import decode_manifest, parse_header
from protocol.offers import validate_offer
from tests.unit.factories import examples

NOW = 1_767_225_600_000
EXAMPLE_BYTES = [encode(m) for m in examples().values()]


def only_remote_errors(function: Callable[[bytes], Any], data: bytes) -> None:
    with contextlib.suppress(RemoteProtocolError):
        function(data)


DECODERS: list[Callable[[bytes], Any]] = [
    decode,
    *[functools.partial(decode_as, cls) for cls in registered_types().values()],
    lambda data: validate_offer(data, now_ms=NOW),
    lambda data: decode_manifest(data, b"\x00" * 32),
    parse_header,
    lambda data: decode_uvarint(data),
]


@given(data=st.binary(max_size=512), which=st.integers(0, len(DECODERS) - 1))
def test_arbitrary_bytes(data: bytes, which: int) -> None:
    only_remote_errors(DECODERS[which], data)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(EXAMPLE_BYTES)))
    for _ in range(draw(st.integers(1, 4))):
        action = draw(st.sampled_from(["flip", "insert", "delete", "truncate", "set"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "flip" and data:
            data[position] ^= 1 << draw(st.integers(0, 7))
        elif action == "insert":
            data.insert(position, draw(st.integers(0, 255)))
        elif action == "delete" and data:
            del data[position]
        elif action == "truncate":
            del data[position:]
        elif action == "set" and data:
            data[position] = draw(st.sampled_from([0x00, 0x7F, 0x80, 0x90, 0xC0, 0xC2, 0xC4, 0xD9, 0xDC, 0xFF]))
    return bytes(data)


@given(data=mutated(), which=st.integers(0, len(DECODERS) - 1))
def test_mutated_messages(data: bytes, which: int) -> None:
    only_remote_errors(DECODERS[which], data)


msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**64), 2**64 - 1)
    | st.floats(allow_nan=True)
    | st.text(max_size=20)
    | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=20,
)


@given(type_code=st.sampled_from(sorted(registered_types())), fields=st.lists(msgpack_values, max_size=18))
def test_well_formed_header_random_fields(type_code: int, fields: list[Any]) -> None:
    try:
        data = msgpack.packb([type_code, 1, *fields], use_bin_type=True)
    except (OverflowError, ValueError, TypeError):
        return
    only_remote_errors(decode, data)


@given(chunks=st.lists(st.binary(max_size=64), max_size=10), limit=st.integers(0, 100))
def test_frame_reader(chunks: list[bytes], limit: int) -> None:
    reader = FrameReader(max_frame=limit)
    with contextlib.suppress(RemoteProtocolError):
        for chunk in chunks:
            reader.feed(chunk)
            while (frame := reader.next_frame()) is not None:
                assert len(frame) <= limit
