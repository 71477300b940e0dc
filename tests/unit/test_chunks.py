"""The chunk store: verified chunks in a preallocated partial file per manifest."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from node.chunks import ChunkStore
from protocol.manifest import build_manifest, chunk_bounds, chunk_count
from protocol.messages import Manifest

CHUNK = 64 * 1024


def weights() -> bytes:
    """A safetensors stream of a little over five 64 KiB chunks."""
    rng = np.random.default_rng(3)
    return safetensors.numpy.save({"w": rng.standard_normal(82_000).astype(np.float32)})


def chunk(data: bytes, manifest: Manifest, index: int) -> bytes:
    begin, end = chunk_bounds(manifest, index)
    return data[begin:end]


def test_put_in_any_order_then_assemble(tmp_path: Path) -> None:
    data = weights()
    manifest = build_manifest(data, chunk_size=CHUNK)
    count = chunk_count(manifest.total_bytes, manifest.chunk_size)
    store = ChunkStore(tmp_path / "chunks")
    assert store.missing(manifest) == list(range(count))

    order = [3, 0, count - 1, 1]
    for index in order:
        store.put(manifest, index, chunk(data, manifest, index))
    assert store.missing(manifest) == sorted(set(range(count)) - set(order))
    with pytest.raises(FileNotFoundError):
        store.assemble(manifest, tmp_path / "out.safetensors")

    for index in store.missing(manifest):
        store.put(manifest, index, memoryview(chunk(data, manifest, index)))
    assert store.missing(manifest) == []
    destination = store.assemble(manifest, tmp_path / "models" / "out.safetensors")
    assert destination.read_bytes() == data
    assert not store.partial_path(manifest).exists()
    # Once moved out, the store contains none of the manifest's chunks.
    assert store.missing(manifest) == list(range(count))


def test_restart_trusts_only_chunks_that_verify(tmp_path: Path) -> None:
    data = weights()
    manifest = build_manifest(data, chunk_size=CHUNK)
    store = ChunkStore(tmp_path / "chunks")
    for index in (0, 1, 2):
        store.put(manifest, index, chunk(data, manifest, index))
    # A crash cut off the write of chunk 1.
    with open(store.partial_path(manifest), "r+b") as handle:
        handle.seek(chunk_bounds(manifest, 1)[0] + 100)
        handle.write(b"\x00" * 10)

    restarted = ChunkStore(tmp_path / "chunks")
    count = chunk_count(manifest.total_bytes, manifest.chunk_size)
    assert restarted.missing(manifest) == [1, *range(3, count)]


def test_partial_file_of_wrong_length_holds_nothing(tmp_path: Path) -> None:
    data = weights()
    manifest = build_manifest(data, chunk_size=CHUNK)
    store = ChunkStore(tmp_path / "chunks")
    store.partial_path(manifest).write_bytes(data[:CHUNK])
    count = chunk_count(manifest.total_bytes, manifest.chunk_size)
    assert store.missing(manifest) == list(range(count))


def test_put_checks_chunk_length(tmp_path: Path) -> None:
    data = weights()
    manifest = build_manifest(data, chunk_size=CHUNK)
    store = ChunkStore(tmp_path / "chunks")
    with pytest.raises(ValueError, match="chunk 0 has 10 bytes"):
        store.put(manifest, 0, b"x" * 10)


def test_assemble_rejects_header_not_matching_manifest(tmp_path: Path) -> None:
    data = weights()
    manifest = build_manifest(data, chunk_size=CHUNK)
    # Same chunks, but the manifest names another header of the same length.
    other = dataclasses.replace(manifest, header=manifest.header.replace(b"F32", b"I32"))
    store = ChunkStore(tmp_path / "chunks")
    for index in range(chunk_count(other.total_bytes, other.chunk_size)):
        store.put(other, index, chunk(data, other, index))
    with pytest.raises(ValueError, match="header"):
        store.assemble(other, tmp_path / "out.safetensors")


def test_remove_drops_partial_file(tmp_path: Path) -> None:
    data = weights()
    manifest = build_manifest(data, chunk_size=CHUNK)
    store = ChunkStore(tmp_path / "chunks")
    store.put(manifest, 0, chunk(data, manifest, 0))
    store.remove(manifest)
    assert not store.partial_path(manifest).exists()
    assert 0 in store.missing(manifest)
