"""`pmarket devnet sweep`: the trading experiment over grids of settings.

Each grid varies one setting around the defaults (4 organizations, digits,
complementary split with deduction 0.1, 10 rounds, trading every round from
round 0, alignment on, Nash pricing, collaborative). Every point is a full
devnet run with real node processes; its report lands in
``REPORT_DIR/<grid>/<point>/``. Each grid also gets a table and a plot, and
all grids together a summary page.

Trading counts as worth it at a point when the organizations gained at least
half a point of test accuracy on average over training alone; the summary
also shows what was paid, so a reader can weigh credits against accuracy.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console

from devnet.experiment import ExperimentSettings, result_json, run_experiment
from devnet.report import write_report

console = Console(soft_wrap=True)
WORTH_IT_POINTS = 0.5


@dataclass(frozen=True)
class Point:
    label: str
    changes: dict[str, Any]  # ExperimentSettings fields; "agent" merges into the agent overrides


GRIDS: dict[str, tuple[str, list[Point]]] = {
    "frequency": (
        "trading every 1, 3, 5 or 10 rounds",
        [Point(f"every {k}", {"agent": {"trade_every": k}}) for k in (1, 3, 5, 10)],
    ),
    "start": (
        "first trading round",
        [Point(f"from round {r}", {"agent": {"trade_start_round": r}}) for r in (0, 3, 6, 9)],
    ),
    "deduction": (
        "share of other organizations' classes each one keeps",
        [Point(f"D={d}", {"deduction": d}) for d in (0.1, 0.2, 0.4, 0.6, 0.8)],
    ),
    "alignment": (
        "weight matching before merging",
        [Point("aligned", {"align": True}), Point("not aligned", {"align": False})],
    ),
    "orgs": ("number of organizations", [Point(f"{n} orgs", {"orgs": n}) for n in (2, 4, 8)]),
    "competition": (
        "competitors price in the buyer's gain, or refuse to sell",
        [
            Point("collaborative", {}),
            Point("competitive, premium", {"compete": True, "agent": {"competitor_policy": "premium"}}),
            Point("competitive, refuse", {"compete": True, "agent": {"competitor_policy": "refuse"}}),
        ],
    ),
    "pricing": (
        "ask policy and bargaining",
        [
            Point("fixed ask, Nash split", {"pricing": "nash"}),
            Point("fixed ask, take it or leave it", {"pricing": "fixed"}),
            Point("cost-based ask", {"agent": {"ask_policy": "cost", "cost_per_mib": 400.0}}),
            Point("adaptive ask", {"agent": {"ask_policy": "adaptive"}}),
        ],
    ),
}


def settings_for(point: Point, *, seed: int, rounds: int, folder: Path) -> ExperimentSettings:
    changes = dict(point.changes)
    agent = changes.pop("agent", {})
    base = ExperimentSettings(seed=seed, rounds=rounds, dir=str(folder / "nodes"), report_dir=str(folder))
    return dataclasses.replace(base, agent=agent, **changes)


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def summarize(report: dict[str, Any]) -> dict[str, Any]:
    orgs = report["orgs"]
    gains = [
        100 * (o["trading_accuracy"] - o["siloed_accuracy"])
        for o in orgs
        if o["trading_accuracy"] is not None and o["siloed_accuracy"] is not None
    ]
    paid = [t for t in report["trades"] if t.get("state") == "paid"]
    return {
        "status": report["status"],
        "siloed": _mean([o["siloed_accuracy"] for o in orgs]),
        "trading": _mean([o["trading_accuracy"] for o in orgs]),
        "centralized": report["centralized_accuracy"],
        "gain_points": statistics.mean(gains) if gains else None,
        "min_gain_points": min(gains) if gains else None,
        "orgs_gaining": sum(1 for g in gains if g > 0),
        "orgs": len(orgs),
        "trades_paid": len(paid),
        "credits_paid": sum(t.get("price") or 0 for t in paid),
        "net_credits": {o["name"]: o["earned"] - o["spent"] for o in orgs},
        "ledgers_consistent": report["ledgers_consistent"],
    }


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def grid_table(grid: str, rows: list[tuple[Point, dict[str, Any]]]) -> str:
    description = GRIDS[grid][0]
    lines = [
        f"### {grid}: {description}",
        "",
        "| setting | siloed % | trading % | centralized % | gain (points) | worst org (points) | orgs gaining | trades paid | credits paid | worth it |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for point, summary in rows:
        gain = summary["gain_points"]
        worst = summary["min_gain_points"]
        worth = "yes" if gain is not None and gain >= WORTH_IT_POINTS else "no"
        if not summary["status"].startswith("complete"):
            worth = summary["status"]
        lines.append(
            f"| {point.label} | {_percent(summary['siloed'])} | {_percent(summary['trading'])} | "
            f"{_percent(summary['centralized'])} | {'-' if gain is None else f'{gain:+.1f}'} | "
            f"{'-' if worst is None else f'{worst:+.1f}'} | {summary['orgs_gaining']} of {summary['orgs']} | "
            f"{summary['trades_paid']} | {summary['credits_paid']} | {worth} |"
        )
    lines.append("")
    return "\n".join(lines)


def grid_plot(grid: str, rows: list[tuple[Point, dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [point.label for point, _ in rows]
    gains = [summary["gain_points"] or 0.0 for _, summary in rows]
    paid = [summary["credits_paid"] for _, summary in rows]
    figure, left = plt.subplots(figsize=(8, 4), dpi=110)
    left.bar(labels, gains, color="tab:blue", alpha=0.8)
    left.axhline(WORTH_IT_POINTS, color="gray", linestyle=":", linewidth=1)
    left.set_ylabel("mean test-accuracy gain over siloed (points)", color="tab:blue")
    right = left.twinx()
    right.plot(labels, paid, color="tab:red", marker="o")
    right.set_ylabel("credits paid in all", color="tab:red")
    left.set_title(f"{grid}: {GRIDS[grid][0]}")
    left.tick_params(axis="x", labelrotation=20)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def run_sweep(grids: Sequence[str], *, seeds: Sequence[int], rounds: int, report_dir: Path, docs: Path | None) -> dict[str, Any]:
    results: dict[str, list[tuple[Point, dict[str, Any]]]] = {}
    for grid in grids:
        rows = []
        for index, point in enumerate(GRIDS[grid][1]):
            summaries = []
            for seed in seeds:
                folder = report_dir / grid / f"{index}-seed{seed}"
                settings = settings_for(point, seed=seed, rounds=rounds, folder=folder)
                console.print(f"[bold]{grid}[/bold]: {point.label}, seed {seed} ...", highlight=False)
                result = run_experiment(settings)
                report = result_json(result)
                write_report(report, folder)
                summary = summarize(report)
                summaries.append(summary)
                console.print(
                    f"  {summary['status']}: gain {summary['gain_points'] if summary['gain_points'] is None else round(summary['gain_points'], 2)} "
                    f"points, {summary['trades_paid']} trades, {result.seconds:.0f} s",
                    highlight=False,
                )
            rows.append((point, _mean_summary(summaries)))
        results[grid] = rows
        (report_dir / grid).mkdir(parents=True, exist_ok=True)
        (report_dir / grid / "table.md").write_text(grid_table(grid, rows))
        grid_plot(grid, rows, report_dir / grid / "plot.png")
    # Grids run earlier into the same folder stay in sweep.json and the page.
    saved = report_dir / "sweep.json"
    data: dict[str, Any] = json.loads(saved.read_text()) if saved.exists() else {}
    data.update({grid: [{"setting": p.label, **s} for p, s in rows] for grid, rows in results.items()})
    saved.write_text(json.dumps(data, indent=2))
    for grid, rows in data.items():
        if grid in GRIDS and grid not in results:
            points = [(_point(grid, row["setting"]), row) for row in rows]
            (report_dir / grid).mkdir(parents=True, exist_ok=True)
            (report_dir / grid / "table.md").write_text(grid_table(grid, points))
            grid_plot(grid, points, report_dir / grid / "plot.png")
    if docs is not None:
        everything = {
            grid: [(_point(grid, row["setting"]), row) for row in rows] for grid, rows in data.items() if grid in GRIDS
        }
        ordered = {grid: everything[grid] for grid in GRIDS if grid in everything}
        write_summary_page(docs, ordered, seeds=seeds, rounds=rounds, report_dir=report_dir)
    return data


def _point(grid: str, label: str) -> Point:
    for point in GRIDS[grid][1]:
        if point.label == label:
            return point
    return Point(label, {})


def _mean_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    if len(summaries) == 1:
        return summaries[0]
    complete = [s for s in summaries if s["status"] == "complete"]
    merged = dict(summaries[0])
    for key in ("siloed", "trading", "centralized", "gain_points"):
        values = [s[key] for s in complete if s[key] is not None]
        merged[key] = statistics.mean(values) if values else None
    merged["min_gain_points"] = min((s["min_gain_points"] for s in complete if s["min_gain_points"] is not None), default=None)
    merged["orgs_gaining"] = sum(s["orgs_gaining"] for s in complete)
    merged["orgs"] = sum(s["orgs"] for s in complete)
    merged["trades_paid"] = sum(s["trades_paid"] for s in complete)
    merged["credits_paid"] = sum(s["credits_paid"] for s in complete)
    merged["status"] = "complete" if len(complete) == len(summaries) else f"{len(complete)} of {len(summaries)} runs complete"
    return merged


def write_summary_page(
    path: Path, results: dict[str, list[tuple[Point, dict[str, Any]]]], *, seeds: Sequence[int], rounds: int, report_dir: Path
) -> None:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    seeds_text = ", ".join(str(s) for s in seeds)
    lines = [
        "# When trading pays: the devnet sweep",
        "",
        f"Written by `pmarket devnet sweep --seeds {' '.join(str(s) for s in seeds)} --rounds {rounds}` "
        f"(grid by grid: {', '.join(results)}), last run on {stamp}, from real devnet runs (node processes on 127.0.0.1, the full trade path). "
        f"Seeds: {seeds_text}. Each run's report.json, report.md and report.png are written under the sweep's "
        "report folder (`reports/sweep/<grid>/` by default).",
        "",
        "Each grid changes one setting of the default run: 4 organizations on the digits task, a complementary split "
        "with deduction 0.1, 10 rounds, every organization trading every round from round 0 with weight matching on, "
        "fixed asks of 20 credits with a Nash split of the surplus above a reserve of 10, and no competitors. "
        "Accuracies are on the held-out test split; gains are trading minus siloed, in points, averaged over "
        f"organizations (and seeds). A setting counts as worth it when the mean gain is at least {WORTH_IT_POINTS} points.",
        "",
    ]
    for grid, rows in results.items():
        lines.append(grid_table(grid, rows))
        lines.append(_findings(grid, rows))
        lines.append("")
    path.write_text("\n".join(lines))


def _findings(grid: str, rows: list[tuple[Point, dict[str, Any]]]) -> str:
    """Summarize a grid in one or two sentences: who gained, by how much, where trading stops paying."""
    complete = [(p, s) for p, s in rows if s["gain_points"] is not None]
    if not complete:
        return "No run of this grid completed."
    best = max(complete, key=lambda ps: ps[1]["gain_points"])
    worst = min(complete, key=lambda ps: ps[1]["gain_points"])
    not_worth = [p.label for p, s in complete if s["gain_points"] < WORTH_IT_POINTS]
    losers = [p.label for p, s in complete if s["min_gain_points"] is not None and s["min_gain_points"] < 0]
    sentence = (
        f"Largest mean gain: {best[0].label} ({best[1]['gain_points']:+.1f} points, {best[1]['credits_paid']} credits paid); "
        f"smallest: {worst[0].label} ({worst[1]['gain_points']:+.1f} points)."
    )
    sentence += f" Not worth it: {', '.join(not_worth)}." if not_worth else " Trading was worth it at every setting."
    if losers:
        sentence += f" Some organization ended below its siloed accuracy at: {', '.join(losers)}."
    balances = []
    for point, summary in complete:
        nets = list(summary.get("net_credits", {}).values())
        if nets and summary["trades_paid"]:
            balances.append(f"{point.label} {min(nets):+d} to {max(nets):+d}")
    if balances:
        sentence += " Net credits per organization, earned minus spent, from lowest to highest: " + "; ".join(balances) + "."
    return sentence


def add_command(commands: Any) -> None:
    sweep = commands.add_parser("sweep", help="run the trading experiment over grids of settings")
    sweep.add_argument("--grid", action="append", choices=sorted(GRIDS), help="grid to run (repeatable; default all)")
    sweep.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds per point (default 0)")
    sweep.add_argument("--rounds", type=int, default=10, help="rounds per run (default 10)")
    sweep.add_argument("--report-dir", type=Path, default=Path("reports/sweep"), help="folder for per-run reports and grid tables (default ./reports/sweep)")
    sweep.add_argument("--docs", type=Path, help="also write the summary page here (for example docs/experiments.md)")
    sweep.add_argument("--render", action="store_true",
                       help="run nothing; rewrite the tables, plots and page from REPORT_DIR/sweep.json")
    sweep.set_defaults(run=cmd_sweep)


def cmd_sweep(args: argparse.Namespace) -> int:
    grids = [] if args.render else (args.grid or list(GRIDS))
    run_sweep(grids, seeds=args.seeds, rounds=args.rounds, report_dir=args.report_dir.absolute(), docs=args.docs)
    console.print(f"Tables and plots in {args.report_dir}/<grid>/" + (f"; summary in {args.docs}" if args.docs else ""))
    return 0
