"""Idle memory per node process, and the largest devnet that starts on this machine.

For N = 2, 4, 8, ... node processes (`pmarket node start`, configured as
`pmarket devnet up` configures its organizations: the digits task, one shard
each, no agent), the benchmark starts all N at once, waits until each replies
on its control socket, connects node i to node (i - 1) // 2 for every i > 0
(a binary tree, so no node needs more than three connections) and waits
until every node has a peer. After 10 s idle it reads each process's resident
set size (RSS) and proportional set size (PSS: shared pages divided among
the processes that map them), how much MemAvailable dropped per node, and
the CPU the nodes used while idle. Then it stops every process by its PID
and doubles N, until a start fails, the next size would need more than
MEMORY_SHARE of the memory available before any node started (counting the
larger of the drop and the PSS per node), or N reaches MAX_NODES. The share leaves room for
other work on a shared machine.

`pmarket devnet up` connects every pair instead, which takes N(N-1)/2 dials
one after another; the table shows how long one dial took.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from scripts.benchmarks.nodes import NodeProcess
from scripts.benchmarks.record import Result

MAX_NODES = 256
MEMORY_SHARE = 2 / 3
START_TIMEOUT_S = 300.0
IDLE_S = 10.0


def available_kib() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1])
    raise RuntimeError("/proc/meminfo has no MemAvailable line")


def sections(index: int, count: int) -> dict[str, dict[str, object]]:
    return {
        "task": {"name": "digits", "orgs": count, "index": index, "split": "iid", "deduction": 0.1, "seed": 0},
        "workers": {"device": "cpu"},
        "gossip": {"publish_interval_ms": 10, "sync_interval_s": 5.0},
    }


@dataclass
class SizeOutcome:
    """Outcome of starting `count` nodes; memory in KiB."""

    count: int
    ok: bool = False
    error: str = ""
    started_s: float = 0.0
    dial_s: float = 0.0
    rss_kib: float = 0.0
    rss_max_kib: float = 0.0
    pss_kib: float = 0.0
    idle_cpu: float = 0.0  # fraction of one core per node
    available_kib: int = 0
    drop_kib: float = 0.0  # fall of MemAvailable per node, start to idle


def try_size(root: Path, count: int) -> SizeOutcome:
    """Start `count` nodes, measure them idle, stop them all by PID."""
    nodes: list[NodeProcess] = []
    outcome = SizeOutcome(count)
    available_before = available_kib()
    began = time.monotonic()
    try:
        for index in range(count):
            nodes.append(NodeProcess(root / f"n{count}", f"org-{index}", sections(index, count)))
        deadline = began + START_TIMEOUT_S
        for node in nodes:
            node.wait_ready(timeout=max(1.0, deadline - time.monotonic()))

        def connect(index: int) -> float:
            started = time.monotonic()
            nodes[index].client.post("/v1/connect", {"address": nodes[(index - 1) // 2].address})
            return time.monotonic() - started

        with ThreadPoolExecutor(max_workers=8) as pool:
            dials = list(pool.map(connect, range(1, count)))
        while not all(node.client.get("/v1/peers") for node in nodes):
            if time.monotonic() > deadline:
                raise RuntimeError(f"not every node had a peer within {START_TIMEOUT_S:g} s")
            time.sleep(0.2)
        outcome.started_s = time.monotonic() - began
        outcome.dial_s = statistics.median(dials) if dials else 0.0

        cpu_before = [node.cpu_seconds() for node in nodes]
        time.sleep(IDLE_S)
        cpu_after = [node.cpu_seconds() for node in nodes]
        memory = [node.memory_kib() for node in nodes]
        outcome.rss_kib = statistics.median(m["rss"] for m in memory)
        outcome.rss_max_kib = max(m["rss"] for m in memory)
        outcome.pss_kib = statistics.median(m.get("pss", 0) for m in memory)
        outcome.idle_cpu = statistics.median(after - before for before, after in zip(cpu_before, cpu_after, strict=True)) / IDLE_S
        outcome.available_kib = available_kib()
        outcome.drop_kib = (available_before - outcome.available_kib) / count
        outcome.ok = True
    except (RuntimeError, OSError) as exc:
        outcome.error = str(exc)
    finally:
        for node in nodes:
            node.stop()
    return outcome


def main() -> Result:
    result = Result(
        name="scale",
        title="idle memory per node process and the largest devnet",
        columns=["node processes", "started", "seconds to start", "median dial s", "RSS per node MiB (median / max)",
                 "PSS per node MiB (median)", "MemAvailable drop per node MiB", "idle CPU per node (% of a core)",
                 "memory available after start GiB"],
    )
    started = time.monotonic()
    largest = 0
    stop_reason = f"reached the cap of {MAX_NODES} nodes"
    baseline_kib = available_kib()
    with tempfile.TemporaryDirectory(prefix="pmarket-scale-bench-") as folder:
        count = 2
        while count <= MAX_NODES:
            outcome = try_size(Path(folder), count)
            print(f"{count} nodes: {'started' if outcome.ok else 'failed: ' + outcome.error}", flush=True)
            if not outcome.ok:
                result.rows.append([count, f"no: {outcome.error}", "", "", "", "", "", "", ""])
                stop_reason = f"{count} nodes did not start"
                break
            largest = count
            result.rows.append([
                count, "yes", f"{outcome.started_s:.1f}", f"{outcome.dial_s:.2f}",
                f"{outcome.rss_kib / 1024:.0f} / {outcome.rss_max_kib / 1024:.0f}",
                f"{outcome.pss_kib / 1024:.0f}",
                f"{outcome.drop_kib / 1024:.0f}",
                f"{100 * outcome.idle_cpu:.1f}",
                f"{outcome.available_kib / 2**20:.1f}",
            ])
            needed_kib = 2 * count * max(outcome.drop_kib, outcome.pss_kib)
            if needed_kib > MEMORY_SHARE * baseline_kib:
                stop_reason = (
                    f"{2 * count} nodes would need about {needed_kib / 2**20:.1f} GiB, more than "
                    f"{MEMORY_SHARE:.0%} of the {baseline_kib / 2**20:.1f} GiB available before the first start"
                )
                break
            count *= 2
    result.notes.append(
        f"Largest devnet that started: {largest} node processes; the benchmark stopped because {stop_reason}. "
        "Start time runs from launching all processes at once until every node has a peer; the idle "
        f"figures cover {IDLE_S:g} s after that."
    )
    result.notes.append(f"The benchmark took {(time.monotonic() - started) / 60:.1f} minutes.")
    return result
