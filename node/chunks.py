"""Content-addressed store of verified chunks.

A chunk lives at ``chunks/<first two hex digits>/<BLAKE3 hex>`` and is only
ever put there by an atomic rename of a fully written and synced temporary
file, so a file under a chunk's hash always holds exactly those bytes: a
crash or a concurrent reader never sees a partial chunk. Callers verify the
hash before `put` (see `protocol.manifest.verify_chunk`); the store does not
hash again.

All methods block on the disk; the node calls them from worker threads.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Sequence
from pathlib import Path

from protocol.manifest import chunk_count, chunk_hash, header_prefix
from protocol.messages import Manifest


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / ".tmp"
        self.tmp.mkdir(parents=True, exist_ok=True)
        # Left over from a crash: never visible under a hash, safe to remove.
        for leftover in self.tmp.iterdir():
            leftover.unlink(missing_ok=True)

    def path(self, digest: bytes) -> Path:
        text = digest.hex()
        return self.root / text[:2] / text

    def has(self, digest: bytes) -> bool:
        return self.path(digest).is_file()

    def put(self, digest: bytes, data: bytes | memoryview) -> None:
        """Store verified `data` under its hash, atomically."""
        final = self.path(digest)
        if final.is_file():
            return
        final.parent.mkdir(exist_ok=True)
        temporary = self.tmp / f"{digest.hex()}.{uuid.uuid4().hex}"
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, final)

    def get(self, digest: bytes) -> bytes:
        return self.path(digest).read_bytes()

    def missing(self, manifest: Manifest) -> list[int]:
        """Indices of the manifest's chunks that are not in the store."""
        return [i for i in range(chunk_count(manifest.total_bytes, manifest.chunk_size)) if not self.has(chunk_hash(manifest, i))]

    def assemble(self, manifest: Manifest, destination: Path) -> Path:
        """Concatenate the manifest's chunks into `destination`, atomically.

        Raises FileNotFoundError if a chunk went missing.
        """
        destination.parent.mkdir(parents=True, exist_ok=True)
        temporary = destination.with_name(f".{destination.name}.{uuid.uuid4().hex}")
        try:
            with open(temporary, "wb") as output:
                for index in range(chunk_count(manifest.total_bytes, manifest.chunk_size)):
                    with open(self.path(chunk_hash(manifest, index)), "rb") as chunk:
                        output.write(chunk.read())
                output.flush()
                os.fsync(output.fileno())
            if os.path.getsize(temporary) != manifest.total_bytes:
                raise ValueError(f"assembled {os.path.getsize(temporary)} bytes, the manifest says {manifest.total_bytes}")
            with open(temporary, "rb") as check:
                if check.read(len(header_prefix(manifest))) != header_prefix(manifest):
                    raise ValueError("assembled file does not start with the manifest's header")
            os.replace(temporary, destination)
        finally:
            temporary.unlink(missing_ok=True)
        return destination

    def remove(self, digests: Sequence[bytes]) -> None:
        for digest in digests:
            self.path(digest).unlink(missing_ok=True)
