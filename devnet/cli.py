"""`pmarket devnet`: start a local market of real node processes and run the experiment."""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from devnet.experiment import ExperimentResult, ExperimentSettings, result_json, run_experiment
from devnet.network import DevnetError, load, status_rows, stop_all
from devnet.report import write_report

console = Console(soft_wrap=True)


def add_commands(commands: Any) -> None:
    devnet = commands.add_parser("devnet", help="run a local network of nodes and the trading experiment")
    sub = devnet.add_subparsers(dest="devnet_command", metavar="COMMAND", required=True)

    up = sub.add_parser("up", help="start N nodes, run R trading rounds, write the report")
    up.add_argument("--orgs", type=int, default=4, help="organizations, one node each (default 4)")
    up.add_argument("--task", default="digits", help="task (default digits)")
    up.add_argument("--rounds", type=int, default=10, help="trading rounds (default 10)")
    up.add_argument("--split", choices=["complementary", "iid"], default="complementary", help="how data is split (default complementary)")
    up.add_argument("--deduction", type=float, default=0.1,
                    help="fraction of other organizations' classes each keeps, complementary split (default 0.1)")
    up.add_argument("--seed", type=int, default=0, help="seed of the data split and initial weights (default 0)")
    up.add_argument("--no-align", action="store_true", help="merge without weight matching")
    up.add_argument("--dir", type=Path, default=Path("devnet-data"), help="folder for the nodes' data (default ./devnet-data)")
    up.add_argument("--report-dir", type=Path, help="folder for report.json, .md and .png (default DIR/report)")
    up.add_argument("--keep", action="store_true", help="leave the nodes running after the last round")
    up.add_argument("--agent", action="append", default=[], metavar="KEY=VALUE",
                    help="override an [agent] setting of every node, for example trade_every=3 (repeatable)")
    up.set_defaults(run=cmd_up)

    status = sub.add_parser("status", help="show the devnet's nodes")
    status.add_argument("--dir", type=Path, default=Path("devnet-data"), help="folder of the devnet (default ./devnet-data)")
    status.add_argument("--json", action="store_true", help="print JSON")
    status.set_defaults(run=cmd_status)

    logs = sub.add_parser("logs", help="print the end of a node's log")
    logs.add_argument("org", nargs="?", help="org-N (default: every node)")
    logs.add_argument("--dir", type=Path, default=Path("devnet-data"), help="folder of the devnet (default ./devnet-data)")
    logs.add_argument("--lines", type=int, default=40, help="lines per node (default 40)")
    logs.set_defaults(run=cmd_logs)

    down = sub.add_parser("down", help="stop every node process the devnet started")
    down.add_argument("--dir", type=Path, default=Path("devnet-data"), help="folder of the devnet (default ./devnet-data)")
    down.set_defaults(run=cmd_down)

    from devnet import sweep

    sweep.add_command(sub)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    from node.config import AgentSection

    defaults = AgentSection()
    overrides: dict[str, Any] = {}
    for item in items:
        key, separator, text = item.partition("=")
        if not separator or not hasattr(defaults, key):
            raise DevnetError(f"--agent {item!r} must be KEY=VALUE with KEY an [agent] setting")
        kind = type(getattr(defaults, key))
        try:
            if kind is bool:
                value: Any = text.lower() in ("1", "true", "yes")
            elif kind is list:
                value = [part for part in text.split(",") if part]
            else:
                value = kind(text)
        except ValueError:
            raise DevnetError(f"--agent {item!r}: {text!r} is not a {kind.__name__}") from None
        overrides[key] = value
    return overrides


def live_table(result: ExperimentResult) -> Table:
    settings = result.settings
    grid = Table(title=f"round {result.completed_rounds} of {settings.rounds}", header_style="bold")
    for column in ("org", "val acc", "test acc", "siloed", "bought", "sold", "spent", "earned"):
        grid.add_column(column, justify="right" if column != "org" else "left")
    if result.rounds:
        for org, row in zip(result.orgs, result.rounds[-1], strict=True):
            grid.add_row(
                org.name,
                "-" if row.validation_accuracy is None else f"{100 * row.validation_accuracy:.1f}%",
                f"{100 * row.test_accuracy:.1f}%",
                f"{100 * row.siloed_test_accuracy:.1f}%",
                str(row.bought),
                str(row.sold),
                str(row.spent),
                str(row.earned),
            )
    if result.centralized_curve and result.rounds:
        grid.caption = f"centralized reference {100 * result.centralized_curve[result.completed_rounds - 1]:.1f}%"
    return grid


