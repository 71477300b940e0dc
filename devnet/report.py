"""report.json, report.md and report.png of a devnet run."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], directory: Path) -> list[Path]:
    """Write the three report files and return their paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = [directory / "report.json", directory / "report.md", directory / "report.png"]
    _atomic_text(paths[0], json.dumps(report, indent=2, sort_keys=True) + "\n")
    _atomic_text(paths[1], markdown(report))
    plot(report, paths[2])
    return paths


def _atomic_text(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def markdown(report: dict[str, Any]) -> str:
    settings = report["settings"]
    lines = [
        "# Devnet report",
        "",
        f"Status: {report['status']}. {report['completed_rounds']} of {report['rounds']} rounds, "
        f"{len(report['orgs'])} organizations, task {settings['task']}, {settings['split']} split with deduction "
        f"{settings['deduction']}, seed {settings['seed']}, {report['seconds']} s.",
        "",
        "Test accuracy on the held-out test split (no organization trains or validates on it):",
        "",
        "| organization | siloed | trading | gain (points) | bought | sold | spent | earned |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    gains = []
    for org in report["orgs"]:
        gain = None
        if org["trading_accuracy"] is not None and org["siloed_accuracy"] is not None:
            gain = 100 * (org["trading_accuracy"] - org["siloed_accuracy"])
            gains.append(gain)
        lines.append(
            f"| {org['name']} | {_percent(org['siloed_accuracy'])} | {_percent(org['trading_accuracy'])} | "
            f"{'-' if gain is None else f'{gain:+.1f}'} | {org['bought']} | {org['sold']} | {org['spent']} | {org['earned']} |"
        )
    trading = [org["trading_accuracy"] for org in report["orgs"] if org["trading_accuracy"] is not None]
    lines += [
        "",
        f"Centralized reference (one model on all shards): {_percent(report['centralized_accuracy'])}.",
    ]
    if trading and gains:
        mean_trading = sum(trading) / len(trading)
        lines.append(
            f"Mean trading accuracy {_percent(mean_trading)}, mean gain over siloed {sum(gains) / len(gains):+.1f} points."
        )
    consistent = report["ledgers_consistent"]
    lines += [
        "",
        f"Ledgers consistent: {'yes' if consistent else 'no' if consistent is False else 'not checked'}"
        + (f" ({'; '.join(report['ledger_problems'])})" if report["ledger_problems"] else "")
        + f". Trades attempted: {len(report['trades'])}, paid: {sum(1 for t in report['trades'] if t.get('state') == 'paid')}.",
        "",
        "![accuracy per round](report.png)",
        "",
    ]
    return "\n".join(lines)


def plot(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5), dpi=110)
    colors = plt.get_cmap("tab10")
    for index, org in enumerate(report["orgs"]):
        rounds = range(1, len(org["trading_curve"]) + 1)
        color = colors(index % 10)
        axes.plot(rounds, [100 * a for a in org["trading_curve"]], color=color, marker="o", label=f"{org['name']} trading")
        axes.plot(rounds, [100 * a for a in org["siloed_curve"]], color=color, linestyle="--", label=f"{org['name']} siloed")
    if report["centralized_curve"]:
        rounds = range(1, len(report["centralized_curve"]) + 1)
        axes.plot(rounds, [100 * a for a in report["centralized_curve"]], color="black", linewidth=2, label="centralized")
    axes.set_xlabel("round")
    axes.set_ylabel("test accuracy (%)")
    settings = report["settings"]
    axes.set_title(f"{settings['task']}: {len(report['orgs'])} organizations, {settings['split']} split, seed {settings['seed']}")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=7, ncol=2, loc="lower right")
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary)
    plt.close(figure)
    os.replace(temporary, path)
