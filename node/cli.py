"""The `pmarket` command line.

Commands that talk to a running daemon go through its control socket in the
data directory. Each takes `--json` for scripts and prints a table
otherwise. With no daemon running, they print an error naming the data
directory and exit with status 1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from devnet.network import DevnetError
from node.client import ControlClient, ControlError
from node.datadir import DataDir, DataDirError, default_data_dir

EXIT_OK = 0
EXIT_ERROR = 1

console = Console(soft_wrap=True)
errors = Console(stderr=True, soft_wrap=True)
if not console.is_terminal:
    # Piped output keeps peer IDs and addresses on one line.
    console.width = 200


class CommandError(Exception):
    """A user-facing error: printed without a traceback, exit status 1."""


# Arguments -----------------------------------------------------------------


def _data_dir_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--data-dir",
        type=lambda text: Path(text).expanduser().absolute(),
        default=Path(os.environ["PMARKET_DATA_DIR"]) if os.environ.get("PMARKET_DATA_DIR") else default_data_dir(),
        help="the node's data directory (default: $PMARKET_DATA_DIR, else $XDG_DATA_HOME/pmarket "
        "or ~/.local/share/pmarket)",
    )
    return parent


def _json_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--json", action="store_true", help="print JSON for scripts instead of a table")
    return parent


def build_parser() -> argparse.ArgumentParser:
    data = _data_dir_parent()
    as_json = _json_parent()
    parser = argparse.ArgumentParser(prog="pmarket", description="A peer-to-peer market for model weights.")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    init = commands.add_parser("init", parents=[data], help="create a data directory with a new identity")
    init.add_argument("--task", default="", help="task this node trains and evaluates on, for example digits")
    init.add_argument("--shard", default="0/1", metavar="INDEX/COUNT",
                      help="which of COUNT organizations' data shards this node holds (default 0/1: all of it)")
    init.add_argument("--split", choices=["iid", "complementary"], default="iid", help="how shards are cut (default iid)")
    init.add_argument("--deduction", type=float, default=0.1,
                      help="under a complementary split, the fraction of other organizations' classes a shard keeps")
    init.add_argument("--seed", type=int, default=0, help="seed of the data split and of this node's initial weights")
    init.set_defaults(run=cmd_init)

    node = commands.add_parser("node", help="run or stop the daemon")
    node_commands = node.add_subparsers(dest="node_command", metavar="COMMAND", required=True)
    start = node_commands.add_parser("start", parents=[data], help="run the daemon in the foreground")
    start.add_argument("--listen", action="append", metavar="MULTIADDR", help="address to listen on (repeatable; replaces config)")
    start.add_argument("--bootstrap", action="append", default=[], metavar="MULTIADDR",
                       help="peer to connect to, ending in /p2p/<peer ID> (repeatable; adds to config)")
    start.add_argument("--mdns", action="store_true", default=None, help="discover peers on the local network by mDNS")
    start.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="log level (default: config)")
    start.set_defaults(run=cmd_node_start)
    stop = node_commands.add_parser("stop", parents=[data, as_json], help="stop the running daemon")
    stop.set_defaults(run=cmd_node_stop)

    connect = commands.add_parser("connect", parents=[data, as_json], help="connect the daemon to a peer")
    connect.add_argument("address", metavar="MULTIADDR", help="the peer's full address, ending in /p2p/<peer ID>")
    connect.set_defaults(run=cmd_connect)

    status = commands.add_parser("status", parents=[data, as_json], help="show the daemon's identity and counts")
    status.set_defaults(run=cmd_status)
    peers = commands.add_parser("peers", parents=[data, as_json], help="list connected peers")
    peers.set_defaults(run=cmd_peers)
    offers = commands.add_parser("offers", parents=[data, as_json], help="list live offers in the offer book")
    offers.add_argument("--family", help="only offers of this model family (64 hex digits)")
    offers.set_defaults(run=cmd_offers)

    from node import cli_trade

    cli_trade.add_commands(commands, data, as_json)

    # The devnet package builds on node; its commands join the same CLI.
    from devnet import cli as devnet_cli

    devnet_cli.add_commands(commands)
    return parser


# Output helpers ---------------------------------------------------------------


def print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def table(title: str | None, columns: Sequence[str], rows: Sequence[Sequence[object]], *, headers: bool = True) -> None:
    grid = Table(title=title, show_edge=False, header_style="bold", show_header=headers)
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*[str(cell) for cell in row])
    console.print(grid)


def short_peer(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}"


def client_for(args: argparse.Namespace) -> ControlClient:
    return ControlClient(DataDir(args.data_dir))


# Commands ---------------------------------------------------------------------


def cmd_init(args: argparse.Namespace) -> int:
    from node.datadir import init
    from protocol.identity import peer_id_to_text

    data_dir = DataDir(args.data_dir)
    match = re.fullmatch(r"(\d+)/(\d+)", args.shard)
    if match is None or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise CommandError(f"--shard {args.shard!r} must be INDEX/COUNT with 0 <= INDEX < COUNT, for example 0/2")
    identity = init(data_dir)
    if args.task:
        from node.config import set_task

        set_task(
            data_dir.config,
            name=args.task,
            index=int(match.group(1)),
            orgs=int(match.group(2)),
            split=args.split,
            deduction=args.deduction if args.split == "complementary" else 1.0,
            seed=args.seed,
        )
    console.print(f"Created {data_dir.root}")
    console.print(f"Peer ID: {peer_id_to_text(identity.peer_id)}")
    console.print(f"Edit {data_dir.config} to change settings, then run `pmarket node start --data-dir {data_dir.root}`.")
    return EXIT_OK


def cmd_node_start(args: argparse.Namespace) -> int:
    from node.run import run_foreground

    return run_foreground(
        DataDir(args.data_dir),
        listen=args.listen,
        bootstrap=args.bootstrap,
        mdns=args.mdns,
        log_level=args.log_level,
    )


def cmd_node_stop(args: argparse.Namespace) -> int:
    from node.datadir import running_pid

    data_dir = DataDir(args.data_dir)
    result = client_for(args).post("/v1/stop")
    pid = running_pid(data_dir)
    if pid is not None and pid > 0:
        _wait_for_exit(data_dir, timeout=10.0)
    if args.json:
        print_json(result)
    else:
        console.print(f"Stopped node {result['peer_id']}")
    return EXIT_OK


def _wait_for_exit(data_dir: DataDir, timeout: float) -> None:
    import time

    from node.datadir import running_pid

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if running_pid(data_dir) is None:
            return
        time.sleep(0.05)
    raise CommandError(f"the daemon for {data_dir.root} did not stop within {timeout:g} s")


def cmd_connect(args: argparse.Namespace) -> int:
    result = client_for(args).post("/v1/connect", {"address": args.address})
    if args.json:
        print_json(result)
    else:
        console.print(f"Connected to {result['peer_id']}")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    status = client_for(args).get("/v1/status")
    if args.json:
        print_json(status)
        return EXIT_OK
    accepted = ", ".join(f"{k} {v}" for k, v in sorted(status["offers_accepted"].items())) or "none"
    rejected = ", ".join(f"{k} {v}" for k, v in sorted(status["offers_rejected"].items())) or "none"
    rows = [
        ("peer ID", status["peer_id"]),
        ("listening on", "\n".join(status["addrs"])),
        ("data directory", status["data_dir"]),
        ("PID", status["pid"]),
        ("uptime", f"{status['uptime_s']:.0f} s"),
        ("peers", status["peers"]),
        ("offers in book", status["offers"]),
        ("offers accepted", accepted),
        ("offers rejected", rejected),
    ]
    for key in ("models", "deals_open", "balance"):
        if key in status:
            rows.append((key.replace("_", " "), status[key]))
    if status.get("metrics_port"):
        rows.append(("metrics", f"http://127.0.0.1:{status['metrics_port']}/metrics"))
    table(None, ["", ""], rows, headers=False)
    return EXIT_OK


def cmd_peers(args: argparse.Namespace) -> int:
    peers = client_for(args).get("/v1/peers")
    if args.json:
        print_json(peers)
    else:
        table(f"{len(peers)} connected peers", ["peer ID", "addresses"], [(p["peer_id"], "\n".join(p["addrs"])) for p in peers])
    return EXIT_OK


def cmd_offers(args: argparse.Namespace) -> int:
    offers = client_for(args).get("/v1/offers", family=args.family)
    if args.json:
        print_json(offers)
        return EXIT_OK
    rows = []
    for offer in offers:
        terms = "delivery" if offer["payment"] == "delivery" else f"gain ≥ {offer['min_gain_ppm'] / 1e4:g}%"
        rows.append(
            (
                offer["offer_id"][:12],
                short_peer(offer["seller"]),
                offer["offer_key"],
                offer["family"][:12],
                f"{offer['total_bytes']:,}",
                offer["price"],
                terms,
                offer["seq"],
            )
        )
    table(f"{len(offers)} live offers", ["offer", "seller", "key", "family", "bytes", "price", "terms", "seq"], rows)
    return EXIT_OK


# Entry point -------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    run: Callable[[argparse.Namespace], int] = args.run
    try:
        return run(args)
    except (CommandError, ControlError, DataDirError, DevnetError) as exc:
        errors.print(f"[red]error:[/red] {exc}", highlight=False)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130


def entry() -> None:
    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:
        # The reader went away (`pmarket offers | head`): end quietly, like
        # other command-line tools, without a traceback on exit.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        status = EXIT_ERROR
    sys.exit(status)


if __name__ == "__main__":
    entry()
