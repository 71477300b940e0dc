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
from rich.text import Text

from devnet.network import DevnetError
from node.client import ControlClient, ControlError
from node.config import ConfigError, TaskSection, check_multiaddr, check_peer_address, validate_task
from node.datadir import DataDir, DataDirError, command_default_data_dir

EXIT_OK = 0
EXIT_ERROR = 1

# markup=False: names, paths and messages print as they are, so text in
# square brackets such as a config section [limits] stays visible.
console = Console(soft_wrap=True, markup=False)
errors = Console(stderr=True, soft_wrap=True, markup=False)
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
        default=command_default_data_dir(),
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
    init.add_argument("--shard", metavar="INDEX/COUNT",
                      help="which of COUNT organizations' data shards this node trains on (default 0/1: all of it; needs --task)")
    init.add_argument("--split", choices=["iid", "complementary"],
                      help="how shards are cut (default iid; needs --task)")
    init.add_argument("--deduction", type=float,
                      help="under --split complementary, the fraction of other organizations' classes a shard keeps, "
                      "greater than 0 and at most 1 (default 0.1)")
    init.add_argument("--seed", type=int,
                      help="seed of the data split and of this node's initial weights (default 0; needs --task)")
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
    offers.add_argument("--family", metavar="HEX",
                        help="only offers of model families whose hex ID starts with HEX: at least 8 of the "
                        "64 hex digits, such as the 12 the family column shows")
    offers.add_argument("--mine", action="store_true", help="only this node's own offers")
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


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    """Return the count and the noun in the form that fits it: "1 deal", "2 deals"."""
    if count == 1:
        return f"{count} {noun}"
    return f"{count} {plural_noun or noun + 's'}"


def short_peer(peer_id: str) -> str:
    return peer_id if len(peer_id) <= 16 else f"{peer_id[:8]}…{peer_id[-6:]}"


def client_for(args: argparse.Namespace) -> ControlClient:
    return ControlClient(DataDir(args.data_dir))


# Commands ---------------------------------------------------------------------


def check_task_name(name: str, option: str) -> None:
    """Raise CommandError, naming ``option``, unless ``name`` is a registered task."""
    from node.tasks import task_names

    names = task_names()
    if name not in names:
        raise CommandError(f"{option} {name!r} is not a known task; known tasks: {', '.join(names)}")


def _task_section(args: argparse.Namespace) -> TaskSection | None:
    """Return the [task] section that `pmarket init` options describe, checked; None without --task."""
    task_options = [option for option, value in (("--shard", args.shard), ("--split", args.split),
                                                 ("--deduction", args.deduction), ("--seed", args.seed))
                    if value is not None]
    if not args.task:
        if task_options:
            verbs = "sets the node's task data and needs" if len(task_options) == 1 else "set the node's task data and need"
            raise CommandError(f"{', '.join(task_options)} {verbs} --task, for example --task digits")
        return None
    check_task_name(args.task, "--task")

    shard = args.shard or "0/1"
    match = re.fullmatch(r"(\d+)/(\d+)", shard)
    if match is None or not 0 <= int(match.group(1)) < int(match.group(2)):
        raise CommandError(f"--shard {shard!r} must be INDEX/COUNT with 0 <= INDEX < COUNT, for example 0/2")

    split = args.split or "iid"
    if args.deduction is not None and not 0 < args.deduction <= 1:
        raise CommandError(f"--deduction {args.deduction:g} must be greater than 0 and at most 1, for example 0.1")
    if args.deduction is not None and split != "complementary":
        raise CommandError(f"--deduction applies only to --split complementary; the split is {split}")
    if split == "complementary":
        deduction = 0.1 if args.deduction is None else args.deduction
    else:
        deduction = 1.0

    section = TaskSection(
        name=args.task,
        orgs=int(match.group(2)),
        index=int(match.group(1)),
        split=split,
        deduction=deduction,
        seed=args.seed or 0,
    )
    validate_task(section, "command line")
    return section


def cmd_init(args: argparse.Namespace) -> int:
    from node.datadir import init
    from protocol.identity import peer_id_to_text

    data_dir = DataDir(args.data_dir)
    # Check every option before init() writes the identity, so a mistake leaves nothing behind.
    task = _task_section(args)
    identity = init(data_dir)
    if task is not None:
        from node.config import set_task

        set_task(
            data_dir.config,
            name=task.name,
            index=task.index,
            orgs=task.orgs,
            split=task.split,
            deduction=task.deduction,
            seed=task.seed,
        )
    console.print(f"Created {data_dir.root}")
    console.print(f"Peer ID: {peer_id_to_text(identity.peer_id)}")
    console.print(f"Edit {data_dir.config} to change settings, then run `pmarket node start --data-dir {data_dir.root}`.")
    return EXIT_OK


def cmd_node_start(args: argparse.Namespace) -> int:
    from node.run import run_foreground

    for address in args.listen or []:
        check_multiaddr(address, "--listen")
    for address in args.bootstrap:
        check_peer_address(address, "--bootstrap")
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
    check_peer_address(args.address, "peer address")
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
    if "models" in status:
        versions = status.get("model_versions", status["models"])
        rows.append(("models", f"{plural(status['models'], 'name')}, {plural(versions, 'version')}"))
    for key in ("deals_open", "balance"):
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
        table(plural(len(peers), "connected peer"), ["peer ID", "addresses"], [(p["peer_id"], "\n".join(p["addrs"])) for p in peers])
    return EXIT_OK


FAMILY_HEX_DIGITS = 64
MIN_FAMILY_PREFIX = 8


def parse_family_prefix(text: str) -> str:
    """Return ``text`` as a lowercase family prefix of 8 to 64 hex digits; raise CommandError otherwise."""
    prefix = text.strip().lower()
    if not re.fullmatch(r"[0-9a-f]*", prefix) or not MIN_FAMILY_PREFIX <= len(prefix) <= FAMILY_HEX_DIGITS:
        raise CommandError(
            f"--family {text!r} must be {MIN_FAMILY_PREFIX} to {FAMILY_HEX_DIGITS} hex digits from the start of a "
            "model family, for example the 12 that `pmarket offers` shows in its family column"
        )
    return prefix


def cmd_offers(args: argparse.Namespace) -> int:
    prefix = parse_family_prefix(args.family) if args.family is not None else None
    # The daemon filters by whole family IDs only, so a shorter prefix is matched here.
    whole = prefix if prefix is not None and len(prefix) == FAMILY_HEX_DIGITS else None
    client = client_for(args)
    offers = client.get("/v1/offers", family=whole)
    if prefix is not None:
        offers = [offer for offer in offers if offer["family"].startswith(prefix)]
    if args.mine:
        own_peer_id = client.get("/v1/status")["peer_id"]
        offers = [offer for offer in offers if offer["seller"] == own_peer_id]
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
    table(plural(len(offers), "live offer"), ["offer", "seller", "key", "family", "bytes", "price", "terms", "seq"], rows)
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
    except (CommandError, ConfigError, ControlError, DataDirError, DevnetError) as exc:
        errors.print(Text.assemble(("error:", "red"), " ", str(exc)), highlight=False)
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
