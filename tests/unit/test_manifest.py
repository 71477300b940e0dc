"""Manifests, chunk verification and the safetensors header rules."""

from __future__ import annotations

import json
import pickle
import struct
from typing import Any

import numpy as np
import pytest
import safetensors
import safetensors.numpy
from hypothesis import given
from hypothesis import strategies as st

from protocol import limits
from protocol.codec import encode
from protocol.errors import Reason, RemoteProtocolError
from protocol.manifest import (
    DTYPE_BITS,
    build_manifest,
    check_manifest,
    chunk_bounds,
    decode_manifest,
    family_hash,
    header_prefix,
    manifest_root,
    parse_header,
    split_stream,
    verify_chunk,
)

CHUNK = limits.MIN_CHUNK_SIZE


def weights_bytes(seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    tensors = {
        "layer1.weight": rng.standard_normal((128, 256)).astype(np.float32),  # 128 KiB
        "layer1.bias": rng.standard_normal(128).astype(np.float32),
        "layer2.weight": rng.standard_normal((10, 128)).astype(np.float16),
        "steps": np.array([3], dtype=np.int64),
    }
    return safetensors.numpy.save(tensors)


def test_manifest_covers_stream() -> None:
    data = weights_bytes()
    manifest = build_manifest(data, chunk_size=CHUNK)
    assert manifest.total_bytes == len(data)
    assert len(manifest.chunk_hashes) == 32 * -(-len(data) // CHUNK)
    assert header_prefix(manifest) == data[: len(header_prefix(manifest))]


def test_every_chunk_verifies() -> None:
    data = weights_bytes()
    manifest = build_manifest(data, chunk_size=CHUNK)
    count = len(manifest.chunk_hashes) // 32
    assert count >= 3
    for index in range(count):
        begin, end = chunk_bounds(manifest, index)
        verify_chunk(manifest, index, data[begin:end])


def test_flipped_byte_fails_chunk() -> None:
    data = bytearray(weights_bytes())
    manifest = build_manifest(bytes(data), chunk_size=CHUNK)
    begin, end = chunk_bounds(manifest, 1)
    data[begin + 10] ^= 0x01
    with pytest.raises(RemoteProtocolError) as info:
        verify_chunk(manifest, 1, bytes(data[begin:end]))
    assert info.value.reason == Reason.CHUNK_HASH_MISMATCH


def test_short_chunk_is_truncated() -> None:
    data = weights_bytes()
    manifest = build_manifest(data, chunk_size=CHUNK)
    with pytest.raises(RemoteProtocolError) as info:
        verify_chunk(manifest, 0, data[: CHUNK - 1])
    assert info.value.reason == Reason.TRUNCATED


def test_chunk_index_out_of_range() -> None:
    manifest = build_manifest(weights_bytes(), chunk_size=CHUNK)
    with pytest.raises(RemoteProtocolError) as info:
        chunk_bounds(manifest, 10_000)
    assert info.value.reason == Reason.UNKNOWN_CHUNK


def test_manifest_checked_against_root() -> None:
    manifest = build_manifest(weights_bytes(), chunk_size=CHUNK)
    root = manifest_root(manifest)
    decoded, header = decode_manifest(encode(manifest), root)
    assert decoded == manifest
    assert [t.name for t in header.tensors] == ["layer1.bias", "layer1.weight", "layer2.weight", "steps"]
    other = manifest_root(build_manifest(weights_bytes(seed=1), chunk_size=CHUNK))
    with pytest.raises(RemoteProtocolError) as info:
        decode_manifest(encode(manifest), other)
    assert info.value.reason == Reason.MANIFEST_MISMATCH


def test_manifest_with_missing_hash_rejected() -> None:
    import dataclasses

    manifest = build_manifest(weights_bytes(), chunk_size=CHUNK)
    short = dataclasses.replace(manifest, chunk_hashes=manifest.chunk_hashes[:-32])
    with pytest.raises(RemoteProtocolError) as info:
        check_manifest(short)
    assert info.value.reason == Reason.MANIFEST_MISMATCH


def test_manifest_with_wrong_total_rejected() -> None:
    import dataclasses

    manifest = build_manifest(weights_bytes(), chunk_size=CHUNK)
    longer = dataclasses.replace(manifest, total_bytes=manifest.total_bytes + 1)
    with pytest.raises(RemoteProtocolError) as info:
        check_manifest(longer)
    assert info.value.reason == Reason.MANIFEST_MISMATCH


def test_pickle_rejected() -> None:
    data = pickle.dumps({"weight": [1.0, 2.0]})
    with pytest.raises(RemoteProtocolError) as info:
        build_manifest(data, chunk_size=CHUNK)
    assert info.value.reason == Reason.INVALID_WEIGHTS


def test_torch_zip_checkpoint_rejected() -> None:
    # torch.save writes a zip archive, which starts with "PK\x03\x04".
    with pytest.raises(RemoteProtocolError) as info:
        build_manifest(b"PK\x03\x04" + b"\x00" * 200, chunk_size=CHUNK)
    assert info.value.reason == Reason.INVALID_WEIGHTS


def test_trailing_data_rejected() -> None:
    with pytest.raises(RemoteProtocolError):
        build_manifest(weights_bytes() + b"\x00", chunk_size=CHUNK)


def test_family_ignores_order_and_values() -> None:
    a = parse_header(split_stream(weights_bytes(0))[1]).tensors
    b = parse_header(split_stream(weights_bytes(1))[1]).tensors
    assert family_hash(a) == family_hash(b)
    assert family_hash(list(reversed(a))) == family_hash(a)


@pytest.mark.parametrize(
    "change",
    [("layer1.bias", "F16", (128,)), ("layer1.bias", "F32", (127,)), ("layer1.bias2", "F32", (128,))],
)
def test_family_changes_with_layout(change: tuple[str, str, tuple[int, ...]]) -> None:
    base = [("layer1.bias", "F32", (128,)), ("layer1.weight", "F32", (128, 256))]
    changed = [change, base[1]]
    assert family_hash(changed) != family_hash(base)


@pytest.mark.parametrize(
    ("header", "fragment"),
    [
        (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', "twice"),
        (b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1],"x":1}}', "exactly"),
        (b' {"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', "start with"),
        (b'{"":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}', "empty name"),
    ],
)
def test_stricter_than_library(header: bytes, fragment: str) -> None:
    with pytest.raises(RemoteProtocolError) as info:
        parse_header(header)
    assert fragment in info.value.detail


# Differential test: the header rules agree with the safetensors library. -----

NAMES = st.text(alphabet="abcdefghij._", min_size=1, max_size=6)


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, bytes]:
    """A safetensors stream that is valid, or broken in one of several ways."""
    names = draw(st.lists(NAMES, min_size=0, max_size=5, unique=True))
    entries: dict[str, Any] = {}
    offset = 0
    for name in names:
        dtype = draw(st.sampled_from(sorted(DTYPE_BITS)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        elements = 1
        for d in shape:
            elements *= d
        size = elements * DTYPE_BITS[dtype] // 8
        entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    if draw(st.booleans()):
        entries["__metadata__"] = {"format": "np"}

    data_size = offset
    breakage = draw(st.sampled_from(["none", "offset", "dtype", "shape", "data", "float", "negative"]))
    tensor_names = [n for n in entries if n != "__metadata__"]
    if tensor_names and breakage != "none":
        target = entries[draw(st.sampled_from(tensor_names))]
        if breakage == "offset":
            target["data_offsets"] = [target["data_offsets"][0] + 1, target["data_offsets"][1] + 1]
        elif breakage == "dtype":
            target["dtype"] = "F128"
        elif breakage == "shape":
            target["shape"] = [*target["shape"], 3]
        elif breakage == "float":
            target["shape"] = [1.0]
        elif breakage == "negative":
            target["shape"] = [-1]
    if breakage == "data":
        data_size += draw(st.sampled_from([-1, 1, 7]))
    text = json.dumps(entries).encode()
    return text, b"\x00" * max(data_size, 0)


def library_accepts(text: bytes, data: bytes) -> bool:
    try:
        safetensors.deserialize(struct.pack("<Q", len(text)) + text + data)
    except Exception:
        return False
    return True


def ours_accepts(text: bytes, data: bytes) -> bool:
    try:
        build_manifest(struct.pack("<Q", len(text)) + text + data, chunk_size=CHUNK)
    except RemoteProtocolError:
        return False
    return True


@given(headers())
def test_header_rules_match_library(case: tuple[bytes, bytes]) -> None:
    text, data = case
    assert ours_accepts(text, data) == library_accepts(text, data)
