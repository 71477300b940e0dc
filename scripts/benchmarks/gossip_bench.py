"""Offer propagation over GossipSub between 16 node processes on loopback.

Each run starts 16 `pmarket node start` processes on 127.0.0.1, each with
its own data directory, joined as a random mesh: every node bootstraps to 2
or 3 random earlier nodes, drawn from a fixed seed so runs are repeatable.
Once every node is connected to its bootstrap peers and GossipSub has had
three heartbeats to form its mesh, every node publishes one offer for a
small imported safetensors file. Latency is an offer's `received_ms` on
the receiving node minus its `created_ms`, set by its seller, both read
from each node's `GET /v1/offers` and both from this machine's clock. The
`offers_accepted` counts in each node's status tell which path delivered
each offer first: gossip or the catch-up pull of the sync protocol.

Two runs, side by side:

- paced (the subject): the node's default `[gossip] publish_interval_ms`
  and one node publishing every 50 to 100 ms, as organizations publishing
  independently would;
- burst (the baseline): `publish_interval_ms = 0` and all 16 nodes
  publishing at the same moment. What this run loses to GossipSub shows up
  as offers delivered late by the catch-up pull instead.

`publish_interval_ms` spaces the publishes of one node, so with one offer
per node the two runs differ only in when the nodes publish.

Models are imported with the `pmarket model import` command. Offers are
published with the control API request that `pmarket offer publish m
--price 10` sends, made from this process, because 16 CLI processes
starting within one second would compete with the nodes for the CPU and
blur the pacing.

Goals for the paced run: every (offer, node) pair delivered, p99 latency
under 1 s, and an idle node (connected, 16 offers in its book, no trades)
under 150 MiB of resident memory.
"""

from __future__ import annotations

import concurrent.futures
import math
import os
import random
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import IO, Any

from node.client import ControlClient, ControlError
from node.datadir import DataDir, load_identity
from protocol.identity import peer_id_to_text
from scripts.benchmarks.record import ROOT, Result

NODES = 16
SEED = 1616
HEARTBEAT_S = 1.0  # the node's default [gossip] heartbeat_s
MESH_HEARTBEATS = 3
PACE_S = (0.050, 0.100)
# The node's default sync_interval_s is 30 s, randomised by up to 20%, so
# every node makes at least one periodic catch-up pull within 40 s.
DELIVERY_DEADLINE_S = 40.0
START_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
PRICE = 10

GOAL_DELIVERED = 1.0
GOAL_P99_MS = 1000.0
GOAL_RSS_MIB = 150.0


class BenchmarkError(Exception):
    """A node failed to start, connect or respond; the message names the node and its log."""


@dataclass(frozen=True)
class Scenario:
    name: str
    label: str
    publish_interval_ms: int | None  # None keeps the node's default
    paced: bool


SCENARIOS = [
    Scenario("paced", "paced (default publish_interval_ms, one node every 50-100 ms)", None, True),
    Scenario("burst", "baseline: publish_interval_ms = 0, all nodes at once", 0, False),
]


@dataclass
class Outcome:
    """Measurements of one run of 16 nodes."""

    scenario: Scenario
    pairs: int  # (offer, node) pairs that should be delivered: offers times other nodes
    latencies_ms: list[int] = field(default_factory=list)  # one per delivered pair
    by_gossip: int = 0
    by_pull: int = 0
    rss_mib: list[float] = field(default_factory=list)  # one per node, after delivery
    cpu_s: float = 0.0  # CPU time of all nodes together, from just before publishing until delivery
    load: str = ""  # 1-minute load average just before publishing
    seconds: float = 0.0

    @property
    def delivered(self) -> int:
        return len(self.latencies_ms)


# Node processes -------------------------------------------------------------


