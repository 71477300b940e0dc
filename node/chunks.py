"""Store of verified chunks: one preallocated partial file per manifest.

Chunks of the weights a buyer fetches go straight to their offsets in
``chunks/<manifest root hex>.part``, a file as long as the whole safetensors
stream, so a finished transfer becomes the delivered file by one rename
instead of a copy. Two rules keep that as safe as a store of one file per
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


@functools.lru_cache(maxsize=8)
def manifest_root(manifest: Manifest) -> bytes:
    """The manifest's root, computed once per manifest (`put` needs it per chunk)."""
    return _manifest_root(manifest)


class ChunkStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)
        # Left over from the store of one file per chunk that nodes used before.
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
        """The verified chunks of the partial file; the caller holds its lock."""
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
            raise ValueError(f"chunk {index} has {len(data)} bytes, the manifest says {end - begin}")
        root = manifest_root(manifest)
        path = self.root / f"{root.hex()}.part"
        with self._file_lock(root):
            stored = self._stored_chunks(manifest, root)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size != manifest.total_bytes:
                    _preallocate(fd, manifest.total_bytes)
                view = memoryview(data)
                written = 0
                while written < len(view):
                    written += os.pwrite(fd, view[written:], begin + written)
            finally:
                os.close(fd)
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


def _preallocate(fd: int, size: int) -> None:
    """Give the file its full length and reserve its disk space where the file system can."""
    os.ftruncate(fd, size)
    if hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as exc:
            # Not every file system reserves space; a sparse file works there too.
            if exc.errno not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise
