"""The devnet as a user runs it: real node processes, rounds, report, clean exit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from tests.e2e.processes import PMARKET, ROOT, _env, run

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def processes_using(folder: Path) -> list[int]:
    """PIDs of running processes whose command line mentions `folder`."""
    found = []
    marker = str(folder).encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as handle:
                if marker in handle.read():
                    with open(f"/proc/{entry}/stat") as stat:
                        if stat.read().rsplit(")", 1)[1].split()[0] != "Z":
                            found.append(int(entry))
        except OSError:
            continue
    return found


def test_devnet_trades_and_cleans_up(tmp_path: Path) -> None:
    folder = tmp_path / "net"
    result = run("devnet", "up", "--orgs", "3", "--rounds", "2", "--dir", str(folder), timeout=600)
    assert "Report:" in result.stdout
    report = json.loads((folder / "report" / "report.json").read_text())
    assert report["status"] == "complete"
    assert report["completed_rounds"] == 2
    assert report["ledgers_consistent"] is True
    paid = [trade for trade in report["trades"] if trade.get("state") == "paid"]
    assert paid, "no trade was paid"
    assert sum(org["bought"] for org in report["orgs"]) == len(paid)
    assert sum(org["spent"] for org in report["orgs"]) == sum(org["earned"] for org in report["orgs"])
    for org in report["orgs"]:
        assert 0.0 < org["trading_accuracy"] <= 1.0
        assert 0.0 < org["siloed_accuracy"] <= 1.0
        assert len(org["trading_curve"]) == 2
    assert 0.0 < report["centralized_accuracy"] <= 1.0
    assert (folder / "report" / "report.png").stat().st_size > 10_000
    assert "Ledgers consistent: yes" in (folder / "report" / "report.md").read_text()
    assert processes_using(folder) == []


def test_crashed_node_ends_run_with_partial_report(tmp_path: Path) -> None:
    folder = tmp_path / "net"
    runner = subprocess.Popen(
        [*PMARKET, "devnet", "up", "--orgs", "3", "--rounds", "8", "--dir", str(folder)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT, env=_env(),
    )
    try:
        # Wait for the first round to finish, then kill one node.
        deadline = time.monotonic() + 300
        state = folder / "devnet.json"
        victim = None
        while time.monotonic() < deadline and victim is None:
            time.sleep(0.5)
            if state.exists():
                orgs = json.loads(state.read_text())["orgs"]
                models = folder / "org-1" / "models" / "model"
                if len(orgs) == 3 and models.exists() and len(list(models.glob("*.safetensors"))) >= 3:
                    victim = orgs[1]
        assert victim is not None, "the devnet did not get through its first round"
        os.kill(victim["pid"], signal.SIGKILL)
        output, _ = runner.communicate(timeout=300)
    finally:
        if runner.poll() is None:
            runner.send_signal(signal.SIGINT)
            runner.wait(timeout=60)
    assert runner.returncode == 1
    assert "org-1" in output
    assert "node.log" in output
    report = json.loads((folder / "report" / "report.json").read_text())
    assert report["status"].startswith("incomplete")
    assert "org-1" in report["status"]
    assert report["completed_rounds"] < 8
    assert processes_using(folder) == []


def test_keep_then_status_logs_down(tmp_path: Path) -> None:
    folder = tmp_path / "net"
    run("devnet", "up", "--orgs", "2", "--rounds", "1", "--dir", str(folder), "--keep", timeout=600)
    try:
        status = json.loads(run("devnet", "status", "--dir", str(folder), "--json").stdout)
        assert [row["name"] for row in status] == ["org-0", "org-1"]
        assert all(row["running"] for row in status)
        assert all(row["peers"] == 1 for row in status)
        logs = run("devnet", "logs", "org-1", "--dir", str(folder)).stdout
        assert "started" in logs
        # The nodes are ordinary nodes: the usual commands reach them.
        deals = json.loads(run("deals", "--data-dir", str(folder / "org-0"), "--json").stdout)
        assert isinstance(deals, list)
    finally:
        down = run("devnet", "down", "--dir", str(folder))
    assert "stopped org-0" in down.stdout
    assert "stopped org-1" in down.stdout
    assert processes_using(folder) == []
    after = run("devnet", "status", "--dir", str(folder), check=False)
    assert after.returncode == 1
    assert "No node of the devnet" in after.stdout
    assert "pmarket devnet up --dir" in after.stdout
