"""The tuned Noise session and Yamux muxer against py-libp2p's stock ones.

A node's host (`node.host.build_host`) talks to a host built with py-libp2p's
own Noise and Yamux in the same process, in both directions, so any change to
the bytes on the wire shows up as a failed transfer. The Noise session is also
checked alone, against the libp2p Noise framing decoded by hand.
"""

from __future__ import annotations

import hashlib
import logging
import random
import types
from pathlib import Path
from typing import Any

import multiaddr
import pytest
import trio
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from libp2p import new_host
from libp2p.crypto.ed25519 import create_new_key_pair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.io.exceptions import IncompleteReadError
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.peer.peerinfo import info_from_p2p_addr
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux

from node import libp2p_tuning
from node.config import Config
from node.datadir import DataDir, init
from node.host import build_host
from node.libp2p_tuning import (
    MAX_FRAME_SIZE,
    MAX_NOISE_PLAINTEXT,
    NoiseDecryptError,
    NoiseSession,
    read_into,
)

pytestmark = pytest.mark.network

ECHO = TProtocol("/test/echo-digest/1.0.0")
LISTEN = "/ip4/127.0.0.1/tcp/0"


def stock_host() -> Any:
    key_pair = create_new_key_pair()
    security = {NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)}
    return new_host(
        key_pair=key_pair, sec_opt=security, muxer_opt={YAMUX_PROTOCOL_ID: Yamux},  # type: ignore[arg-type]
        listen_addrs=[multiaddr.Multiaddr(LISTEN)],
    )


def node_host(root: Path) -> Any:
    return build_host(init(DataDir(root)), Config(), [LISTEN])


async def read_all(stream: Any, *, into: bool) -> bytes:
    """Read a stream to its end, with `read_into` or with plain reads."""
    parts = []
    buffer = memoryview(bytearray(300_000))
    while True:
        try:
            if into:
                count = await read_into(stream, buffer)
                parts.append(bytes(buffer[:count]))
            else:
                parts.append(await stream.read(1 << 20))
        except StreamEOF:
            return b"".join(parts)


async def echo_digest(stream: Any) -> None:
    """Read everything, then reply with its SHA-256 and length, and close."""
    data = await read_all(stream, into=True)
    await stream.write(hashlib.sha256(data).digest() + len(data).to_bytes(8, "big"))
    await stream.close()


def payload() -> bytes:
    return random.Random(5).randbytes(3 * MAX_FRAME_SIZE + 17)


async def send_and_check(client: Any, server: Any) -> int:
    """Send the payload in uneven writes on a new stream, check the digest; return the Yamux stream ID."""
    server.set_stream_handler(ECHO, echo_digest)
    await client.connect(info_from_p2p_addr(server.get_addrs()[0]))
    stream = await client.new_stream(server.get_id(), [ECHO])
    data = payload()
    sizes = [1, 70_000, MAX_NOISE_PLAINTEXT, MAX_NOISE_PLAINTEXT + 1, 2 * MAX_FRAME_SIZE]
    position = 0
    for size in sizes:
        await stream.write(data[position : position + size])
        position += size
    await stream.write(data[position:])
    await stream.close()
    reply = await read_all(stream, into=False)
    assert reply == hashlib.sha256(data).digest() + len(data).to_bytes(8, "big")
    stream_id: int = stream.muxed_stream.stream_id
    return stream_id


@pytest.mark.parametrize(("client_kind", "server_kind"), [("tuned", "stock"), ("stock", "tuned"), ("tuned", "tuned")])
async def test_tuned_host_interoperates(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, client_kind: str, server_kind: str
) -> None:
    caplog.set_level(logging.WARNING, logger="libp2p")
    client = node_host(tmp_path / "client") if client_kind == "tuned" else stock_host()
    server = node_host(tmp_path / "server") if server_kind == "tuned" else stock_host()
    async with client.run([multiaddr.Multiaddr(LISTEN)]), server.run([multiaddr.Multiaddr(LISTEN)]):
        with trio.fail_after(60):
            await send_and_check(client, server)
    # A stock Yamux receiver warns when a sender overruns the window it granted.
    assert not [r for r in caplog.records if "exceeded receive window" in r.getMessage()]


