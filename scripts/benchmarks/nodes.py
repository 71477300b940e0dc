"""Node processes for benchmarks: start, drive through the control API, stop by PID."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from node.client import ControlClient, ControlError
from node.datadir import DataDir, init
from scripts.benchmarks.record import ROOT

START_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
TERMINAL_STATES = {"paid", "refused", "failed", "rejected", "expired"}
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def write_config(data_dir: DataDir, sections: Mapping[str, Mapping[str, Any]]) -> None:
    """Replace config.toml with the given sections; every other key keeps its default."""
    lines = []
    for section, values in sections.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {json.dumps(value)}" for key, value in values.items())
        lines.append("")
    data_dir.config.write_text("\n".join(lines), encoding="utf-8")


class NodeProcess:
    """One `pmarket node start` process (or `launcher`, which runs the same daemon)."""

    def __init__(self, root: Path, name: str, sections: Mapping[str, Mapping[str, Any]],
                 launcher: str = "node.cli") -> None:
        self.name = name
        self.data_dir = DataDir(root / name)
        init(self.data_dir)
        write_config(self.data_dir, sections)
        command = [sys.executable, "-m", launcher, "node", "start", "--data-dir", str(self.data_dir.root),
                   "--listen", "/ip4/127.0.0.1/tcp/0"]
        self.log_path = self.data_dir.root / "stdout.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                env=dict(os.environ, PYTHONUNBUFFERED="1"),
            )
        self.client = ControlClient(self.data_dir, timeout=600.0)
        self.address = ""

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}")
            try:
                status = self.client.get("/v1/status")
            except ControlError:
                time.sleep(0.2)
                continue
            self.address = status["addrs"][0]
            return
        raise RuntimeError(f"{self.name} did not start within {timeout:g} s; see {self.log_path}")

    def cpu_seconds(self) -> float:
        """User and system CPU seconds the process has used so far."""
        with open(f"/proc/{self.pid}/stat") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS

    def memory_kib(self) -> dict[str, int]:
        """Resident set size and proportional set size (shared pages split among their users), in KiB."""
        values = {}
        with open(f"/proc/{self.pid}/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    values["rss"] = int(line.split()[1])
        try:
            with open(f"/proc/{self.pid}/smaps_rollup") as handle:
                for line in handle:
                    if line.startswith("Pss:"):
                        values["pss"] = int(line.split()[1])
        except OSError:
            pass
        return values

    def stop(self) -> None:
        """SIGTERM this process by its PID, then SIGKILL it if it outlives STOP_TIMEOUT_S."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_TIMEOUT_S)


def wait_for_offer(node: NodeProcess, offer_id: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(offer["offer_id"] == offer_id for offer in node.client.get("/v1/offers")):
            return
        time.sleep(0.1)
    raise RuntimeError(f"{node.name} did not see offer {offer_id[:12]} within {timeout:g} s; see {node.log_path}")


def publish_offer(seller: NodeProcess, buyer: NodeProcess, model: str, price: int = 1) -> str:
    """Publish an offer of `model` and wait until the buyer's offer book contains it; return its ID.

    A node buys each offer once, so a benchmark that buys the same weights
    again publishes them again, as a new offer.
    """
    offer = seller.client.post("/v1/offers", {"model": model, "price": price})
    wait_for_offer(buyer, offer["offer_id"])
    return str(offer["offer_id"])


def wait_for_deal(node: NodeProcess, deal_id: str, timeout: float = 600.0) -> dict[str, Any]:
    """Poll the deal until it ends; return its last view."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        view: dict[str, Any] = node.client.get(f"/v1/deals/{deal_id}")
        if view["state"] in TERMINAL_STATES:
            return view
        time.sleep(0.02)
    raise RuntimeError(f"deal {deal_id[:12]} of {node.name} did not end within {timeout:g} s; see {node.log_path}")
