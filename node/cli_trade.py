"""CLI commands for models, offers, purchases, deals and the ledger."""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path
from typing import Any

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from node.cli import (
    CommandError,
    check_task_name,
    client_for,
    console,
    plural,
    print_json,
    short_peer,
    table,
)
from node.client import ControlError

TERMINAL_STATES = {"paid", "refused", "rejected", "failed", "expired"}
DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")
UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> float:
    """Seconds in a duration such as 90, 90s, 30m, 2h or 1d."""
    match = DURATION.match(text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration; use a number with s, m, h or d (for example 30m)")
    return float(match.group(1)) * UNITS[match.group(2)]


def add_commands(commands: Any, data: argparse.ArgumentParser, as_json: argparse.ArgumentParser) -> None:
    model = commands.add_parser("model", help="import, export, create and train local models")
    model_commands = model.add_subparsers(dest="model_command", metavar="COMMAND", required=True)
    imported = model_commands.add_parser("import", parents=[data, as_json], help="import a safetensors file as a model")
    imported.add_argument("file", type=Path, help="a .safetensors file")
    imported.add_argument("--name", required=True, help="model name (letters, digits, -, _ and .)")
    imported.add_argument("--task", default="",
                          help="task the weights are for, such as digits; they must fit the task's model "
                          "(default: none, the weights are not checked)")
    imported.set_defaults(run=cmd_model_import)
    exported = model_commands.add_parser("export", parents=[data, as_json], help="write a model version to a file")
    exported.add_argument("model", metavar="NAME[@VERSION]")
    exported.add_argument("file", type=Path)
    exported.add_argument("--overwrite", action="store_true", help="replace an existing file")
    exported.set_defaults(run=cmd_model_export)
    created = model_commands.add_parser("init", parents=[data, as_json], help="create a model of this node's task")
    created.add_argument("name")
    created.add_argument("--epochs", type=int, default=0, help="epochs to train on this node's shard first (default 0)")
    created.add_argument("--seed", type=int, help="initialisation seed (default: from [task] seed and index)")
    created.set_defaults(run=cmd_model_init)
    trained = model_commands.add_parser("train", parents=[data, as_json], help="train a model on this node's shard")
    trained.add_argument("model", metavar="NAME[@VERSION]")
    trained.add_argument("--epochs", type=int, default=1, help="epochs to train (default 1)")
    trained.set_defaults(run=cmd_model_train)

    models = commands.add_parser("models", parents=[data, as_json], help="list local models and versions")
    models.set_defaults(run=cmd_models)

    offer = commands.add_parser("offer", help="publish offers")
    offer_commands = offer.add_subparsers(dest="offer_command", metavar="COMMAND", required=True)
    publish = offer_commands.add_parser("publish", parents=[data, as_json], help="publish a signed offer for a model")
    publish.add_argument("model", metavar="NAME[@VERSION]")
    publish.add_argument("--price", type=int, required=True, help="ask price, in the smallest unit of money")
    publish.add_argument("--reserve", type=int, help="least this node sells for (default: [market] reserve_fraction of the price)")
    publish.add_argument("--tensors", nargs="+", default=[], metavar="PATTERN",
                         help="offer only tensors whose names match these patterns (for example 'hidden1.*')")
    publish.add_argument("--expires", type=parse_duration, default=3600.0, metavar="DURATION",
                         help="offer lifetime, such as 30m, 2h or 1d (default 1h)")
    publish.add_argument("--terms", default="delivery", metavar="delivery|gain:MIN",
                         help="pay on delivery, or only when the buyer's gain reaches MIN (for example gain:0.01)")
    publish.set_defaults(run=cmd_offer_publish)

    buy = commands.add_parser("buy", parents=[data, as_json], help="buy an offer: negotiate, fetch, try, merge, pay")
    buy.add_argument("offer", metavar="OFFER_ID", help="offer ID or a unique prefix of it (see `pmarket offers`)")
    buy.add_argument("--max-price", type=int, help="most this node pays (default: the ask)")
    buy.add_argument("--no-wait", action="store_true", help="return once the deal is agreed")
    buy.set_defaults(run=cmd_buy)

    deals = commands.add_parser("deals", parents=[data, as_json], help="list deals as buyer and seller")
    deals.set_defaults(run=cmd_deals)

    ledger = commands.add_parser("ledger", parents=[data, as_json], help="show ledger entries and balances")
    ledger.set_defaults(run=cmd_ledger)


def _print_model(version: dict[str, Any], verb: str) -> None:
    console.print(f"{verb} {version['ref']} ({version['total_bytes']:,} bytes, family {version['family'][:12]})")


def cmd_model_import(args: argparse.Namespace) -> int:
    if args.task:
        check_task_name(args.task, "--task")
    version = client_for(args).post(
        "/v1/models/import", {"path": str(args.file.resolve()), "name": args.name, "task": args.task}
    )
    print_json(version) if args.json else _print_model(version, "Imported")
    return 0


def cmd_model_export(args: argparse.Namespace) -> int:
    body = {"model": args.model, "path": str(args.file.resolve()), "overwrite": args.overwrite}
    try:
        result = client_for(args).post("/v1/models/export", body)
    except ControlError as exc:
        if exc.status != 409:
            raise
        raise CommandError(f"{exc}; choose another path or pass --overwrite") from None
    print_json(result) if args.json else console.print(f"Wrote {result['model']} to {result['path']}")
    return 0


def cmd_model_init(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name, "epochs": args.epochs}
    if args.seed is not None:
        body["seed"] = args.seed
    version = client_for(args).post("/v1/models/init", body, timeout=600.0)
    print_json(version) if args.json else _print_model(version, "Created")
    return 0


def cmd_model_train(args: argparse.Namespace) -> int:
    version = client_for(args).post("/v1/models/train", {"model": args.model, "epochs": args.epochs}, timeout=3600.0)
    if args.json:
        print_json(version)
    else:
        accuracy = version["metrics"].get("val_accuracy")
        suffix = f", validation accuracy {accuracy:.3f}" if accuracy is not None else ""
        console.print(f"Trained {version['ref']}{suffix}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    versions = client_for(args).get("/v1/models")
    if args.json:
        print_json(versions)
        return 0
    rows = []
    for v in versions:
        metrics = v["metrics"]
        accuracy = f"{metrics['val_accuracy']:.3f}" if "val_accuracy" in metrics else ""
        rows.append((v["ref"], v["task"] or "-", v["source"], f"{v['total_bytes']:,}", v["family"][:12], accuracy))
    table(plural(len(versions), "model version"), ["model", "task", "source", "bytes", "family", "val acc"], rows)
    return 0


def cmd_offer_publish(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {
        "model": args.model,
        "price": args.price,
        "tensors": args.tensors,
        "expires_s": args.expires,
        "terms": args.terms,
    }
    if args.reserve is not None:
        body["reserve"] = args.reserve
    offer = client_for(args).post("/v1/offers", body)
    if args.json:
        print_json(offer)
    else:
        console.print(f"Published offer {offer['offer_id']}")
        console.print(f"  {offer['offer_key']} for {offer['price']}, {offer['total_bytes']:,} bytes, expires in {args.expires:g} s")
        console.print(f"  Buy it from another node with: pmarket buy {offer['offer_id'][:12]}")
    return 0


def cmd_buy(args: argparse.Namespace) -> int:
    client = client_for(args)
    body: dict[str, Any] = {"offer": args.offer}
    if args.max_price is not None:
        body["max_price"] = args.max_price
    deal = client.post("/v1/buy", body, timeout=120.0)
    if not args.json:
        console.print(f"Deal {deal['deal_id'][:16]} agreed with {short_peer(deal['counterparty'])} at price {deal['price']}")
    if args.no_wait:
        if args.json:
            print_json(deal)
        return 0
    deal = _follow(client, deal, quiet=args.json)
    if args.json:
        print_json(deal)
    else:
        _print_outcome(deal)
    return 0 if deal["state"] in ("paid", "refused") else 1


def _follow(client: Any, deal: dict[str, Any], *, quiet: bool) -> dict[str, Any]:
    """Poll the deal until it ends, with a progress bar for the transfer."""
    columns = (TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, disable=quiet, transient=False) as progress:
        bar = progress.add_task("transfer", total=deal["total_bytes"])
        while deal["state"] not in TERMINAL_STATES:
            time.sleep(0.2)
            deal = client.get(f"/v1/deals/{deal['deal_id']}")
            done = deal["total_bytes"] if deal["state"] not in ("agreed", "transferring") else deal["bytes_done"]
            progress.update(bar, completed=done, description=deal["state"])
    return deal


def _print_outcome(deal: dict[str, Any]) -> None:
    gain = deal.get("gain_ppm")
    if gain is None:
        gain_text = "gain not measured"
    elif gain >= 0:
        gain_text = f"validation loss {gain / 1e4:.2f}% lower"
    else:
        gain_text = f"validation loss {-gain / 1e4:.2f}% higher"
    state = deal["state"]
    if state == "paid":
        model = f"model {deal['model']}" if deal["model"] else "not merged, the local model is unchanged"
        console.print(f"Paid {deal['price']} ({gain_text}); {model}")
    elif state == "refused":
        if deal["reason"] == "gain_below_minimum":
            minimum = deal.get("min_gain_ppm", 0) / 1e4
            explanation = f"the measured gain is below the offer's minimum of {minimum:g}%"
        else:
            explanation = " ".join(part for part in (deal["reason"], deal["detail"]) if part)
        console.print(f"Refused to pay ({gain_text}): {explanation}; the local model is unchanged")
    else:
        raise CommandError(f"deal {deal['deal_id'][:16]} ended {state}: {deal['reason']} {deal['detail']}".rstrip())


def cmd_deals(args: argparse.Namespace) -> int:
    deals = client_for(args).get("/v1/deals")
    if args.json:
        print_json(deals)
        return 0
    rows = []
    for d in deals:
        gain = _gain_text(d["gain_ppm"])
        rows.append((d["deal_id"][:12], d["role"], d["state"], short_peer(d["counterparty"]), d["price"], gain, d["reason"], d["model"]))
    table(plural(len(deals), "deal"), ["deal", "role", "state", "counterparty", "price", "gain", "reason", "model"], rows)
    return 0


def cmd_ledger(args: argparse.Namespace) -> int:
    ledger = client_for(args).get("/v1/ledger")
    if args.json:
        print_json(ledger)
        return 0
    rows = []
    for entry in ledger["entries"]:
        rows.append((entry["index"], entry["deal_id"][:12], short_peer(entry["seller"]), short_peer(entry["buyer"]),
                     entry["outcome"], entry["amount"], _gain_text(entry["gain_ppm"]), entry["entry_hash"][:12]))
    table(f"{plural(len(rows), 'ledger entry', 'ledger entries')} (chain {ledger['chain']})",
          ["#", "deal", "seller", "buyer", "outcome", "amount", "gain", "hash"], rows)
    balances = [(peer, amount) for peer, amount in sorted(ledger["balances"].items())]
    table("balance with each peer (positive: the peer owes this node)", ["peer", "balance"], balances)
    console.print(f"Earned {ledger['earned']}, spent {ledger['spent']}")
    return 0


def _gain_text(gain_ppm: int | None) -> str:
    """Format a gain in parts per million as a percentage; None means the buyer measured none."""
    return "not measured" if gain_ppm is None else f"{gain_ppm / 1e4:+.2f}%"
