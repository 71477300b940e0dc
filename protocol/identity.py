"""Peer IDs and Ed25519 signatures with domain separation.

A node's identity is its libp2p Ed25519 key. Its peer ID is the libp2p
identity multihash of the protobuf-encoded public key, so the key can be read
back from the peer ID alone and any signed message names its signer:

    peer_id = 0x00 0x24 | 0x08 0x01 0x12 0x20 | public_key (32 bytes)

(identity multihash code 0x00 of length 36 over the protobuf ``PublicKey``
``{Type: Ed25519 (1), Data: 32 bytes}``). Other key types are rejected: their
peer IDs are hashes that do not carry the key.

A signature covers ``tag | 0x00 | body``, where the tag names the message
type and version (``pmarket/offer/v1``) and the body is the message's
canonical encoding without its signatures. Tags never contain a zero byte, so
a signature made for one message type never verifies as another.
"""

from __future__ import annotations

import functools

import base58
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from protocol.errors import LocalProtocolError, Reason, RemoteProtocolError

PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
PEER_ID_SIZE = len(PEER_ID_PREFIX) + 32
SIGNATURE_SIZE = 64
SEED_SIZE = 32


def peer_id_from_public_key(public_key: bytes) -> bytes:
    """Return the binary peer ID of a raw 32-byte Ed25519 public key."""
    if len(public_key) != 32:
        raise LocalProtocolError(f"an Ed25519 public key has 32 bytes, got {len(public_key)}")
    return PEER_ID_PREFIX + public_key


def public_key_from_peer_id(peer_id: bytes) -> bytes:
    """Return the raw Ed25519 public key inlined in a binary peer ID."""
    if len(peer_id) != PEER_ID_SIZE or not peer_id.startswith(PEER_ID_PREFIX):
        raise RemoteProtocolError(
            Reason.BAD_PEER_ID,
            f"peer ID {peer_id[:8].hex()}... ({len(peer_id)} bytes) is not an Ed25519 identity peer ID",
        )
    return peer_id[len(PEER_ID_PREFIX) :]


def peer_id_to_text(peer_id: bytes) -> str:
    """Base58btc text form of a peer ID, as libp2p prints it (12D3KooW...)."""
    return base58.b58encode(peer_id).decode("ascii")


def peer_id_from_text(text: str) -> bytes:
    """Parse the base58btc text form of an Ed25519 peer ID."""
    try:
        peer_id = base58.b58decode(text.encode("ascii"))
    except ValueError:
        raise RemoteProtocolError(Reason.BAD_PEER_ID, f"{text!r} is not base58") from None
    public_key_from_peer_id(peer_id)
    return peer_id


def signed_bytes(tag: str, body: bytes) -> bytes:
    """The exact bytes an Ed25519 signature covers: tag, a zero byte, body."""
    return tag.encode("ascii") + b"\x00" + body


@functools.lru_cache(maxsize=4096)
def _public_key(peer_id: bytes) -> Ed25519PublicKey:
    try:
        return Ed25519PublicKey.from_public_bytes(public_key_from_peer_id(peer_id))
    except ValueError:
        raise RemoteProtocolError(Reason.BAD_PEER_ID, "peer ID holds an invalid Ed25519 key") from None


def verify(peer_id: bytes, tag: str, body: bytes, signature: bytes) -> None:
    """Check that `peer_id`'s key signed `body` under `tag`.

    Raises RemoteProtocolError(BAD_PEER_ID or BAD_SIGNATURE) otherwise.
    """
    key = _public_key(peer_id)
    if len(signature) != SIGNATURE_SIZE:
        raise RemoteProtocolError(
            Reason.BAD_SIGNATURE, f"signature has {len(signature)} bytes, expected {SIGNATURE_SIZE}"
        )
    try:
        key.verify(signature, signed_bytes(tag, body))
    except InvalidSignature:
        raise RemoteProtocolError(
            Reason.BAD_SIGNATURE, f"{tag} signature does not verify for {peer_id_to_text(peer_id)}"
        ) from None


class Signer:
    """An Ed25519 private key that signs with domain tags.

    The key never appears in `repr`, logs or error messages.
    """

    __slots__ = ("_key", "peer_id", "public_key")

    def __init__(self, key: Ed25519PrivateKey) -> None:
        self._key = key
        self.public_key = key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
        self.peer_id = peer_id_from_public_key(self.public_key)

    @classmethod
    def from_seed(cls, seed: bytes) -> Signer:
        """Build a signer from the 32-byte Ed25519 seed stored in a key file."""
        if len(seed) != SEED_SIZE:
            raise LocalProtocolError(f"an Ed25519 seed has {SEED_SIZE} bytes, got {len(seed)}")
        return cls(Ed25519PrivateKey.from_private_bytes(seed))

    @classmethod
    def generate(cls) -> Signer:
        return cls(Ed25519PrivateKey.generate())

    def sign(self, tag: str, body: bytes) -> bytes:
        return self._key.sign(signed_bytes(tag, body))

    def __repr__(self) -> str:
        return f"Signer({peer_id_to_text(self.peer_id)})"
