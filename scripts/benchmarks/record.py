"""Write benchmark results into docs/benchmarks.md, newest run first."""

from __future__ import annotations

import datetime
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGE = ROOT / "docs" / "benchmarks.md"
PREAMBLE = """# Benchmarks

Figures written by `./scripts/bench`. Each benchmark measures its subject
and its baseline side by side in the same run, because these machines are
noisy: compare the ratios and medians, not absolute numbers across runs.
Each section lists its runs newest first, with the machine and the command.
"""


@dataclass
class Result:
    """One benchmark run: a title, a table, and notes under it."""

    name: str
    title: str
    columns: Sequence[str]
    rows: list[Sequence[object]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def machine() -> str:
    cores = os.cpu_count() or 0
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    memory = ""
    try:
        with open("/proc/meminfo") as meminfo:
            kib = int(next(line.split()[1] for line in meminfo if line.startswith("MemTotal")))
        memory = f", {kib / 1024 / 1024:.0f} GiB"
    except (OSError, StopIteration, ValueError):
        pass
    return f"{cores} cores ({model}){memory}, Python {platform.python_version()}, {platform.system()} {platform.release()}"


def render(result: Result, command: str) -> str:
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"### {stamp}", "", f"Machine: {machine()}.", f"Command: `{command}`.", ""]
    lines.append("| " + " | ".join(result.columns) + " |")
    lines.append("| " + " | ".join("---" for _ in result.columns) + " |")
    for row in result.rows:
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    lines.append("")
    lines.extend(result.notes)
    if result.notes:
        lines.append("")
    return "\n".join(lines) + "\n"


def record(result: Result, command: str | None = None) -> None:
    """Insert this run at the top of its benchmark's section of the page."""
    command = command or "./scripts/bench " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    text = PAGE.read_text() if PAGE.exists() else PREAMBLE
    heading = f"## {result.name}: {result.title}\n\n"
    block = render(result, command)
    marker = f"## {result.name}:"
    if marker in text:
        start = text.index(marker)
        body_start = text.index("\n\n", start) + 2
        text = text[:start] + heading + block + "\n" + text[body_start:]
    else:
        text = text.rstrip("\n") + "\n\n" + heading + block
    PAGE.write_text(text)


def timed(function: Callable[[], object], repeat: int) -> float:
    """Seconds per call of `function`, over `repeat` calls."""
    start = time.perf_counter()
    for _ in range(repeat):
        function()
    return (time.perf_counter() - start) / repeat


def interleaved(functions: dict[str, Callable[[], object]], repeat: int, rounds: int) -> dict[str, list[float]]:
    """Time each function in turn, `rounds` times, so noise hits all alike."""
    samples: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(rounds):
        for name, function in functions.items():
            samples[name].append(timed(function, repeat))
    return samples


def median(values: Sequence[float]) -> float:
    return statistics.median(values)
