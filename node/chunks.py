"""Store of verified chunks: one partial file per manifest.

Chunks of the weights a buyer fetches go straight to their offsets in
``chunks/<manifest root hex>.part``, a file as long as the whole safetensors
stream, so a finished transfer becomes the delivered file by one rename
instead of a copy. Writes skip the page cache where they can (see
`_write_at`). Two rules keep that as safe as a store of one file per
chunk:

* Only verified bytes are written: callers check each chunk against the
  manifest (`protocol.manifest.verify_chunk`) before `put`, and the store
  does not hash again.
* A chunk counts as stored only while the store has seen its bytes verify.
  After a restart, `missing` hashes each chunk of an existing partial file
  again and keeps the ones that match, so a write cut off by a crash or a
  power loss costs a fetch of that chunk, never wrong bytes.

`assemble` syncs the partial file and renames it to its destination, so the
whole file appears atomically and complete. All methods block on the disk;
the node calls them from worker threads.
"""

from __future__ import annotations

import errno
import functools
import os
import threading
from pathlib import Path

from protocol.manifest import chunk_bounds, chunk_count, chunk_hash, hash_chunk, header_prefix
from protocol.manifest import manifest_root as _manifest_root
from protocol.messages import Manifest

# Alignment of offsets, lengths and buffers for direct I/O. Common disks have
# logical blocks of 512 or 4,096 bytes. On a disk with larger blocks, direct
# writes fail with EINVAL, so the store writes through the page cache.
DIRECT_ALIGNMENT = 4096


@functools.lru_cache(maxsize=8)
def manifest_root(manifest: Manifest) -> bytes:
    """Return the manifest's root, computed once per manifest (`put` needs it per chunk)."""
    return _manifest_root(manifest)


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        # Left over from the store of one file per chunk that nodes used before.
        # Its chunk files (<2 hex digits>/<hash>) are ignored: a deal resumed
        # after the upgrade fetches its chunks again.
        tmp = root / ".tmp"
        if tmp.is_dir():
            for leftover in tmp.iterdir():
                leftover.unlink(missing_ok=True)
        self._lock = threading.Lock()
        # Per manifest root: a lock that orders writes, checks and the final
        # rename, and the indices of chunks whose bytes in the partial file verified.
        self._file_locks: dict[bytes, threading.Lock] = {}
        self._stored: dict[bytes, set[int]] = {}

    def partial_path(self, manifest: Manifest) -> Path:
        return self.root / f"{manifest_root(manifest).hex()}.part"

    def _file_lock(self, root: bytes) -> threading.Lock:
        with self._lock:
            return self._file_locks.setdefault(root, threading.Lock())

    def missing(self, manifest: Manifest) -> list[int]:
        """Indices of the manifest's chunks that the store does not hold."""
        root = manifest_root(manifest)
        with self._file_lock(root):
            stored = self._stored_chunks(manifest, root)
        return [i for i in range(chunk_count(manifest.total_bytes, manifest.chunk_size)) if i not in stored]

    def _stored_chunks(self, manifest: Manifest, root: bytes) -> set[int]:
        """Return the indices of verified chunks in the partial file; call it holding the file's lock."""
        path = self.root / f"{root.hex()}.part"
        stored = self._stored.get(root)
        if stored is None or not path.exists():
            # First look in this process, or the file went away: trust only what hashes right.
            stored = self._check_file(manifest, path)
            self._stored[root] = stored
        return stored

    def _check_file(self, manifest: Manifest, path: Path) -> set[int]:
        found: set[int] = set()
        try:
            handle = open(path, "rb")  # noqa: SIM115  # closed by the with below
        except FileNotFoundError:
            return found
        with handle:
            if os.fstat(handle.fileno()).st_size != manifest.total_bytes:
                return found
            for index in range(chunk_count(manifest.total_bytes, manifest.chunk_size)):
                begin, end = chunk_bounds(manifest, index)
                handle.seek(begin)
                if hash_chunk(handle.read(end - begin)) == chunk_hash(manifest, index):
                    found.add(index)
        return found

    def put(self, manifest: Manifest, index: int, data: bytes | bytearray | memoryview) -> None:
        """Write verified chunk `index` at its offset in the manifest's partial file."""
        begin, end = chunk_bounds(manifest, index)
        if len(data) != end - begin:
            raise ValueError(f"chunk {index} has {len(data)} bytes, but the manifest expects {end - begin}")
        root = manifest_root(manifest)
        path = self.root / f"{root.hex()}.part"
        with self._file_lock(root):
            stored = self._stored_chunks(manifest, root)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size != manifest.total_bytes:
                    os.ftruncate(fd, manifest.total_bytes)
            finally:
                os.close(fd)
            _write_at(path, memoryview(data).cast("B"), begin)
            stored.add(index)

    def assemble(self, manifest: Manifest, destination: Path) -> Path:
        """Move the complete partial file to `destination`, synced first, atomically.

        Raises FileNotFoundError if the partial file is gone or lacks a
        chunk, and ValueError if its start differs from the manifest's header.
        """
        root = manifest_root(manifest)
        path = self.root / f"{root.hex()}.part"
        destination.parent.mkdir(parents=True, exist_ok=True)
        with self._file_lock(root):
            stored = self._stored_chunks(manifest, root)
            if len(stored) != chunk_count(manifest.total_bytes, manifest.chunk_size):
                raise FileNotFoundError(f"{path} lacks chunks of the manifest")
            with open(path, "rb") as handle:
                if handle.read(len(header_prefix(manifest))) != header_prefix(manifest):
                    raise ValueError("assembled file does not start with the manifest's header")
                os.fdatasync(handle.fileno())
            os.replace(path, destination)
            del self._stored[root]
        return destination

    def remove(self, manifest: Manifest) -> None:
        """Drop the manifest's partial file, if any."""
        root = manifest_root(manifest)
        with self._file_lock(root):
            (self.root / f"{root.hex()}.part").unlink(missing_ok=True)
            self._stored.pop(root, None)


def _write_at(path: Path, data: memoryview, offset: int) -> None:
    """Write `data` at `offset`, straight to the disk where the alignment allows.

    Direct I/O (O_DIRECT) skips the page cache, so a transfer neither fills
    memory with dirty pages nor waits for them in the final fdatasync. It
    needs the offset, the length and the buffer's address aligned to the
    device's block size. The buyer's chunk buffers are page-aligned. A tail
    that is not whole blocks, or a buffer that is not aligned, goes through
    the page cache. File systems without direct I/O (tmpfs, or a
    system without O_DIRECT) get ordinary writes.
    """
    direct = len(data) - len(data) % DIRECT_ALIGNMENT if offset % DIRECT_ALIGNMENT == 0 else 0
    done = 0
    if direct and hasattr(os, "O_DIRECT"):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
        except OSError as exc:
            if exc.errno != errno.EINVAL:
                raise
        else:
            try:
                done = _pwrite_all(fd, data[:direct], offset)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                done = 0  # an unaligned buffer: write all of it again through the page cache
            finally:
                os.close(fd)
    if done < len(data):
        fd = os.open(path, os.O_WRONLY)
        try:
            _pwrite_all(fd, data[done:], offset + done)
        finally:
            os.close(fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> int:
    written = 0
    while written < len(data):
        written += os.pwrite(fd, data[written:], offset + written)
    return written
