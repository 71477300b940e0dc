"""Framed messages over libp2p streams, with limits and timeouts.

Everything a peer sends is read through `StreamIO`: frames are bounded by a
size limit, every read by a timeout, and any transport failure becomes a
`StreamFailed` (or a `RemoteProtocolError` when the bytes are wrong), so a
handler has exactly two kinds of error to deal with.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

import trio
from libp2p.exceptions import BaseLibp2pError

from node.libp2p_tuning import read_into
from protocol.codec import Message, decode, encode
from protocol.errors import Reason, RemoteProtocolError
from protocol.framing import FrameReader, frame
from protocol.messages import ErrorMessage

logger = logging.getLogger(__name__)

READ_SIZE = 1 << 20
TRANSPORT_ERRORS: tuple[type[BaseException], ...] = (
    BaseLibp2pError,
    trio.BrokenResourceError,
    trio.ClosedResourceError,
    ConnectionError,
)

M = TypeVar("M", bound=Message)


class StreamFailed(Exception):
    """The stream broke, was reset, closed early or timed out."""


class PeerError(Exception):
    """The peer answered with an ErrorMessage."""

    def __init__(self, message: ErrorMessage) -> None:
        super().__init__(f"peer reported {message.reason.name.lower()}: {message.detail}")
        self.reason = message.reason
        self.detail = message.detail


class StreamIO:
    """Reads and writes frames on one libp2p stream."""

    def __init__(self, stream: Any, *, on_bytes_in: Callable[[int], None] | None = None,
                 on_bytes_out: Callable[[int], None] | None = None) -> None:
        self.stream = stream
        self._reader = FrameReader(max_frame=0)
        self._eof = False
        self._on_bytes_in = on_bytes_in
        self._on_bytes_out = on_bytes_out

    @property
    def peer_id(self) -> bytes:
        return bytes(self.stream.muxed_conn.peer_id.to_bytes())

    async def _fill(self, timeout: float, read_size: int = READ_SIZE) -> bool:
        """Read at most `read_size` more bytes into the buffer; False at end of stream."""
        if self._eof:
            return False
        with trio.move_on_after(timeout) as scope:
            try:
                data = await self.stream.read(read_size)
            except EOFError:
                self._eof = True
                return False
            except TRANSPORT_ERRORS as exc:
                raise StreamFailed(f"stream failed: {type(exc).__name__}: {exc}") from None
        if scope.cancelled_caught:
            raise StreamFailed(f"no data from the peer for {timeout:g} s")
        if not data:
            self._eof = True
            return False
        if self._on_bytes_in is not None:
            self._on_bytes_in(len(data))
        self._reader.feed(data)
        return True

    async def read_frame(self, max_size: int, timeout: float, *, read_size: int = READ_SIZE) -> bytes | None:
        """The next frame, or None when the stream ends cleanly between frames.

        Each read from the stream requests at most `read_size` bytes. A
        caller that expects raw bytes after a small frame passes a small
        size, so those bytes stay in the stream for `read_into`.
        """
        self._reader.max_frame = max_size
        while True:
            payload = self._reader.next_frame()
            if payload is not None:
                return payload
            if not await self._fill(timeout, read_size):
                if self._reader.buffered:
                    raise RemoteProtocolError(Reason.TRUNCATED, "stream ended inside a frame")
                return None

    async def read_message(self, expected: Sequence[type[Message]], *, timeout: float,
                           max_size: int | None = None, read_size: int = READ_SIZE) -> Message | None:
        """Decode the next frame as one of `expected`; None at a clean end.

        An ErrorMessage from the peer raises PeerError.
        """
        limit = max_size if max_size is not None else max(cls.MAX_SIZE for cls in expected)
        payload = await self.read_frame(max(limit, ErrorMessage.MAX_SIZE), timeout, read_size=read_size)
        if payload is None:
            return None
        message = decode(payload, [*expected, ErrorMessage])
        if isinstance(message, ErrorMessage) and ErrorMessage not in expected:
            raise PeerError(message)
        return message

    async def expect(self, cls: type[M], *, timeout: float, read_size: int = READ_SIZE) -> M:
        """Read one message of type `cls`; the stream must not end first."""
        message = await self.read_message([cls], timeout=timeout, read_size=read_size)
        if message is None:
            raise RemoteProtocolError(Reason.TRUNCATED, f"stream ended before a {cls.__name__}")
        assert isinstance(message, cls)
        return message

    async def read_into(self, target: memoryview, timeout: float) -> None:
        """Fill `target` with the raw bytes after a frame (chunk data).

        Bytes already buffered come first; the rest is copied from the
        stream straight into `target`. `timeout` bounds each wait for data.
        """
        filled = self._reader.take_into(target)
        while filled < len(target):
            count = 0
            with trio.move_on_after(timeout) as scope:
                try:
                    count = await read_into(self.stream, target[filled:])
                except EOFError:
                    self._eof = True
                except TRANSPORT_ERRORS as exc:
                    raise StreamFailed(f"stream failed: {type(exc).__name__}: {exc}") from None
            if scope.cancelled_caught:
                raise StreamFailed(f"no data from the peer for {timeout:g} s")
            if self._eof or count == 0:
                self._eof = True
                raise RemoteProtocolError(
                    Reason.TRUNCATED, f"stream ended {len(target) - filled} bytes before the end of a chunk"
                )
            if self._on_bytes_in is not None:
                self._on_bytes_in(count)
            filled += count

    async def write(self, data: bytes | bytearray | memoryview, timeout: float = 30.0) -> None:
        with trio.move_on_after(timeout) as scope:
            try:
                await self.stream.write(data)
            except TRANSPORT_ERRORS as exc:
                raise StreamFailed(f"stream failed: {type(exc).__name__}: {exc}") from None
        if scope.cancelled_caught:
            raise StreamFailed(f"peer did not take data for {timeout:g} s")
        if self._on_bytes_out is not None:
            self._on_bytes_out(len(data))

    async def send(self, message: Message, timeout: float = 30.0) -> None:
        await self.write(frame(encode(message)), timeout)

    async def send_error(self, error: RemoteProtocolError) -> None:
        """Best effort: tell the peer why, then the caller closes the stream."""
        try:
            await self.send(ErrorMessage.from_error(error), timeout=5.0)
        except StreamFailed:
            pass

    async def close(self) -> None:
        with trio.move_on_after(5.0):
            try:
                await self.stream.close()
            except TRANSPORT_ERRORS:
                pass

    async def reset(self) -> None:
        with trio.move_on_after(5.0):
            try:
                await self.stream.reset()
            except TRANSPORT_ERRORS:
                pass


def most_telling(group: BaseExceptionGroup, ranking: Sequence[type[BaseException]]) -> BaseException:
    """Pick the exception of a task group that explains the failure best.

    That is the first exception, in the group's order, of the first type in
    `ranking` that any of them has. If none has one, it is the group's first.
    """
    leaves: list[BaseException] = []

    def collect(error: BaseException) -> None:
        if isinstance(error, BaseExceptionGroup):
            for inner in error.exceptions:
                collect(inner)
        else:
            leaves.append(error)

    collect(group)
    for kind in ranking:
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return leaves[0]


class InboundLimiter:
    """Caps concurrent inbound streams per peer for pmarket's protocols."""

    def __init__(self, max_per_peer: int) -> None:
        self.max_per_peer = max_per_peer
        self._open: dict[bytes, int] = {}

    def wrap(self, handler: Callable[[Any], Awaitable[None]], name: str) -> Callable[[Any], Awaitable[None]]:
        async def limited(stream: Any) -> None:
            peer = bytes(stream.muxed_conn.peer_id.to_bytes())
            if self._open.get(peer, 0) >= self.max_per_peer:
                logger.debug("Reset %s stream: peer has %d open", name, self.max_per_peer)
                with trio.move_on_after(5.0):
                    try:
                        await stream.reset()
                    except TRANSPORT_ERRORS:
                        pass
                return
            self._open[peer] = self._open.get(peer, 0) + 1
            try:
                await handler(stream)
            finally:
                self._open[peer] -= 1
                if not self._open[peer]:
                    del self._open[peer]

        return limited
