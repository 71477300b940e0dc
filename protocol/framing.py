"""Length-prefixed frames for stream protocols.

Every message on a pmarket stream is one frame: an unsigned LEB128 varint
length (as libp2p uses) followed by that many bytes. Raw chunk data on a
transfer stream follows its `ChunkHeader` frame unframed, `size` bytes.

`FrameReader` is sans-IO: feed it bytes as they arrive and take frames or raw
byte runs out; it never holds more than one frame's limit plus one read.
"""

from __future__ import annotations

from protocol.errors import LocalProtocolError, Reason, RemoteProtocolError

MAX_VARINT_BYTES = 9  # enough for 2**63 - 1; lengths are far smaller


def encode_uvarint(value: int) -> bytes:
    if value < 0:
        raise LocalProtocolError(f"a varint must be non-negative, got {value}")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def decode_uvarint(buffer: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int] | None:
    """Return (value, offset after it), or None when more bytes are needed.

    Raises RemoteProtocolError(MALFORMED) for an over-long or non-minimal
    varint, so each length has exactly one encoding.
    """
    value = 0
    shift = 0
    for position in range(offset, min(len(buffer), offset + MAX_VARINT_BYTES)):
        byte = buffer[position]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if byte == 0 and position > offset:
                raise RemoteProtocolError(Reason.MALFORMED, "varint length has a redundant zero byte")
            return value, position + 1
        shift += 7
    if len(buffer) - offset >= MAX_VARINT_BYTES:
        raise RemoteProtocolError(Reason.MALFORMED, "varint length is longer than 9 bytes")
    return None


def frame(payload: bytes) -> bytes:
    return encode_uvarint(len(payload)) + payload


class FrameReader:
    """Buffers stream bytes and yields frames of at most `max_frame` bytes."""

    def __init__(self, max_frame: int) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    @property
    def buffered(self) -> int:
        return len(self._buffer)

    def feed(self, data: bytes) -> None:
        self._buffer += data

    def next_frame(self) -> bytes | None:
        """The next complete frame, or None when more bytes are needed."""
        header = decode_uvarint(self._buffer)
        if header is None:
            return None
        size, start = header
        if size > self.max_frame:
            raise RemoteProtocolError(
                Reason.TOO_LARGE, f"frame of {size} bytes is larger than the limit {self.max_frame}"
            )
        if len(self._buffer) - start < size:
            return None
        payload = bytes(self._buffer[start : start + size])
        del self._buffer[: start + size]
        return payload

    def take(self, size: int) -> bytes:
        """Take up to `size` raw bytes from the buffer (for unframed chunk data)."""
        payload = bytes(self._buffer[:size])
        del self._buffer[:size]
        return payload

    def take_into(self, target: memoryview) -> int:
        """Move up to len(target) raw bytes from the buffer into `target`; return the count."""
        count = min(len(target), len(self._buffer))
        with memoryview(self._buffer) as buffered:
            target[:count] = buffered[:count]
        del self._buffer[:count]
        return count
