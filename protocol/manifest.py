"""Manifests: the safetensors header of offered weights plus chunk hashes.

Weights travel as one safetensors byte stream::

    8-byte little-endian header length N | N bytes of JSON header | data

The header is parsed by the rules of the safetensors library (0.8): a JSON
object mapping each tensor name to ``{"dtype", "shape", "data_offsets"}``
plus an optional ``"__metadata__"`` map of strings; data offsets are relative
to the end of the header, sorted by offset the tensors cover the data with no
gap or overlap, each tensor's byte size is its element count times its dtype
size, and the data ends where the stream ends. This parser is stricter than
the library in four ways, none of which the library's own writer produces:
duplicate JSON keys, unknown keys in a tensor entry, a header that does not
start with ``{`` and empty tensor names are rejected. Nothing is ever
unpickled: a pickle checkpoint fails at the first byte check.

The stream is cut into fixed-size chunks (4 MiB by default) and each is
hashed with BLAKE3. The manifest root, which an offer signs, is the BLAKE3
hash of the tag ``pmarket/manifest/v1`` and the manifest's canonical
encoding, so one signature covers the header and every chunk.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import blake3

from protocol import limits
from protocol.codec import decode_as, encode, pack
from protocol.errors import LocalProtocolError, Reason, RemoteProtocolError
from protocol.messages import Manifest, tagged_hash

MANIFEST_TAG = "pmarket/manifest/v1"
FAMILY_TAG = "pmarket/family/v1"
HEADER_PREFIX_SIZE = 8

# Bits per element of every dtype the safetensors library (0.8) accepts.
DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "C64": 64,
    "F64": 64,
    "I64": 64,
    "U64": 64,
}
FLOAT_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


@dataclass(frozen=True, slots=True)
class TensorInfo:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset of the first data byte, relative to the end of the header
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True, slots=True)
class SafetensorsHeader:
    tensors: tuple[TensorInfo, ...]  # sorted by name
    metadata: Mapping[str, str]
    data_size: int

    def by_name(self) -> dict[str, TensorInfo]:
        return {t.name: t for t in self.tensors}


def _bad_header(detail: str) -> RemoteProtocolError:
    return RemoteProtocolError(Reason.INVALID_WEIGHTS, f"invalid safetensors header: {detail}")


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _bad_header(f"key {key[:64]!r} appears twice")
        result[key] = value
    return result


def _is_uint(value: Any) -> bool:
    return type(value) is int and 0 <= value < 2**64


def parse_header(header: bytes) -> SafetensorsHeader:
    """Parse and validate a safetensors JSON header (without its length prefix)."""
    if len(header) > limits.MAX_HEADER_SIZE:
        raise _bad_header(f"{len(header)} bytes, more than the limit {limits.MAX_HEADER_SIZE}")
    if not header.startswith(b"{"):
        raise _bad_header("it must start with '{' (is this a pickle or .pt checkpoint?)")
    try:
        text = header.decode("utf-8")
        document = json.loads(text, object_pairs_hook=_reject_duplicates)
    except RemoteProtocolError:
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _bad_header(f"not valid UTF-8 JSON ({type(exc).__name__})") from None
    if not isinstance(document, dict):
        raise _bad_header("the top level must be an object")

    metadata = document.pop("__metadata__", None)
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _bad_header("__metadata__ must map strings to strings")
    if len(document) > limits.MAX_TENSORS:
        raise _bad_header(f"{len(document)} tensors, more than the limit {limits.MAX_TENSORS}")

    tensors = [_parse_tensor(name, entry) for name, entry in document.items()]

    # Sorted by offsets, the tensors must tile the data exactly.
    position = 0
    for info in sorted(tensors, key=lambda t: (t.begin, t.end)):
        if info.begin != position or info.end < info.begin:
            raise _bad_header(f"tensor {info.name!r} has offsets [{info.begin}, {info.end}], expected to start at {position}")
        position = info.end
    return SafetensorsHeader(tuple(sorted(tensors, key=lambda t: t.name)), metadata, position)


def _parse_tensor(name: str, entry: Any) -> TensorInfo:
    if not name:
        raise _bad_header("a tensor has an empty name")
    if len(name.encode("utf-8", "surrogatepass")) > limits.MAX_TENSOR_NAME:
        raise _bad_header(f"tensor name {name[:64]!r}... is longer than {limits.MAX_TENSOR_NAME} bytes")
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        raise _bad_header(f"tensor {name!r} must have exactly dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise _bad_header(f"tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or len(shape) > limits.MAX_TENSOR_RANK or not all(map(_is_uint, shape)):
        raise _bad_header(f"tensor {name!r} shape must be a list of at most {limits.MAX_TENSOR_RANK} non-negative integers")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(map(_is_uint, offsets)):
        raise _bad_header(f"tensor {name!r} data_offsets must be two non-negative integers")
    # Like the library, fail when the element count or the bit count would
    # overflow a 64-bit integer at any step.
    elements = 1
    for dimension in shape:
        elements *= dimension
        if elements >= 2**64:
            raise _bad_header(f"tensor {name!r} shape {shape} overflows")
    bits = elements * DTYPE_BITS[dtype]
    if bits >= 2**64:
        raise _bad_header(f"tensor {name!r} shape {shape} overflows")
    if bits % 8:
        raise _bad_header(f"tensor {name!r} of {dtype} does not end on a byte boundary")
    begin, end = offsets
    if end - begin != bits // 8:
        raise _bad_header(f"tensor {name!r} spans {end - begin} bytes, its shape and dtype need {bits // 8}")
    return TensorInfo(name, dtype, tuple(shape), begin, end)


def split_stream(buffer: bytes | memoryview) -> tuple[int, bytes]:
    """Read the length prefix of a safetensors stream; return (N, header bytes)."""
    if len(buffer) < HEADER_PREFIX_SIZE:
        raise _bad_header(f"the stream has {len(buffer)} bytes, fewer than the 8-byte length prefix")
    (size,) = struct.unpack_from("<Q", buffer, 0)
    if size > limits.MAX_HEADER_SIZE:
        raise _bad_header(f"header length {size} is more than the limit {limits.MAX_HEADER_SIZE}")
    if HEADER_PREFIX_SIZE + size > len(buffer):
        raise _bad_header(f"header length {size} runs past the end of a {len(buffer)}-byte stream")
    return size, bytes(buffer[HEADER_PREFIX_SIZE : HEADER_PREFIX_SIZE + size])


def family_hash(tensors: Sequence[TensorInfo] | Sequence[tuple[str, str, Sequence[int]]]) -> bytes:
    """The model family: a hash of tensor names, dtypes and shapes, sorted by name."""
    entries = sorted(
        ([t.name, t.dtype, list(t.shape)] if isinstance(t, TensorInfo) else [t[0], t[1], list(t[2])])
        for t in tensors
    )
    return tagged_hash(FAMILY_TAG, pack(entries))


def chunk_count(total_bytes: int, chunk_size: int) -> int:
    return -(-total_bytes // chunk_size)


def chunk_bounds(manifest: Manifest, index: int) -> tuple[int, int]:
    """Byte range [begin, end) of chunk `index` in the safetensors stream."""
    count = chunk_count(manifest.total_bytes, manifest.chunk_size)
    if not 0 <= index < count:
        raise RemoteProtocolError(Reason.UNKNOWN_CHUNK, f"chunk {index} is outside 0..{count - 1}")
    begin = index * manifest.chunk_size
    return begin, min(begin + manifest.chunk_size, manifest.total_bytes)


def hash_chunk(data: bytes | memoryview) -> bytes:
    # blake3 releases the GIL for large inputs, so callers may run this in threads.
    return blake3.blake3(data).digest()


def build_manifest(buffer: bytes | memoryview, chunk_size: int = limits.DEFAULT_CHUNK_SIZE) -> Manifest:
    """Build the manifest of a complete safetensors byte stream.

    Raises RemoteProtocolError(INVALID_WEIGHTS) when the stream is not valid
    safetensors, so a caller importing a user's file can show the detail.
    """
    if not limits.MIN_CHUNK_SIZE <= chunk_size <= limits.MAX_CHUNK_SIZE:
        raise LocalProtocolError(
            f"chunk size {chunk_size} is outside [{limits.MIN_CHUNK_SIZE}, {limits.MAX_CHUNK_SIZE}]"
        )
    size, header = split_stream(buffer)
    parsed = parse_header(header)
    total = len(buffer)
    if HEADER_PREFIX_SIZE + size + parsed.data_size != total:
        raise _bad_header(
            f"the tensors cover {parsed.data_size} data bytes but the stream holds "
            f"{total - HEADER_PREFIX_SIZE - size}"
        )
    count = chunk_count(total, chunk_size)
    if count > limits.MAX_CHUNKS:
        raise LocalProtocolError(f"{count} chunks of {chunk_size} bytes is more than the limit {limits.MAX_CHUNKS}")
    view = memoryview(buffer)
    hashes = b"".join(hash_chunk(view[i * chunk_size : (i + 1) * chunk_size]) for i in range(count))
    return Manifest(total, chunk_size, header, hashes)


def manifest_root(manifest: Manifest) -> bytes:
    return tagged_hash(MANIFEST_TAG, encode(manifest))


def check_manifest(manifest: Manifest) -> SafetensorsHeader:
    """Check a manifest's internal consistency and return its parsed header.

    The header must be valid, the tensors must fill the stream exactly and
    there must be one hash per chunk.
    """
    parsed = parse_header(manifest.header)
    expected_total = HEADER_PREFIX_SIZE + len(manifest.header) + parsed.data_size
    if manifest.total_bytes != expected_total:
        raise RemoteProtocolError(
            Reason.MANIFEST_MISMATCH,
            f"manifest says {manifest.total_bytes} bytes, its header describes {expected_total}",
        )
    count = chunk_count(manifest.total_bytes, manifest.chunk_size)
    if count > limits.MAX_CHUNKS or len(manifest.chunk_hashes) != count * limits.HASH_SIZE:
        raise RemoteProtocolError(
            Reason.MANIFEST_MISMATCH,
            f"manifest has {len(manifest.chunk_hashes) // limits.HASH_SIZE} chunk hashes, "
            f"{count} chunks of {manifest.chunk_size} bytes need {count}",
        )
    return parsed


def decode_manifest(data: bytes, expected_root: bytes) -> tuple[Manifest, SafetensorsHeader]:
    """Decode a manifest received from a peer and check it against a signed root."""
    manifest = decode_as(Manifest, data)
    root = tagged_hash(MANIFEST_TAG, data)
    if root != expected_root:
        raise RemoteProtocolError(
            Reason.MANIFEST_MISMATCH,
            f"manifest root {root.hex()[:16]}... does not match the signed root {expected_root.hex()[:16]}...",
        )
    return manifest, check_manifest(manifest)


def chunk_hash(manifest: Manifest, index: int) -> bytes:
    chunk_bounds(manifest, index)
    return manifest.chunk_hashes[index * limits.HASH_SIZE : (index + 1) * limits.HASH_SIZE]


def verify_chunk(manifest: Manifest, index: int, data: bytes | memoryview) -> bytes:
    """Check chunk `index` against the manifest; return its hash."""
    begin, end = chunk_bounds(manifest, index)
    if len(data) != end - begin:
        raise RemoteProtocolError(
            Reason.TRUNCATED, f"chunk {index} has {len(data)} bytes, expected {end - begin}"
        )
    digest = hash_chunk(data)
    if digest != chunk_hash(manifest, index):
        raise RemoteProtocolError(Reason.CHUNK_HASH_MISMATCH, f"chunk {index} does not match its hash")
    return digest


def header_prefix(manifest: Manifest) -> bytes:
    """The first bytes of the stream: length prefix and header."""
    return struct.pack("<Q", len(manifest.header)) + manifest.header
