"""Valid example messages for protocol tests, built from fixed keys."""

from __future__ import annotations

from protocol.codec import Message
from protocol.testvectors import build


def examples() -> dict[str, Message]:
    """Every example message of the test vectors, by name."""
    return {name: value for name, (value, _) in build().items() if isinstance(value, Message)}