@dataclass
class NodeProcess:
    """One `pmarket node start` process, always stopped by its PID."""

    index: int
    data_dir: Path
    port: int
    peer_id: str = ""
    bootstrap: list[int] = field(default_factory=list)
    process: subprocess.Popen[bytes] | None = None
    log: IO[bytes] | None = None

    @property
    def address(self) -> str:
        return f"/ip4/127.0.0.1/tcp/{self.port}/p2p/{self.peer_id}"

    @property
    def client(self) -> ControlClient:
        return ControlClient(DataDir(self.data_dir), timeout=10.0)

    def start(self, addresses: Sequence[str]) -> None:
        command = [*PMARKET, "node", "start", "--data-dir", str(self.data_dir),
                   "--listen", f"/ip4/127.0.0.1/tcp/{self.port}"]  # fmt: skip
        for address in addresses:
            command += ["--bootstrap", address]
        self.log = open(self.data_dir / "stdout.log", "wb")  # noqa: SIM115
        self.process = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT, env=_env())

    def check_running(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise BenchmarkError(
                f"node {self.index} (PID {self.process.pid}) exited with status {self.process.returncode}; "
                f"see {self.data_dir / 'stdout.log'}:\n{self.log_tail()}"
            )

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = (self.data_dir / "stdout.log").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def cpu_s(self) -> float:
        """CPU time (user plus system) of the process so far, from /proc/PID/stat."""
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/stat") as stat:
            # The fields after the command name, which is in brackets and may contain spaces.
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def rss_mib(self) -> float:
        """Resident memory of the process, from VmRSS in /proc/PID/status."""
        assert self.process is not None
        with open(f"/proc/{self.process.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise BenchmarkError(f"/proc/{self.process.pid}/status of node {self.index} has no VmRSS line")


PMARKET = [sys.executable, "-m", "node.cli"]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PMARKET_DATA_DIR", None)
    return env


def stop_all(nodes: Sequence[NodeProcess]) -> None:
    """Send SIGTERM to every node still running, then SIGKILL to any left after STOP_TIMEOUT_S."""
    running = [n.process for n in nodes if n.process is not None and n.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            print(f"Node PID {process.pid} did not stop on SIGTERM; killing it", file=sys.stderr)
            process.kill()
            process.wait(timeout=STOP_TIMEOUT_S)
    for node in nodes:
        if node.log is not None:
            node.log.close()


def free_ports(count: int) -> list[int]:
    """Distinct free TCP ports on 127.0.0.1, from the kernel's choice for port 0.

    The ports are free when this returns. Another program could take one
    before a node binds it, and that node then fails to start.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def poll_until(what: str, timeout: float, check: Callable[[], bool], nodes: Sequence[NodeProcess]) -> float:
    """Call `check` every 0.2 s until it returns True; return the seconds it took."""
    started = time.monotonic()
    while not check():
        for node in nodes:
            node.check_running()
        if time.monotonic() - started > timeout:
            raise BenchmarkError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)
    return time.monotonic() - started


def run_parallel(function: Callable[[NodeProcess], Any], nodes: Sequence[NodeProcess]) -> list[Any]:
    if not nodes:
        return []
    with concurrent.futures.ThreadPoolExecutor(max_workers=len(nodes)) as pool:
        return list(pool.map(function, nodes))


# One run ----------------------------------------------------------------------


class Cluster:
    """16 nodes in data directories under `root`, meshed by a seeded random draw."""

    def __init__(self, root: Path, scenario: Scenario, rng: random.Random) -> None:
        self.root = root
        self.scenario = scenario
        self.rng = rng
        ports = free_ports(NODES)
        self.nodes = [NodeProcess(i, root / f"n{i:02d}", ports[i]) for i in range(NODES)]
        for node in self.nodes[1:]:
            count = min(node.index, rng.choice((2, 3)))
            node.bootstrap = sorted(rng.sample(range(node.index), count))

    def init(self, identities: Sequence[Path]) -> None:
        """Copy each node's identity and config from `identities`, then apply the scenario's config."""

        def init_one(node: NodeProcess) -> None:
            node.data_dir.mkdir(mode=0o700, parents=True)
            for name in ("identity.key", "config.toml"):
                shutil.copy2(identities[node.index] / name, node.data_dir / name)
            node.peer_id = peer_id_to_text(load_identity(DataDir(node.data_dir)).peer_id)
            if self.scenario.publish_interval_ms is not None:
                set_publish_interval(node.data_dir / "config.toml", self.scenario.publish_interval_ms)

        run_parallel(init_one, self.nodes)

    def start(self) -> float:
        """Start every node once its bootstrap peers listen, and wait for every control API.

        A node that dials a peer before it listens backs off for up to a
        minute, and py-libp2p also caches the failed dial. So a node starts
        only once each of its bootstrap peers serves its control API, which
        the daemon does only after it has started listening.
        """
        ready: set[int] = set()

        def start_and_check() -> bool:
            for node in self.nodes:
                if node.process is None and set(node.bootstrap) <= ready:
                    node.start([self.nodes[j].address for j in node.bootstrap])
            waiting = [n for n in self.nodes if n.process is not None and n.index not in ready]
            for node, answers in zip(waiting, run_parallel(_answers, waiting), strict=True):
                if answers:
                    ready.add(node.index)
            return len(ready) == len(self.nodes)

        return poll_until("every node's control API", START_TIMEOUT_S, start_and_check, self.nodes)

    def import_models(self, seed: int) -> None:
        def import_one(node: NodeProcess) -> None:
            path = self.root / f"model-{node.index:02d}.safetensors"
            write_model(path, seed * 100 + node.index)
            run_cli(["model", "import", str(path), "--name", "m", "--data-dir", str(node.data_dir), "--json"],
                    f"node {node.index}")  # fmt: skip

        run_parallel(import_one, self.nodes)

    def wait_connected(self) -> float:
        """Wait until every node is connected to all its bootstrap peers."""
        wanted = {node.index: {self.nodes[j].peer_id for j in node.bootstrap} for node in self.nodes}

        def connected() -> bool:
            peers = run_parallel(lambda n: {p["peer_id"] for p in n.client.get("/v1/peers")}, self.nodes)
            return all(peers[n.index] >= wanted[n.index] and peers[n.index] for n in self.nodes)

        return poll_until("every node to connect to its bootstrap peers", CONNECT_TIMEOUT_S, connected, self.nodes)

    def publish(self) -> None:
        """Publish one offer per node: staggered when paced, else all at once."""
        order = list(self.nodes)
        self.rng.shuffle(order)
        start = time.monotonic() + 0.2
        offsets = [0.0] * len(order)
        if self.scenario.paced:
            for i in range(1, len(order)):
                offsets[i] = offsets[i - 1] + self.rng.uniform(*PACE_S)
        errors: list[str] = []

        def publish_one(node: NodeProcess, at: float) -> None:
            time.sleep(max(0.0, at - time.monotonic()))
            body = {"model": "m", "price": PRICE, "tensors": [], "expires_s": 3600.0, "terms": "delivery"}
            try:
                node.client.post("/v1/offers", body)
            except ControlError as exc:
                errors.append(f"node {node.index}: {exc}")

        threads = [threading.Thread(target=publish_one, args=(node, start + offset), daemon=True)
                   for node, offset in zip(order, offsets, strict=True)]  # fmt: skip
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise BenchmarkError("publishing failed: " + "; ".join(errors))

    def offers(self) -> list[list[dict[str, Any]]]:
        return run_parallel(lambda n: n.client.get("/v1/offers"), self.nodes)

    def wait_delivered(self) -> tuple[list[list[dict[str, Any]]], float]:
        """Poll every node's offer book until each contains all 16 offers or the deadline passes."""
        started = time.monotonic()
        books = self.offers()
        while time.monotonic() - started < DELIVERY_DEADLINE_S:
            if all(len(book) >= NODES for book in books):
                break
            time.sleep(0.5)
            for node in self.nodes:
                node.check_running()
            books = self.offers()
        return books, time.monotonic() - started


def _answers(node: NodeProcess) -> bool:
    node.check_running()
    try:
        node.client.get("/v1/status")
    except ControlError:
        return False
    return True


def run_cli(args: list[str], what: str) -> str:
    result = subprocess.run([*PMARKET, *args], capture_output=True, text=True, timeout=120, cwd=ROOT, env=_env())
    if result.returncode != 0:
        raise BenchmarkError(f"{what}: pmarket {' '.join(args)} exited {result.returncode}:\n{result.stderr}")
    return result.stdout


def init_identities(root: Path) -> list[Path]:
    """Run `pmarket init` once per node; both runs start from copies of these data directories.

    One set saves a second round of 16 init processes, which costs about
    as much CPU as starting the nodes.
    """
    paths = [root / f"n{i:02d}" for i in range(NODES)]
    with concurrent.futures.ThreadPoolExecutor(max_workers=NODES) as pool:
        list(pool.map(lambda path: run_cli(["init", "--data-dir", str(path)], str(path)), paths))
    return paths


def set_publish_interval(config: Path, milliseconds: int) -> None:
    text, count = re.subn(r"(?m)^publish_interval_ms = \d+$", f"publish_interval_ms = {milliseconds}",
                          config.read_text())  # fmt: skip
    if count != 1:
        raise BenchmarkError(f"{config} has no 'publish_interval_ms = N' line to change")
    config.write_text(text)


def write_model(path: Path, seed: int) -> None:
    """Write a float32 safetensors file of about 4 KiB.

    The tensor names and shapes, and so the model family, are the same for every seed.
    """
    import numpy as np
    from safetensors.numpy import save_file

    generator = np.random.default_rng(seed)
    tensors = {
        "hidden.weight": generator.standard_normal((32, 28)).astype(np.float32),
        "hidden.bias": generator.standard_normal(32).astype(np.float32),
        "out.weight": generator.standard_normal((4, 32)).astype(np.float32),
    }
    save_file(tensors, str(path))


def measure(cluster: Cluster, books: list[list[dict[str, Any]]], outcome: Outcome) -> None:
    sellers = {node.peer_id for node in cluster.nodes}
    for node, book in zip(cluster.nodes, books, strict=True):
        for offer in book:
            if offer["seller"] == node.peer_id or offer["seller"] not in sellers:
                continue
            outcome.latencies_ms.append(offer["received_ms"] - offer["created_ms"])
    statuses = run_parallel(lambda n: n.client.get("/v1/status"), cluster.nodes)
    for status in statuses:
        accepted = status["offers_accepted"]
        outcome.by_gossip += accepted.get("gossip", 0)
        outcome.by_pull += accepted.get("sync", 0)
    outcome.rss_mib = [node.rss_mib() for node in cluster.nodes]


def run_scenario(scenario: Scenario, root: Path, identities: Sequence[Path]) -> Outcome:
    rng = random.Random(SEED)
    cluster = Cluster(root / scenario.name, scenario, rng)
    outcome = Outcome(scenario, pairs=NODES * (NODES - 1))
    began = time.monotonic()

    def progress(message: str) -> None:
        print(f"[{scenario.name} {time.monotonic() - began:5.1f} s] {message}", flush=True)

    try:
        cluster.init(identities)
        progress(f"starting {NODES} nodes")
        cluster.start()
        progress("every control API answers; importing a model into each node")
        cluster.import_models(SEED)
        cluster.wait_connected()
        progress(f"every node is connected to its bootstrap peers; waiting {MESH_HEARTBEATS} heartbeats")
        time.sleep(MESH_HEARTBEATS * HEARTBEAT_S)
        progress("publishing")
        outcome.load = load_average()
        cpu_before = sum(node.cpu_s() for node in cluster.nodes)
        cluster.publish()
        books, took = cluster.wait_delivered()
        outcome.cpu_s = sum(node.cpu_s() for node in cluster.nodes) - cpu_before
        progress(f"read the offer books for {took:.1f} s after the last publish")
        measure(cluster, books, outcome)
    finally:
        stop_all(cluster.nodes)
    outcome.seconds = time.monotonic() - began
    progress("stopped every node")
    return outcome


# Report -----------------------------------------------------------------------


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile: the smallest value with at least p% of values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def row(outcome: Outcome) -> list[str]:
    latencies = outcome.latencies_ms
    share = outcome.delivered / outcome.pairs
    if latencies:
        p50 = f"{percentile(latencies, 50):,.0f} ms"
        p99 = f"{percentile(latencies, 99):,.0f} ms"
        worst = f"{max(latencies):,} ms"
    else:
        p50 = p99 = worst = "-"
    rss = outcome.rss_mib
    return [
        outcome.scenario.label,
        f"{outcome.delivered}/{outcome.pairs} ({share:.1%})",
        f"{outcome.by_gossip} / {outcome.by_pull}",
        p50,
        p99,
        worst,
        f"{statistics.median(rss):.0f} MiB ({min(rss):.0f}-{max(rss):.0f})",
        f"{outcome.cpu_s:.1f} s",
        outcome.load,
    ]


def verdicts(outcome: Outcome) -> str:
    share = outcome.delivered / outcome.pairs
    p99 = percentile(outcome.latencies_ms, 99) if outcome.latencies_ms else math.inf
    rss = statistics.median(outcome.rss_mib)
    goals = [
        ("100% of pairs delivered", share >= GOAL_DELIVERED, f"{share:.1%}"),
        (f"p99 latency under {GOAL_P99_MS:,.0f} ms", p99 < GOAL_P99_MS, f"{p99:,.0f} ms"),
        (f"idle node under {GOAL_RSS_MIB:.0f} MiB", rss < GOAL_RSS_MIB, f"median {rss:.0f} MiB"),
    ]
    parts = [f"{name}: {'met' if met else 'NOT met'} ({value})" for name, met, value in goals]
    return "Goals for the paced run: " + "; ".join(parts) + "."


def comparison(paced: Outcome, burst: Outcome) -> str:
    """Describe what the baseline shows, from the figures of this run."""
    if burst.by_pull == 0 and burst.delivered == burst.pairs:
        lost = "gossip alone delivered every pair, so the catch-up pull had nothing to add"
    else:
        lost = (f"gossip delivered {burst.by_gossip} pairs and the catch-up pull {burst.by_pull} more, "
                f"of {burst.pairs}")  # fmt: skip
    ratio = ""
    if paced.latencies_ms and burst.latencies_ms:
        factor = percentile(burst.latencies_ms, 99) / max(1, percentile(paced.latencies_ms, 99))
        ratio = f"; its p99 latency was {factor:.1f} times the paced run's"
    return f"In the burst baseline {lost}{ratio}."


def load_average() -> str:
    try:
        with open("/proc/loadavg") as loadavg:
            return loadavg.read().split()[0]
    except (OSError, IndexError):
        return "unknown"


def report(outcomes: list[Outcome], load: str, seconds: float) -> Result:
    result = Result(
        name="gossip",
        title=f"offer propagation between {NODES} node processes on loopback",
        columns=[
            "run",
            "(offer, node) pairs delivered",
            "by gossip / by catch-up pull",
            "p50 latency",
            "p99 latency",
            "max latency",
            "idle node RSS, median (min-max)",
            "CPU time of all nodes, publish to delivery",
            "load average at publish",
        ],
    )
    result.rows.extend(row(outcome) for outcome in outcomes)
    result.notes.append(verdicts(outcomes[0]))
    result.notes.append(comparison(outcomes[0], outcomes[1]))
    result.notes.append(
        f"Each run: {NODES} `pmarket node start` processes, each bootstrapped to 2-3 random earlier nodes "
        f"(seed {SEED}); {MESH_HEARTBEATS} heartbeats after the last bootstrap connection, every node "
        f"publishes one offer of its own 4 KiB model. Latency is `received_ms` minus `created_ms` over every "
        f"delivered pair ({NODES} offers times {NODES - 1} other nodes), one machine clock. "
        f"`publish_interval_ms` spaces the publishes of one node, so with one offer per node the runs "
        f"differ only in when the nodes publish. Offer books "
        f"are read until all are full or {DELIVERY_DEADLINE_S:g} s after publishing, which covers one "
        f"periodic catch-up pull (`sync_interval_s` 30 s, randomised by up to 20%). RSS is VmRSS of each "
        f"node after delivery, with its offers in the book and no trades. The {NODES} nodes share this "
        f"machine's cores with whatever else runs on it: the load average column is the 1-minute load "
        f"average just before publishing, and it was {load} when the benchmark started. "
        f"The benchmark took {seconds:.0f} s: "
        + ", ".join(f"{o.scenario.name} run {o.seconds:.0f} s" for o in outcomes)
        + f", after {NODES} `pmarket init` processes."
    )
    return result


# Entry point ------------------------------------------------------------------


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into KeyboardInterrupt, so cleanup runs as it does on Ctrl-C."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main() -> Result:
    load = load_average()
    began = time.monotonic()
    root = Path(tempfile.mkdtemp(prefix="pmarket-gossip-"))
    finished = False
    try:
        with sigterm_as_interrupt():
            print(f"Running pmarket init for {NODES} nodes", flush=True)
            identities = init_identities(root / "identities")
            outcomes = [run_scenario(scenario, root, identities) for scenario in SCENARIOS]
        finished = True
    finally:
        if finished:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"Kept the nodes' data directories and logs in {root}", file=sys.stderr)
    return report(outcomes, load, time.monotonic() - began)
