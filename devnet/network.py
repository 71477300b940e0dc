"""A local network of real node processes on 127.0.0.1.

Each organization gets a data directory ``DIR/org-<i>`` with its own
identity, shard of the task and config, and one `pmarket node start`
process listening on a free port. `devnet.json` in DIR records every
process the devnet started (PID, command line, data directory, log), so
`status`, `logs` and `down` work from another terminal, and `down` stops
exactly those processes, by PID, after checking that each PID still runs
the command it started.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from node.client import ControlClient, ControlError
from node.config import set_task
from node.datadir import DataDir, init, load_identity
from protocol.identity import peer_id_to_text

STATE_FILE = "devnet.json"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 5.0


class DevnetError(Exception):
    """A devnet that cannot start or run; the message names the node and its log."""


@dataclass
class OrgProcess:
    name: str
    index: int
    data_dir: str
    log: str
    pid: int
    command: list[str]
    peer_id: str = ""
    addr: str = ""

    @property
    def client(self) -> ControlClient:
        return ControlClient(DataDir(Path(self.data_dir)), timeout=600.0)


@dataclass(frozen=True)
class NodeSettings:
    """Settings written into every organization's config.toml."""

    task: str
    orgs: int
    split: str
    deduction: float
    seed: int
    align: bool = True
    chunk_size: int = 64 * 1024
    pricing: str = "nash"
    share: float = 0.5
    reserve_fraction: float = 0.5
    budget: int = 1_000_000
    agent: dict[str, Any] | None = None
    # Every organization lists every other as a competitor ([agent] competitors).
    compete: bool = False


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return repr(value)


def _set_section(path: Path, section: str, values: dict[str, Any]) -> None:
    """Replace keys of one section in a config written by `pmarket init`."""
    text = path.read_text(encoding="utf-8")
    start = text.index(f"[{section}]")
    end = text.find("\n[", start + 1)
    end = len(text) if end == -1 else end
    body = text[start:end]
    for key, value in values.items():
        line = f"{key} = {_toml_value(value)}"
        body, count = re.subn(rf"(?m)^{key} = .*$", line.replace("\\", "\\\\"), body, count=1)
        if count == 0:
            body = body.rstrip("\n") + f"\n{line}\n"
    path.write_text(text[:start] + body + text[end:], encoding="utf-8")


def prepare_org(root: Path, index: int, settings: NodeSettings) -> DataDir:
    """Create org-<index>'s data directory and config (replacing an old one)."""
    data_dir = DataDir(root / f"org-{index}")
    if data_dir.root.exists():
        shutil.rmtree(data_dir.root)
    init(data_dir)
    set_task(
        data_dir.config,
        name=settings.task,
        index=index,
        orgs=settings.orgs,
        split=settings.split,
        deduction=settings.deduction,
        seed=settings.seed,
    )
    _set_section(data_dir.config, "task", {"align": settings.align})
    _set_section(data_dir.config, "transfer", {"chunk_size": settings.chunk_size})
    _set_section(data_dir.config, "workers", {"device": "cpu"})
    _set_section(data_dir.config, "gossip", {"publish_interval_ms": 10, "sync_interval_s": 5.0})
    _set_section(
        data_dir.config,
        "market",
        {
            "pricing": settings.pricing,
            "share": settings.share,
            "reserve_fraction": settings.reserve_fraction,
            "budget": settings.budget,
        },
    )
    _set_section(data_dir.config, "agent", {"model": "model", **(settings.agent or {})})
    return data_dir


