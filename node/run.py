"""`pmarket node start`: run one node in the foreground until a signal."""

from __future__ import annotations

import logging
import signal
import sys

import trio

from node import logs
from node.config import ConfigError, load, validate
from node.daemon import Node, NodeOptions
from node.datadir import DaemonLock, DataDir, DataDirError, load_identity
from node.host import ListenError, check_listen_addrs

logger = logging.getLogger(__name__)


def run_foreground(
    data_dir: DataDir,
    *,
    listen: list[str] | None = None,
    bootstrap: list[str] | None = None,
    mdns: bool | None = None,
    log_level: str | None = None,
) -> int:
    """Run the daemon; SIGINT or SIGTERM stops it cleanly. Returns the exit status."""
    identity = load_identity(data_dir)
    try:
        config = load(data_dir.config)
        if listen:
            config.node.listen = list(listen)
        if bootstrap:
            config.node.bootstrap = [*config.node.bootstrap, *bootstrap]
        if mdns is not None:
            config.node.mdns = mdns
        if log_level:
            config.node.log_level = log_level
        validate(config, "command line")
    except ConfigError as exc:
        raise DataDirError(str(exc)) from None

    lock = DaemonLock(data_dir)
    lock.acquire()
    try:
        try:
            check_listen_addrs(config.node.listen)
        except ListenError as exc:
            raise DataDirError(str(exc)) from None
        logs.setup(config.node.log_level, data_dir.log)
        node = Node(data_dir, config, identity, NodeOptions())
        trio.run(_serve, node)
    finally:
        lock.release()
    return 0


async def _serve(node: Node) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_on_signal, node)
        await node.run()
        nursery.cancel_scope.cancel()


async def _stop_on_signal(node: Node) -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            if node.started.is_set():
                print(f"Stopping on {signal.Signals(signum).name}", file=sys.stderr, flush=True)
            node.request_stop()
            break
        # A second signal while stopping exits at once.
        async for _ in signals:
            raise SystemExit(130)
