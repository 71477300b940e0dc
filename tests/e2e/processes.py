"""Start and stop real `pmarket` processes for end-to-end tests."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

PMARKET = [sys.executable, "-m", "node.cli"]
ROOT = Path(__file__).resolve().parents[2]


def run(*args: str, check: bool = True, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run a pmarket command to completion."""
    result = subprocess.run(
        [*PMARKET, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=_env()
    )
    if check and result.returncode != 0:
        raise AssertionError(f"pmarket {' '.join(args)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def run_json(*args: str) -> Any:
    return json.loads(run(*args, "--json").stdout)


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    env.pop("PMARKET_DATA_DIR", None)
    return env


class Daemon:
    """A `pmarket node start` process; always stopped by its PID.

    `prefix` runs the daemon through another command, such as
    `ip netns exec NAME`, which must exec the daemon so that the PID stays
    the daemon's.
    """

    def __init__(self, data_dir: Path, *extra: str, prefix: Sequence[str] = ()) -> None:
        self.data_dir = data_dir
        self.log = open(data_dir / "stdout.log", "w")  # noqa: SIM115
        self.process = subprocess.Popen(
            [*prefix, *PMARKET, "node", "start", "--data-dir", str(data_dir), *extra],
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
            env=_env(),
        )

    def wait_ready(self, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited with {self.process.returncode}:\n{self.output()}")
            result = run("status", "--data-dir", str(self.data_dir), "--json", check=False)
            if result.returncode == 0:
                status: dict[str, Any] = json.loads(result.stdout)
                return status
            time.sleep(0.2)
        raise AssertionError(f"daemon not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        return (self.data_dir / "stdout.log").read_text()

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signum)

    def stop(self) -> None:
        """Terminate by PID if still running, then kill if it will not stop."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.log.close()
