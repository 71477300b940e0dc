"""Faster Noise and Yamux for py-libp2p 0.8.1, with the same bytes on the wire.

One py-libp2p 0.8.1 stream moves far less than the cipher allows: see
`./scripts/bench transfer` in docs/benchmarks.md for both on the same
machine. The time goes to Python work per small unit of data, not to
cryptography:

* Noise: every message of at most 65,535 bytes costs two socket reads (its
  2-byte length, then its body) and one socket write. Each read or write
  also passes through several layers of buffers that copy the bytes again.
* Yamux: data frames carry at most 64 KiB. A frame of 65,536 bytes (header
  included) does not fit one Noise message (65,519 bytes of plaintext), so
  each frame becomes two messages, the second 17 bytes long. The receiver
  sends a window update after every read, and a sender that finds its window
  empty polls for credit every 10 ms.

This module replaces those hot paths, and only those, with subclasses that
`node.host.build_host` installs on the node's host. Other hosts in the same
process keep the stock classes. What changes:

* `TunedNoiseTransport` runs the stock XX handshake, then hands the session
  to `NoiseSession`. The session receives up to `RECEIVE_SIZE` bytes per
  socket read and decrypts the complete messages in them, straight into the
  reader's buffer where they fit. It encrypts a whole write into one buffer
  that goes out in one socket write. Each Noise message still contains at
  most 65,519 bytes of plaintext and the 16-byte tag behind a 2-byte
  big-endian length, and the nonces count up from 0, as the libp2p Noise
  spec requires.
* `TunedYamux` and `TunedYamuxStream` send data frames of up to
  `MAX_FRAME_SIZE` bytes, never more than the peer's send window allows.
  A writer waits for window credit on an event instead of polling. Each
  stream grants a receive window of `RECEIVE_WINDOW` bytes and sends a window
  update only when half of it is consumed, as go-yamux does. A reader can
  copy stream data straight into its own buffer (`read_into`).

The frame format, flags, flow control and stream states are those of the
Yamux spec (hashicorp/yamux, spec.md), so go-libp2p and js-libp2p peers
interoperate: they accept data frames up to the receive window they granted,
and a window update may grant more than the initial 256 KiB. Everything else
(handshake, stream open and close, pings, GoAway, the frame loop) stays
py-libp2p's own.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
from typing import Any

import trio
from cryptography.exceptions import InvalidTag
from libp2p.io.exceptions import IncompleteReadError
from libp2p.network.connection.exceptions import RawConnError
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.security.secure_session import SecureSession
from libp2p.stream_muxer.exceptions import MuxedStreamEOF, MuxedStreamError, MuxedStreamReset
from libp2p.stream_muxer.muxer_multistream import MuxerMultistream
from libp2p.stream_muxer.yamux import yamux as yamux_module
from libp2p.stream_muxer.yamux.yamux import Yamux, YamuxStream

# Noise transport messages (libp2p noise spec): a 2-byte big-endian length,
# then at most 65,535 bytes of ciphertext, of which 16 are the Poly1305 tag.
MAX_NOISE_MESSAGE = 65535
TAG_SIZE = 16
MAX_NOISE_PLAINTEXT = MAX_NOISE_MESSAGE - TAG_SIZE
MAX_NONCE = 2**64 - 1

# Bytes requested from the socket per read. Larger reads mean fewer trips
# through trio and the kernel, and 1 MiB contains 16 full Noise messages.
RECEIVE_SIZE = 1 << 20

# Largest Yamux data frame this node sends, payload only. The peer's window
# caps every frame too; py-libp2p and go-yamux read frames up to their window.
MAX_FRAME_SIZE = 1 << 20

# Receive window granted to every stream. py-libp2p's auto-tuning also grows
# windows up to 16 MiB; this starts there instead of at 256 KiB.
RECEIVE_WINDOW = 16 << 20

# How long a writer waits for window credit before the stream fails.
WINDOW_WAIT_TIMEOUT_S = 30.0

_YAMUX_HEADER = struct.Struct(yamux_module.YAMUX_HEADER_FORMAT)
_LENGTH = struct.Struct(">H")


class NoiseDecryptError(RawConnError):
    """A Noise message failed authentication or was malformed; the connection is unusable."""


class NoiseSession(SecureSession):
    """A Noise transport session with buffered reads and one socket write per write.

    Built from a finished handshake: the raw connection, the two cipher
    states of the `noise` library (whose keys and nonces it takes over) and
    the identities of the stock session.
    """

    def __init__(self, stock: SecureSession) -> None:
        noise_writer: Any = stock.conn
        super().__init__(
            local_peer=stock.local_peer,
            local_private_key=stock.local_private_key,
            remote_peer=stock.remote_peer,
            remote_permanent_pubkey=stock.remote_permanent_pubkey,
            is_initiator=stock.is_initiator,
            conn=noise_writer,
        )
        protocol = noise_writer.noise_state.noise_protocol
        encrypt_state = protocol.cipher_state_encrypt
        decrypt_state = protocol.cipher_state_decrypt
        self._raw: Any = noise_writer.read_writer.read_write_closer
        self._encryptor: Any = encrypt_state.cipher.cipher
        self._decryptor: Any = decrypt_state.cipher.cipher
        self._send_nonce: int = encrypt_state.n
        self._receive_nonce: int = decrypt_state.n
        self._send_lock = trio.Lock()
        self._send_buffer = bytearray()
        # Received ciphertext of complete messages, not yet decrypted.
        self._messages: deque[memoryview] = deque()
        # The start of a message whose end has not arrived yet (length prefix included).
        self._partial = bytearray()
        # Decrypted bytes not yet returned to a reader.
        self._plain = memoryview(b"")

    # Receiving ---------------------------------------------------------------

    async def _receive(self) -> None:
        """Read from the socket until at least one complete message is queued."""
        while not self._messages:
            data = await self._raw.read(RECEIVE_SIZE)
            if not data:
                received = len(self._partial)
                raise IncompleteReadError(
                    f"connection closed with {received} bytes of an incomplete Noise message",
                    expected_bytes=received + 1,
                    received_bytes=received,
                )
            self._split(memoryview(data))

    def _split(self, data: memoryview) -> None:
        """Queue every complete message in `data`; keep an incomplete tail."""
        position = 0
        if self._partial:
            # Complete the message that the previous read cut off.
            if len(self._partial) < 2:
                position = 2 - len(self._partial)
                self._partial += data[:position]
                if len(self._partial) < 2:
                    return
            need = 2 + _LENGTH.unpack_from(self._partial)[0] - len(self._partial)
            taken = min(need, len(data) - position)
            self._partial += data[position : position + taken]
            position += taken
            if taken < need:
                return
            self._queue(memoryview(bytes(self._partial))[2:])
            self._partial = bytearray()
        end = len(data)
        while end - position >= 2:
            size = (data[position] << 8) | data[position + 1]
            if end - position - 2 < size:
                break
            self._queue(data[position + 2 : position + 2 + size])
            position += 2 + size
        if position < end:
            self._partial = bytearray(data[position:])

    def _queue(self, message: memoryview) -> None:
        if len(message) < TAG_SIZE:
            raise NoiseDecryptError(f"Noise message of {len(message)} bytes is shorter than its tag")
        self._messages.append(message)

    def _nonce(self) -> bytes:
        if self._receive_nonce >= MAX_NONCE:
            raise NoiseDecryptError("the Noise receive nonce is exhausted")
        nonce = b"\x00\x00\x00\x00" + self._receive_nonce.to_bytes(8, "little")
        self._receive_nonce += 1
        return nonce

    def _decrypt_next(self) -> memoryview:
        message = self._messages.popleft()
        try:
            return memoryview(self._decryptor.decrypt(self._nonce(), message, None))
        except InvalidTag:
            raise NoiseDecryptError("a Noise message failed authentication") from None

    def _decrypt_next_into(self, target: memoryview) -> None:
        message = self._messages.popleft()
        try:
            self._decryptor.decrypt_into(self._nonce(), message, None, target)
        except InvalidTag:
            raise NoiseDecryptError("a Noise message failed authentication") from None

    async def read(self, n: int | None = None) -> bytes:
        """Return at most `n` bytes (all decrypted bytes at hand if None), waiting for some."""
        if n == 0:
            return b""
        if not self._plain:
            if not self._messages:
                await self._receive()
            self._plain = self._decrypt_next()
        if n is None or n >= len(self._plain):
            result = bytes(self._plain)
            self._plain = memoryview(b"")
        else:
            result = bytes(self._plain[:n])
            self._plain = self._plain[n:]
        return result

    async def read_exactly_into(self, target: memoryview) -> None:
        """Fill `target` with the next len(target) plaintext bytes.

        Messages that fit decrypt straight into `target`; only a message
        that straddles its end passes through a separate buffer. Raises
        IncompleteReadError if the connection closes first.
        """
        filled = 0
        size = len(target)
        if self._plain:
            taken = min(len(self._plain), size)
            target[:taken] = self._plain[:taken]
            self._plain = self._plain[taken:]
            filled = taken
        while filled < size:
            if not self._messages:
                await self._receive()
            plain_size = len(self._messages[0]) - TAG_SIZE
            if plain_size <= size - filled:
                self._decrypt_next_into(target[filled : filled + plain_size])
                filled += plain_size
            else:
                plain = self._decrypt_next()
                taken = size - filled
                target[filled:] = plain[:taken]
                self._plain = plain[taken:]
                filled = size

    # Sending -------------------------------------------------------------------

    async def write(self, data: bytes) -> None:
        await self.write_parts((data,))

    async def write_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """Encrypt the concatenation of `parts` and send it in one socket write."""
        messages = _messages_of(parts)
        if not messages:
            return
        wire_size = sum(len(plain) for plain in messages) + len(messages) * (2 + TAG_SIZE)
        async with self._send_lock:
            if len(self._send_buffer) < wire_size:
                self._send_buffer = bytearray(wire_size)
            out = memoryview(self._send_buffer)
            offset = 0
            for plain in messages:
                if self._send_nonce >= MAX_NONCE:
                    raise RawConnError("the Noise send nonce is exhausted")
                size = len(plain) + TAG_SIZE
                _LENGTH.pack_into(out, offset, size)
                nonce = b"\x00\x00\x00\x00" + self._send_nonce.to_bytes(8, "little")
                self._encryptor.encrypt_into(nonce, plain, None, out[offset + 2 : offset + 2 + size])
                self._send_nonce += 1
                offset += 2 + size
            await self._raw.write(out[:offset])

    async def close(self) -> None:
        await self._raw.close()


def _messages_of(parts: Sequence[bytes | bytearray | memoryview]) -> list[memoryview]:
    """Cut each of `parts` into plaintexts of at most one Noise message, without copying.

    A part never shares a message with the next one, which costs 18 bytes
    on the wire for a short part (a Yamux header, say) and saves joining it
    with the start of the next part.
    """
    messages: list[memoryview] = []
    for part in parts:
        view = memoryview(part).cast("B")
        for position in range(0, len(view), MAX_NOISE_PLAINTEXT):
            messages.append(view[position : position + MAX_NOISE_PLAINTEXT])
    return messages


class TunedNoiseTransport(NoiseTransport):
    """The stock Noise XX handshake, then a `NoiseSession`."""

    async def secure_inbound(self, conn: Any) -> Any:
        stock: Any = await super().secure_inbound(conn)
        return NoiseSession(stock)

    async def secure_outbound(self, conn: Any, peer_id: Any) -> Any:
        stock: Any = await super().secure_outbound(conn, peer_id)
        return NoiseSession(stock)


class TunedYamuxStream(YamuxStream):
    """A Yamux stream with large frames, event-driven window waits and `read_into`.

    py-libp2p creates every stream as a `YamuxStream`, so `TunedYamux`
    switches the class of each stream it opens or accepts to this subclass
    before returning it. The subclass adds methods and no instance state.
    """

    # The stock receive loop adds window credit with `stream.send_window += n`;
    # this property turns that into a wake-up for a waiting writer.
    @property
    def send_window(self) -> int:
        value: int = self.__dict__["send_window"]
        return value

    @send_window.setter
    def send_window(self, value: int) -> None:
        self.__dict__["send_window"] = value
        event: trio.Event | None = self.__dict__.get("_window_event")
        if event is not None and value > 0:
            event.set()

    def _tune(self) -> None:
        self.target_recv_window = max(self.target_recv_window, RECEIVE_WINDOW)
        self.__dict__["_window_event"] = trio.Event()

    async def write(self, data: bytes | bytearray | memoryview) -> None:
        view = memoryview(data).cast("B")
        async with self.rw_lock.write_lock():
            sent = 0
            while sent < len(view):
                if self.send_closed:
                    raise MuxedStreamError("Stream is closed for sending")
                if self.closed:
                    raise MuxedStreamError("Stream is closed")
                window = self.send_window
                if window <= 0:
                    await self._wait_for_window()
                    continue
                size = min(window, MAX_FRAME_SIZE, len(view) - sent)
                self.send_window = window - size
                conn: Any = self.conn
                await conn.write_data_frame(self.stream_id, view[sent : sent + size])
                sent += size

    async def _wait_for_window(self) -> None:
        """Wait until the peer grants credit or the stream closes.

        A window update wakes the writer at once. A reset does not touch the
        window, so the wait also checks the stream's state every 50 ms.
        """
        event = trio.Event()
        self.__dict__["_window_event"] = event
        deadline = trio.current_time() + WINDOW_WAIT_TIMEOUT_S
        while self.send_window <= 0 and not self.closed and not self.send_closed:
            if trio.current_time() >= deadline:
                raise MuxedStreamError(f"no window update from the peer for {WINDOW_WAIT_TIMEOUT_S:g} s")
            with trio.move_on_after(0.05):
                await event.wait()

    async def read_into(self, target: memoryview) -> int:
        """Copy up to len(target) buffered bytes into `target`, waiting for some.

        Returns the count copied. Raises MuxedStreamEOF at the end of the
        stream and MuxedStreamReset if the peer reset it.
        """
        conn = self.conn
        while True:
            buffer = conn.stream_buffers.get(self.stream_id)
            if buffer:
                count = min(len(buffer), len(target))
                target[:count] = memoryview(buffer)[:count]
                del buffer[:count]
                if self.closed and not buffer:
                    await conn._finalize_stream(self, fully_closed=True)
                await self._release()
                return count
            if self.reset_received:
                raise MuxedStreamReset("Stream was reset")
            if buffer is None or self.recv_closed or conn.event_shutting_down.is_set():
                raise MuxedStreamEOF("Stream is closed for receiving")
            event = conn.stream_events.get(self.stream_id)
            if event is None:
                raise MuxedStreamEOF("Stream was removed")
            await event.wait()
            if conn.stream_events.get(self.stream_id) is event:
                conn.stream_events[self.stream_id] = trio.Event()

    async def _auto_tune_and_send_window_update(self, *, bytes_read: int = 0) -> None:
        await self._release()

    async def _release(self) -> None:
        """Grant credit back up to the target window once half of it is free (go-yamux's rule)."""
        async with self.window_lock:
            buffered = len(self.conn.stream_buffers.get(self.stream_id, b""))
            delta = self.target_recv_window - (self.recv_window + buffered)
            if delta < self.target_recv_window // 2:
                return
            self.recv_window += delta
        await self.send_window_update(delta)


class TunedYamux(Yamux):
    """Yamux whose streams are `TunedYamuxStream`s and whose frame bodies skip extra copies."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._body_buffer = bytearray()

    async def open_stream(self) -> YamuxStream:
        stream = await super().open_stream()
        _tune_stream(stream)
        return stream

    async def accept_stream(self) -> Any:
        stream: Any = await super().accept_stream()
        _tune_stream(stream)
        return stream

    async def _read_data_body(self, length: int) -> bytes:
        session = self.secured_conn
        if not isinstance(session, NoiseSession):
            return await super()._read_data_body(length)
        # The receive loop copies each body into its stream's buffer before it
        # reads the next frame, so one buffer serves every body.
        if len(self._body_buffer) < length:
            self._body_buffer = bytearray(length)
        body = memoryview(self._body_buffer)[:length]
        with trio.fail_after(yamux_module._yamux_data_read_timeout()):
            await session.read_exactly_into(body)
        return body  # type: ignore[return-value]  # the receive loop only extends a bytearray with it

    async def write_data_frame(self, stream_id: int, payload: memoryview) -> None:
        """Send one data frame without joining its header and payload first."""
        header = _YAMUX_HEADER.pack(0, yamux_module.TYPE_DATA, 0, stream_id, len(payload))
        session = self.secured_conn
        async with self._write_lock:
            if isinstance(session, NoiseSession):
                await session.write_parts((header, payload))
            else:
                await session.write(header + bytes(payload))
        await trio.lowlevel.checkpoint()


class TunedMuxerMultistream(MuxerMultistream):
    """Muxer negotiation that builds a `TunedYamux` for /yamux/1.0.0.

    py-libp2p 0.8.1 builds a stock `Yamux` for that protocol whatever class
    `muxer_opt` names, so `tune_host` installs this on the host's upgrader.
    """

    async def new_conn(self, conn: Any, peer_id: Any) -> Any:
        protocol, transport_class = await self._selector.select(conn, conn.is_initiator, self.negotiate_timeout)
        muxed: Any
        if protocol == yamux_module.PROTOCOL_ID:
            muxed = TunedYamux(conn, peer_id, is_initiator=conn.is_initiator)
        else:
            muxed = transport_class(conn, peer_id)
        return self._annotate_connection(muxed, conn, protocol)


def tune_host(host: Any) -> None:
    """Make a host built with `TunedNoiseTransport` also use `TunedYamux`."""
    upgrader = host.get_network().upgrader
    stock = upgrader.muxer_multistream
    tuned = TunedMuxerMultistream({}, stock.negotiate_timeout)
    for protocol, transport in stock.transports.items():
        tuned.add_transport(protocol, transport)
    upgrader.muxer_multistream = tuned


def _tune_stream(stream: YamuxStream) -> None:
    if not isinstance(stream, TunedYamuxStream):
        stream.__class__ = TunedYamuxStream
    assert isinstance(stream, TunedYamuxStream)
    stream._tune()


async def read_into(stream: Any, target: memoryview) -> int:
    """Read up to len(target) bytes of a libp2p stream into `target`; return the count.

    Uses `TunedYamuxStream.read_into` when the stream has one, else an
    ordinary read and a copy. Raises what `INetStream.read` raises:
    StreamEOF at the end, StreamReset after a reset.
    """
    from libp2p.network.stream.exceptions import StreamEOF, StreamReset

    muxed = getattr(stream, "muxed_stream", None)
    if not isinstance(muxed, TunedYamuxStream):
        data = await stream.read(len(target))
        target[: len(data)] = data
        return len(data)
    try:
        return await muxed.read_into(target)
    except MuxedStreamEOF as exc:
        raise StreamEOF() from exc
    except MuxedStreamReset as exc:
        raise StreamReset() from exc
