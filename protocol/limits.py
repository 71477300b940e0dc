"""Every size, count and time limit of the protocol, in one place.

docs/protocol.md lists the same values; tests check that the two agree.
Sizes are in bytes, times in milliseconds.
"""

from __future__ import annotations

# Identifiers and hashes.
HASH_SIZE = 32  # BLAKE3 output: offer IDs, deal IDs, manifest roots, chunk hashes.
NONCE_SIZE = 16
MAX_PEER_ID_SIZE = 64  # decodes accept up to this; only 38-byte Ed25519 IDs verify.

# Offers (gossiped, so they must stay far below the 1 MiB gossip message limit).
MAX_OFFER_SIZE = 64 * 1024
MAX_OFFER_KEY = 64  # UTF-8 bytes of the seller's name for what it offers.
MAX_TASK_NAME = 64
MAX_OFFER_TENSORS = 1024  # an empty list offers every tensor of the model.
MAX_TENSOR_NAME = 256
MAX_METRICS = 16
MAX_METRIC_NAME = 32
MAX_OFFER_LIFETIME_MS = 7 * 24 * 3600 * 1000
MAX_CLOCK_SKEW_MS = 60 * 1000  # how far in the future `created_ms` may lie.

# Negotiation.
MAX_NEGOTIATION_ROUNDS = 8  # bids and counters together, per deal.
MAX_NEGOTIATION_MESSAGE_SIZE = 4 * 1024
MAX_DEAL_LIFETIME_MS = 24 * 3600 * 1000
MAX_DETAIL = 256  # UTF-8 bytes of a human-readable detail in a reject or error.

# Manifests and chunks.
MIN_CHUNK_SIZE = 64 * 1024
DEFAULT_CHUNK_SIZE = 4 * 1024 * 1024
MAX_CHUNK_SIZE = 64 * 1024 * 1024
MAX_CHUNKS = 262_144  # 1 TiB at the default chunk size.
MAX_HEADER_SIZE = 8 * 1024 * 1024  # safetensors JSON header; the library allows 100 MB.
MAX_TENSORS = 65_536
MAX_TENSOR_RANK = 8
MAX_MANIFEST_SIZE = MAX_HEADER_SIZE + MAX_CHUNKS * HASH_SIZE + 1024
MAX_CHUNK_RANGES = 1024  # ranges in one chunk request.
MAX_CONTROL_MESSAGE_SIZE = 64 * 1024  # chunk requests, chunk headers, errors.

# Receipts.
MAX_RECEIPT_SIZE = 4 * 1024
PPM = 1_000_000  # ratios (gains, accuracy changes) are integer parts per million.
