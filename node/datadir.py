"""The node's data directory: identity key, config, lock file and state.

Layout::

    identity.key   libp2p protobuf-encoded Ed25519 private key, mode 0600
    config.toml    commented configuration (see node.config)
    node.lock      held with flock by the running daemon; holds its PID
    control.sock   the control API (Unix domain socket, mode 0600)
    node.log       the daemon's log
    pmarket.db     SQLite: models, deals, ledger
    chunks/        verified chunks by BLAKE3 hash
    models/        local model versions (safetensors + manifest)

The directory itself is mode 0700, so no other user can reach the socket or
read the key.
"""

from __future__ import annotations

import fcntl
import os
import shlex
from dataclasses import dataclass
from pathlib import Path

from libp2p.crypto.ed25519 import Ed25519PrivateKey as LibEd25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.serialization import deserialize_private_key

from node.config import DEFAULT_FILE
from protocol.identity import Signer


class DataDirError(Exception):
    """A data directory that cannot be used; the message says what to do."""


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "pmarket"


def command_default_data_dir() -> Path:
    """Return the data directory of commands run without --data-dir: $PMARKET_DATA_DIR, else default_data_dir()."""
    configured = os.environ.get("PMARKET_DATA_DIR")
    return Path(configured) if configured else default_data_dir()


def data_dir_option(root: Path) -> str:
    """Return " --data-dir ROOT" for a command that should act on ``root``, or "" when it is the default."""
    if root.resolve() == command_default_data_dir().expanduser().resolve():
        return ""
    return f" --data-dir {shlex.quote(str(root))}"


@dataclass(frozen=True)
class DataDir:
    root: Path

    @property
    def identity(self) -> Path:
        return self.root / "identity.key"

    @property
    def config(self) -> Path:
        return self.root / "config.toml"

    @property
    def lock(self) -> Path:
        return self.root / "node.lock"

    @property
    def control_socket(self) -> Path:
        return self.root / "control.sock"

    @property
    def log(self) -> Path:
        return self.root / "node.log"

    @property
    def database(self) -> Path:
        return self.root / "pmarket.db"

    @property
    def chunks(self) -> Path:
        return self.root / "chunks"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def exists(self) -> bool:
        return self.identity.exists()

    def require(self) -> None:
        if not self.exists():
            raise DataDirError(
                f"no pmarket identity in {self.root}; run `pmarket init --data-dir {self.root}` first"
            )


@dataclass(frozen=True)
class Identity:
    """The node's key as both a libp2p key pair and a protocol signer."""

    key_pair: KeyPair
    signer: Signer

    @property
    def peer_id(self) -> bytes:
        return self.signer.peer_id


def _identity_from_libp2p(private_key: LibEd25519PrivateKey) -> Identity:
    seed = private_key.to_bytes()[:32]
    return Identity(KeyPair(private_key, private_key.get_public_key()), Signer.from_seed(seed))


def init(data_dir: DataDir) -> Identity:
    """Create the directory, a new identity key (0600) and a commented config.

    Refuses to overwrite an existing identity.
    """
    if data_dir.identity.exists():
        raise DataDirError(
            f"{data_dir.identity} already exists; refusing to replace this node's identity. "
            "Use another --data-dir for a new node."
        )
    data_dir.root.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(data_dir.root, 0o700)
    private_key = LibEd25519PrivateKey.new()
    encoded = private_key.serialize()
    # O_EXCL: a concurrent init cannot overwrite a key written a moment ago.
    try:
        fd = os.open(data_dir.identity, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise DataDirError(f"{data_dir.identity} already exists; refusing to replace it") from None
    with os.fdopen(fd, "wb") as handle:
        handle.write(encoded)
        handle.flush()
        os.fsync(handle.fileno())
    if not data_dir.config.exists():
        data_dir.config.write_text(DEFAULT_FILE, encoding="utf-8")
    return _identity_from_libp2p(private_key)


def load_identity(data_dir: DataDir) -> Identity:
    data_dir.require()
    mode = data_dir.identity.stat().st_mode & 0o777
    if mode & 0o077:
        raise DataDirError(
            f"{data_dir.identity} is readable by other users (mode {mode:o}); run `chmod 600 {data_dir.identity}`"
        )
    try:
        private_key = deserialize_private_key(data_dir.identity.read_bytes())
    except Exception as exc:  # libp2p raises several types for a corrupt key
        raise DataDirError(f"{data_dir.identity} is not a libp2p private key ({type(exc).__name__})") from None
    if not isinstance(private_key, LibEd25519PrivateKey):
        raise DataDirError(f"{data_dir.identity} is not an Ed25519 key; pmarket needs Ed25519 identities")
    return _identity_from_libp2p(private_key)


class DaemonLock:
    """An exclusive flock on node.lock for as long as the daemon runs."""

    def __init__(self, data_dir: DataDir) -> None:
        self.path = data_dir.lock
        self._fd: int | None = None

    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            pid = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            root = self.path.parent
            raise DataDirError(
                f"another pmarket daemon (PID {pid}) is running on {root}; "
                f"stop it with `pmarket node stop{data_dir_option(root)}` or use another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def running_pid(data_dir: DataDir) -> int | None:
    """PID of the daemon holding the lock, or None if no daemon runs."""
    try:
        fd = os.open(data_dir.lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            text = os.read(fd, 32).decode(errors="replace").strip()
            return int(text) if text.isdigit() else -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)
