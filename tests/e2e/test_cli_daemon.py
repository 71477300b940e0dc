"""The CLI against real daemon processes."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.e2e.processes import Daemon, run, run_json

pytestmark = pytest.mark.e2e


@pytest.fixture
def daemons():
    started: list[Daemon] = []
    yield started
    for daemon in started:
        daemon.stop()


def test_init_refuses_existing_identity(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    run("init", "--data-dir", str(data_dir))
    key = (data_dir / "identity.key").read_bytes()
    assert (data_dir / "identity.key").stat().st_mode & 0o777 == 0o600
    assert (data_dir / "config.toml").exists()
    second = run("init", "--data-dir", str(data_dir), check=False)
    assert second.returncode == 1
    assert "already exists" in second.stderr
    assert (data_dir / "identity.key").read_bytes() == key


def test_commands_without_daemon_fail(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    run("init", "--data-dir", str(data_dir))
    for command in (["status"], ["peers"], ["offers"], ["node", "stop"]):
        result = run(*command, "--data-dir", str(data_dir), check=False)
        assert result.returncode == 1, command
        assert "no pmarket daemon is running" in result.stderr


def test_start_without_init_fails(tmp_path: Path) -> None:
    result = run("node", "start", "--data-dir", str(tmp_path / "missing"), check=False)
    assert result.returncode == 1
    assert "pmarket init" in result.stderr


def test_two_daemons_see_each_other(tmp_path: Path, daemons: list[Daemon]) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for data_dir in (first, second):
        run("init", "--data-dir", str(data_dir))

    daemons.append(Daemon(first))
    status = daemons[0].wait_ready()
    assert status["addrs"][0].startswith("/ip4/127.0.0.1/tcp/")
    daemons.append(Daemon(second, "--bootstrap", status["addrs"][0]))
    daemons[1].wait_ready()

    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and not run_json("peers", "--data-dir", str(second)):
        time.sleep(0.2)
    peers = run_json("peers", "--data-dir", str(second))
    assert [p["peer_id"] for p in peers] == [status["peer_id"]]
    assert run_json("offers", "--data-dir", str(second)) == []
    table = run("peers", "--data-dir", str(second)).stdout
    assert status["peer_id"] in table
    status_table = run("status", "--data-dir", str(second)).stdout
    assert "offers accepted" in status_table

    stopped = run_json("node", "stop", "--data-dir", str(second))
    assert stopped["stopping"] is True
    assert daemons[1].process.wait(timeout=5) == 0
    result = run("status", "--data-dir", str(second), check=False)
    assert result.returncode == 1


def test_connect_command(tmp_path: Path, daemons: list[Daemon]) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for data_dir in (first, second):
        run("init", "--data-dir", str(data_dir))
        daemons.append(Daemon(data_dir))
    status = daemons[0].wait_ready()
    daemons[1].wait_ready()
    connected = run_json("connect", status["addrs"][0], "--data-dir", str(second))
    assert connected["peer_id"] == status["peer_id"]
    assert [p["peer_id"] for p in run_json("peers", "--data-dir", str(second))] == [status["peer_id"]]
    bad = run("connect", "/ip4/127.0.0.1/tcp/1", "--data-dir", str(second), check=False)
    assert bad.returncode == 1
    assert "/ip4/127.0.0.1/tcp/1" in bad.stderr


def test_restart_keeps_peer_id(tmp_path: Path, daemons: list[Daemon]) -> None:
    data_dir = tmp_path / "node"
    run("init", "--data-dir", str(data_dir))
    daemons.append(Daemon(data_dir))
    first = daemons[-1].wait_ready()["peer_id"]
    run("node", "stop", "--data-dir", str(data_dir))
    daemons[-1].process.wait(timeout=5)
    daemons.append(Daemon(data_dir))
    assert daemons[-1].wait_ready()["peer_id"] == first


def test_second_daemon_on_same_dir_refused(tmp_path: Path, daemons: list[Daemon]) -> None:
    data_dir = tmp_path / "node"
    run("init", "--data-dir", str(data_dir))
    daemons.append(Daemon(data_dir))
    status = daemons[-1].wait_ready()
    second = run("node", "start", "--data-dir", str(data_dir), check=False, timeout=30)
    assert second.returncode == 1
    assert "another pmarket daemon" in second.stderr
    assert str(status["pid"]) in second.stderr
    # The first daemon is unharmed.
    assert run_json("status", "--data-dir", str(data_dir))["peer_id"] == status["peer_id"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_within_a_second(tmp_path: Path, daemons: list[Daemon], signum: int) -> None:
    data_dir = tmp_path / "node"
    run("init", "--data-dir", str(data_dir))
    daemons.append(Daemon(data_dir))
    daemons[-1].wait_ready()
    started = time.monotonic()
    daemons[-1].signal(signum)
    code = daemons[-1].process.wait(timeout=5)
    elapsed = time.monotonic() - started
    assert code == 0
    assert elapsed < 1.0
    assert not (data_dir / "control.sock").exists()
    assert "stopped" in (data_dir / "node.log").read_text()


def test_bad_config_is_reported(tmp_path: Path) -> None:
    data_dir = tmp_path / "node"
    run("init", "--data-dir", str(data_dir))
    (data_dir / "config.toml").write_text('[node]\nlisten = ["not-a-multiaddr"]\n')
    result = run("node", "start", "--data-dir", str(data_dir), check=False)
    assert result.returncode == 1
    assert "not-a-multiaddr" in result.stderr
    assert "not a valid multiaddr" in result.stderr


def test_metrics_endpoint(tmp_path: Path, daemons: list[Daemon]) -> None:
    import urllib.request

    data_dir = tmp_path / "node"
    run("init", "--data-dir", str(data_dir))
    with open(data_dir / "config.toml", "a") as config:
        config.write("")
    text = (data_dir / "config.toml").read_text().replace("prometheus = false", "prometheus = true")
    (data_dir / "config.toml").write_text(text)
    daemons.append(Daemon(data_dir))
    status = daemons[-1].wait_ready()
    port = status["metrics_port"]
    assert isinstance(port, int)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert "pmarket_peers" in body
    assert "pmarket_offers_rejected" in body
    assert json.dumps(status)  # status stays JSON-serialisable with the port in it


def test_port_in_use_is_refused(tmp_path: Path, daemons: list[Daemon]) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for data_dir in (first, second):
        run("init", "--data-dir", str(data_dir))
    daemons.append(Daemon(first))
    address = daemons[0].wait_ready()["addrs"][0]
    in_use = address.split("/p2p/")[0]

    result = run("node", "start", "--data-dir", str(second), "--listen", in_use, check=False, timeout=30)

    assert result.returncode == 1
    assert "already in use" in result.stderr
    assert not (second / "control.sock").exists()