async def test_tuned_frames_at_most_max_size(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    frames: list[tuple[int, int]] = []
    original = libp2p_tuning.TunedYamux.write_data_frame

    async def record(self: Any, stream_id: int, payload: memoryview) -> None:
        frames.append((stream_id, len(payload)))
        await original(self, stream_id, payload)

    monkeypatch.setattr(libp2p_tuning.TunedYamux, "write_data_frame", record)
    client = node_host(tmp_path / "client")
    server = stock_host()
    async with client.run([multiaddr.Multiaddr(LISTEN)]), server.run([multiaddr.Multiaddr(LISTEN)]):
        with trio.fail_after(60):
            stream_id = await send_and_check(client, server)
    sizes = [size for frame_stream, size in frames if frame_stream == stream_id]
    assert max(sizes) <= MAX_FRAME_SIZE
    # The payload, plus a few bytes of protocol negotiation on the same stream.
    assert len(payload()) <= sum(sizes) < len(payload()) + 100


# The Noise session alone -------------------------------------------------------


class Pipe:
    """One direction of a fake raw connection that hands out reads of random sizes."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.buffer = bytearray()
        self.closed = False
        self.wire = bytearray()  # every byte ever written, for decoding by hand
        self.arrived = trio.Event()

    async def write(self, data: Any) -> None:
        self.buffer += data
        self.wire += data
        self.arrived.set()

    async def read(self, n: int | None = None) -> bytes:
        while not self.buffer and not self.closed:
            self.arrived = trio.Event()
            await self.arrived.wait()
        size = min(len(self.buffer), self.rng.randint(1, 100_000), n or len(self.buffer))
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    async def close(self) -> None:
        self.closed = True
        self.arrived.set()


class RawEnd:
    def __init__(self, incoming: Pipe, outgoing: Pipe) -> None:
        self.incoming = incoming
        self.outgoing = outgoing

    async def read(self, n: int | None = None) -> bytes:
        return await self.incoming.read(n)

    async def write(self, data: Any) -> None:
        await self.outgoing.write(data)

    async def close(self) -> None:
        await self.outgoing.close()


def fake_stock_session(raw: RawEnd, send_key: bytes, receive_key: bytes) -> Any:
    """The parts of a finished py-libp2p Noise session that `NoiseSession` takes over."""
    encrypt = types.SimpleNamespace(cipher=types.SimpleNamespace(cipher=ChaCha20Poly1305(send_key)), n=0)
    decrypt = types.SimpleNamespace(cipher=types.SimpleNamespace(cipher=ChaCha20Poly1305(receive_key)), n=0)
    protocol = types.SimpleNamespace(cipher_state_encrypt=encrypt, cipher_state_decrypt=decrypt)
    conn = types.SimpleNamespace(
        noise_state=types.SimpleNamespace(noise_protocol=protocol),
        read_writer=types.SimpleNamespace(read_write_closer=raw),
    )
    return types.SimpleNamespace(
        conn=conn, local_peer=None, local_private_key=None, remote_peer=None,
        remote_permanent_pubkey=None, is_initiator=True,
    )


def session_pair(seed: int) -> tuple[NoiseSession, NoiseSession, Pipe, bytes]:
    """A sender and a receiver session joined by fake raw connections; also the sender's key."""
    rng = random.Random(seed)
    forward, backward = Pipe(rng), Pipe(rng)
    key_a, key_b = rng.randbytes(32), rng.randbytes(32)
    sender = NoiseSession(fake_stock_session(RawEnd(backward, forward), key_a, key_b))
    receiver = NoiseSession(fake_stock_session(RawEnd(forward, backward), key_b, key_a))
    return sender, receiver, forward, key_a


def decode_wire(wire: bytes, key: bytes) -> bytes:
    """Decrypt libp2p Noise transport messages by the spec: 2-byte length, ciphertext, nonce counter."""
    aead = ChaCha20Poly1305(key)
    plain = bytearray()
    position, nonce = 0, 0
    while position < len(wire):
        size = int.from_bytes(wire[position : position + 2], "big")
        assert 16 <= size <= 65535
        body = wire[position + 2 : position + 2 + size]
        plain += aead.decrypt(b"\x00" * 4 + nonce.to_bytes(8, "little"), body, None)
        position += 2 + size
        nonce += 1
    return bytes(plain)


async def test_noise_session_round_trip_and_wire_format() -> None:
    sender, receiver, wire, key = session_pair(1)
    rng = random.Random(2)
    writes = [rng.randbytes(size) for size in (1, 12, MAX_NOISE_PLAINTEXT, MAX_NOISE_PLAINTEXT + 1, 300_000, 5)]
    for data in writes:
        await sender.write(data)
    body = rng.randbytes(200_000)
    await sender.write_parts((b"header", memoryview(body), b"", b"end"))
    expected = b"".join(writes) + b"header" + body + b"end"

    assert decode_wire(bytes(wire.wire), key) == expected

    received = bytearray()
    while len(received) < len(expected):
        size = min(rng.randint(1, 200_000), len(expected) - len(received))
        if rng.random() < 0.5:
            received += await receiver.read(size)
        else:
            target = memoryview(bytearray(size))
            await receiver.read_exactly_into(target)
            received += target
    assert bytes(received) == expected


async def test_noise_session_rejects_tampered_message() -> None:
    sender, receiver, wire, _ = session_pair(3)
    await sender.write(b"x" * 1000)
    wire.buffer[500] ^= 0x01
    with pytest.raises(NoiseDecryptError):
        await receiver.read(1000)


async def test_noise_session_end_inside_message_is_not_clean() -> None:
    sender, receiver, wire, _ = session_pair(4)
    await sender.write(b"y" * 1000)
    del wire.buffer[600:]
    await wire.close()
    with pytest.raises(IncompleteReadError) as error:
        await receiver.read(1000)
    assert not error.value.is_clean_close


async def test_noise_session_end_between_messages_is_clean() -> None:
    sender, receiver, wire, _ = session_pair(5)
    await sender.write(b"z" * 10)
    await wire.close()
    assert await receiver.read(100) == b"z" * 10
    with pytest.raises(IncompleteReadError) as error:
        await receiver.read(100)
    assert error.value.is_clean_close