def cmd_up(args: argparse.Namespace) -> int:
    if args.orgs < 2:
        raise DevnetError("--orgs must be at least 2: a market needs a buyer and a seller")
    if args.rounds < 1:
        raise DevnetError("--rounds must be at least 1")
    settings = ExperimentSettings(
        orgs=args.orgs, task=args.task, rounds=args.rounds, split=args.split, deduction=args.deduction,
        seed=args.seed, align=not args.no_align, dir=str(args.dir.absolute()),
        report_dir=str((args.report_dir or args.dir / "report").absolute()), agent=parse_overrides(args.agent),
    )
    # SIGTERM ends the run like Ctrl-C: nodes stopped, partial report written.
    signal.signal(signal.SIGTERM, _interrupt)
    console.print(f"Starting {args.orgs} nodes in {settings.dir} ({args.rounds} rounds of {args.task})")
    with Live(live_table(ExperimentResult(settings)), console=console, refresh_per_second=4, transient=False) as live:
        result = run_experiment(settings, on_round=lambda r: live.update(live_table(r)), keep=args.keep)
    console.print()
    report_dir = Path(settings.report_dir)
    paths = write_report(result_json(result), report_dir)
    console.print(f"Report: {paths[1]} (also report.json and report.png in {report_dir})")
    if result.status == "incomplete: interrupted":
        console.print("Interrupted; every node was stopped.")
        return 130
    if result.status != "complete":
        console.print(f"[red]Run {result.status}[/red]", highlight=False)
        return 1
    if not result.ledgers_consistent:
        console.print(f"[red]Ledgers inconsistent: {'; '.join(result.ledger_problems)}[/red]", highlight=False)
        return 1
    if args.keep:
        console.print(f"Nodes keep running; stop them with `pmarket devnet down --dir {args.dir}`")
    return 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt

def cmd_status(args: argparse.Namespace) -> int:
    rows = status_rows(load(args.dir))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    grid = Table(header_style="bold")
    for column in ("org", "PID", "running", "peers", "offers", "open deals", "balance"):
        grid.add_column(column)
    for row in rows:
        grid.add_row(row["name"], str(row["pid"]), "yes" if row["running"] else "[red]no[/red]",
                     str(row.get("peers", "-")), str(row.get("offers", "-")), str(row.get("deals_open", "-")),
                     str(row.get("balance", "-")))
    console.print(grid)
    if rows and not any(row["running"] for row in rows):
        console.print(f"No node of the devnet in {args.dir} is running: it was stopped, or every node exited. "
                      f"Start one with `pmarket devnet up --dir {args.dir}`; `pmarket devnet logs` shows the logs.",
                      soft_wrap=True)
        return 1
    for row in rows:
        if not row["running"]:
            console.print(f"{row['name']} is not running; its log is {row['log']}")
    return 0 if all(row["running"] for row in rows) else 1


def cmd_logs(args: argparse.Namespace) -> int:
    orgs = load(args.dir)
    chosen = [org for org in orgs if args.org in (None, org.name)]
    if not chosen:
        raise DevnetError(f"no node {args.org!r}; the devnet has {', '.join(org.name for org in orgs)}")
    for org in chosen:
        path = Path(org.log)
        console.print(f"[bold]== {org.name}: {path}[/bold]", highlight=False)
        if path.exists():
            lines = path.read_text(errors="replace").splitlines()[-args.lines :]
            sys.stdout.write("\n".join(lines) + "\n")
        else:
            console.print("(no log yet)")
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    for line in stop_all(load(args.dir)) or ["no devnet process was running"]:
        console.print(line)
    return 0
