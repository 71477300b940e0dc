"""One end of a bulk transfer over one stream, for `scripts/bench transfer`.

Three stacks move the same bytes between two processes:

* raw: trio TCP, no encryption or multiplexing;
* stock: py-libp2p's own Noise and Yamux with their defaults;
* tuned: the node's Noise and Yamux (`node.libp2p_tuning`).

`receive` listens on 127.0.0.1, prints its address on the first line of
stdout, reads `--bytes` bytes from one stream, replies with one byte and
exits. `send` connects, sends a file's bytes in 4 MiB writes, waits for the
reply and prints one JSON line: the seconds from the first write to the
reply, and the CPU seconds it used meanwhile. The receiver prints its CPU
seconds the same way, on its last line.

    python -m scripts.benchmarks.stream_peer receive --stack tuned --bytes N
    python -m scripts.benchmarks.stream_peer send --stack tuned --address ADDR --file PATH
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from typing import Any

import trio

PROTOCOL = "/pmarket-bench/bulk/1.0.0"
WRITE_SIZE = 4 << 20
READ_SIZE = 1 << 20
LISTEN = "/ip4/127.0.0.1/tcp/0"


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def make_host(stack: str) -> Any:
    import multiaddr
    from libp2p import new_host
    from libp2p.crypto.ed25519 import create_new_key_pair
    from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
    from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
    from libp2p.security.noise.transport import Transport as NoiseTransport
    from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
    from libp2p.stream_muxer.yamux.yamux import Yamux

    from node.libp2p_tuning import TunedNoiseTransport, tune_host

    key_pair = create_new_key_pair()
    transport = TunedNoiseTransport if stack == "tuned" else NoiseTransport
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: transport(key_pair, noise_privkey=new_x25519_key_pair().private_key)},
        muxer_opt={YAMUX_PROTOCOL_ID: Yamux},  # type: ignore[dict-item]
        listen_addrs=[multiaddr.Multiaddr(LISTEN)],
    )
    if stack == "tuned":
        tune_host(host)
    return host


async def receive(stack: str, total: int) -> None:
    done = trio.Event()
    report: dict[str, float] = {}

    async def drain(read: Any, reply: Any) -> None:
        received = 0
        cpu_before = None
        while received < total:
            count = await read()
            if cpu_before is None:
                cpu_before = cpu_seconds()
            received += count
        await reply()
        report["cpu_seconds"] = cpu_seconds() - (cpu_before or 0.0)
        done.set()

    if stack == "raw":
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        print(listeners[0].socket.getsockname()[1], flush=True)
        connection = await listeners[0].accept()

        async def read_raw() -> int:
            data = await connection.receive_some(READ_SIZE)
            if not data:
                raise EOFError("the sender closed the connection early")
            return len(data)

        await drain(read_raw, lambda: connection.send_all(b"k"))
        await connection.aclose()
    else:
        import multiaddr
        from libp2p.custom_types import TProtocol

        from node.libp2p_tuning import read_into

        host = make_host(stack)
        buffer = memoryview(bytearray(READ_SIZE))

        async def handler(stream: Any) -> None:
            async def read_stream() -> int:
                if stack == "tuned":
                    return await read_into(stream, buffer)
                return len(await stream.read(READ_SIZE))

            await drain(read_stream, lambda: stream.write(b"k"))
            await stream.close()

        host.set_stream_handler(TProtocol(PROTOCOL), handler)
        async with host.run([multiaddr.Multiaddr(LISTEN)]):
            print(host.get_addrs()[0], flush=True)
            await done.wait()
            await trio.sleep(0.2)  # let the reply go out before the host stops
    print(json.dumps(report), flush=True)


async def send(stack: str, address: str, path: str) -> None:
    size = os.path.getsize(path)
    buffer = bytearray(WRITE_SIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        if stack == "raw":
            connection = await trio.open_tcp_stream("127.0.0.1", int(address))
            write, read_reply = connection.send_all, lambda: connection.receive_some(1)
            await _send_file(fd, size, buffer, write, read_reply)
            await connection.aclose()
            return
        import multiaddr
        from libp2p.custom_types import TProtocol
        from libp2p.peer.peerinfo import info_from_p2p_addr

        host = make_host(stack)
        async with host.run([multiaddr.Multiaddr(LISTEN)]):
            info = info_from_p2p_addr(multiaddr.Multiaddr(address))
            await host.connect(info)
            stream = await host.new_stream(info.peer_id, [TProtocol(PROTOCOL)])
            await _send_file(fd, size, buffer, stream.write, lambda: stream.read(1))
    finally:
        os.close(fd)


async def _send_file(fd: int, size: int, buffer: bytearray, write: Any, read_reply: Any) -> None:
    view = memoryview(buffer)
    started, cpu_before = time.perf_counter(), cpu_seconds()
    offset = 0
    while offset < size:
        count = os.preadv(fd, [view[: min(WRITE_SIZE, size - offset)]], offset)
        await write(view[:count])
        offset += count
    reply = await read_reply()
    if not reply:
        raise EOFError("the receiver closed the stream without replying")
    print(json.dumps({"seconds": time.perf_counter() - started, "cpu_seconds": cpu_seconds() - cpu_before}), flush=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.benchmarks.stream_peer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("role", choices=["receive", "send"])
    parser.add_argument("--stack", choices=["raw", "stock", "tuned"], required=True)
    parser.add_argument("--bytes", type=int, help="bytes to receive (receive)")
    parser.add_argument("--address", help="port (raw) or multiaddr of the receiver (send)")
    parser.add_argument("--file", help="file whose bytes to send (send)")
    args = parser.parse_args(argv)
    if args.role == "receive":
        if args.bytes is None:
            parser.error("receive needs --bytes")
        trio.run(receive, args.stack, args.bytes)
    else:
        if args.address is None or args.file is None:
            parser.error("send needs --address and --file")
        trio.run(send, args.stack, args.address, args.file)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