class Devnet:
    def __init__(self, root: Path) -> None:
        self.root = root.absolute()
        self.orgs: list[OrgProcess] = []

    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    # Starting ---------------------------------------------------------------------

    def start(self, count: int, settings: NodeSettings) -> None:
        """Start `count` nodes, full-mesh connect them and wait until each sees every other."""
        self.root.mkdir(parents=True, exist_ok=True)
        if self.state_path.exists():
            running = [org for org in load(self.root) if is_ours(org)]
            if running:
                raise DevnetError(
                    f"a devnet is already running in {self.root} ({len(running)} nodes); "
                    f"stop it with `pmarket devnet down --dir {self.root}` or use another --dir"
                )
        data_dirs = [prepare_org(self.root, index, settings) for index in range(count)]
        if settings.compete:
            peers = [peer_id_to_text(load_identity(d).peer_id) for d in data_dirs]
            for index, data_dir in enumerate(data_dirs):
                _set_section(data_dir.config, "agent", {"competitors": peers[:index] + peers[index + 1 :]})
        for index, data_dir in enumerate(data_dirs):
            self.orgs.append(self._spawn(index, data_dir))
            self.save()
        with ThreadPoolExecutor(max_workers=count) as pool:
            statuses = list(pool.map(self._wait_ready, self.orgs))
        for org, status in zip(self.orgs, statuses, strict=True):
            org.peer_id = status["peer_id"]
            org.addr = status["addrs"][0]
        self.save()
        self._connect_all()

    def _spawn(self, index: int, data_dir: DataDir) -> OrgProcess:
        command = [sys.executable, "-m", "node.cli", "node", "start", "--data-dir", str(data_dir.root),
                   "--listen", "/ip4/127.0.0.1/tcp/0"]
        log = data_dir.root / "stdout.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        with open(log, "wb") as output:
            process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
        return OrgProcess(f"org-{index}", index, str(data_dir.root), str(data_dir.log), process.pid, command)

    def _wait_ready(self, org: OrgProcess) -> dict[str, Any]:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if not is_ours(org):
                raise DevnetError(f"{org.name} (PID {org.pid}) exited during start; see {Path(org.data_dir) / 'stdout.log'}")
            try:
                status: dict[str, Any] = org.client.get("/v1/status")
                return status
            except ControlError:
                time.sleep(0.2)
        raise DevnetError(f"{org.name} did not start within {START_TIMEOUT_S:g} s; see {org.log}")

    def _connect_all(self) -> None:
        for org in self.orgs:
            for other in self.orgs[: org.index]:
                org.client.post("/v1/connect", {"address": other.addr})
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_alive()
            if all(len(org.client.get("/v1/peers")) >= len(self.orgs) - 1 for org in self.orgs):
                return
            time.sleep(0.2)
        raise DevnetError("the nodes did not all connect to each other in time; see their logs")

    # Watching and stopping ------------------------------------------------------------

    def check_alive(self) -> None:
        """Raise DevnetError naming the first node that is no longer running."""
        for org in self.orgs:
            if not is_ours(org):
                raise DevnetError(crash_message(org))

    def stop(self) -> list[str]:
        """Stop every node process this devnet started; return what was done."""
        return stop_all(self.orgs)

    def save(self) -> None:
        data = {"root": str(self.root), "orgs": [asdict(org) for org in self.orgs]}
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps(data, indent=2))
        os.replace(temporary, self.state_path)


def load(root: Path) -> list[OrgProcess]:
    path = root.absolute() / STATE_FILE
    if not path.exists():
        raise DevnetError(f"no devnet in {root} (no {STATE_FILE}); start one with `pmarket devnet up --dir {root}`")
    data = json.loads(path.read_text())
    return [OrgProcess(**org) for org in data["orgs"]]


def is_ours(org: OrgProcess) -> bool:
    """True when PID `org.pid` runs and is still the node this devnet started.

    A node that exited is reaped here (it is this process's child), so no
    zombie is left behind.
    """
    try:
        with open(f"/proc/{org.pid}/stat") as handle:
            state = handle.read().rsplit(")", 1)[1].split()[0]
        with open(f"/proc/{org.pid}/cmdline", "rb") as handle:
            cmdline = handle.read().split(b"\0")
    except (OSError, IndexError):
        return False
    if state == "Z":
        _reap(org.pid)
        return False
    return org.data_dir.encode() in cmdline and b"node.cli" in cmdline


def _reap(pid: int) -> None:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def crash_message(org: OrgProcess) -> str:
    return f"{org.name} (PID {org.pid}) is not running; its log is {org.log} (start output in {Path(org.data_dir) / 'stdout.log'})"


def stop_all(orgs: Sequence[OrgProcess]) -> list[str]:
    """SIGTERM each node we started, then SIGKILL any that outlive STOP_TIMEOUT_S."""
    done = []
    running = [org for org in orgs if is_ours(org)]
    for org in running:
        try:
            os.kill(org.pid, signal.SIGTERM)
        except ProcessLookupError:
            continue
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for org in running:
        while is_ours(org) and time.monotonic() < deadline:
            time.sleep(0.05)
        if is_ours(org):
            os.kill(org.pid, signal.SIGKILL)
            done.append(f"killed {org.name} (PID {org.pid}) after it ignored SIGTERM for {STOP_TIMEOUT_S:g} s")
        else:
            done.append(f"stopped {org.name} (PID {org.pid})")
        _reap(org.pid)
    return done


def status_rows(orgs: Sequence[OrgProcess]) -> list[dict[str, Any]]:
    rows = []
    for org in orgs:
        row: dict[str, Any] = {"name": org.name, "pid": org.pid, "peer_id": org.peer_id, "running": is_ours(org),
                               "log": org.log}
        if row["running"]:
            try:
                status = org.client.get("/v1/status")
                row.update(peers=status["peers"], offers=status["offers"], deals_open=status["deals_open"],
                           balance=status["balance"])
            except ControlError as exc:
                row["error"] = str(exc)
        rows.append(row)
    return rows

