"""What the `pmarket` command prints for mistakes and for counts, run in-process.

Commands that would reach a daemon get a fake control client, so no daemon
starts. Checks that must happen before the daemon is reached run against a
data directory where no daemon runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from node import cli, cli_trade
from node.client import ControlError
from node.config import load
from node.datadir import DaemonLock, DataDir, DataDirError, init
from node.models import DestinationExists, ModelError, ModelStore
from node.store import Database
from protocol import limits

PEER = "12D3KooWD3eckifWpRn9wQpMG9R9hX3sD158z7EqHWmweQAJU5SA"
FAMILY_A = "3c15bde718b0" + "0" * 52
FAMILY_B = "9f00aa11bb22" + "1" * 52


class FakeClient:
    """Returns a canned body for each route and records every request."""

    def __init__(self, responses: dict[str, Any]) -> None:
        self.responses = responses
        self.requests: list[tuple[str, dict[str, Any]]] = []

    def get(self, path: str, **params: Any) -> Any:
        self.requests.append((path, params))
        return self.responses[path]

    def post(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        self.requests.append((path, body))
        return self.responses[path]


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def _use_client(monkeypatch: pytest.MonkeyPatch, client: Any) -> None:
    monkeypatch.setattr(cli, "client_for", lambda args: client)
    monkeypatch.setattr(cli_trade, "client_for", lambda args: client)


@pytest.fixture
def no_daemon(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `node start` fail the test, instead of serving until a signal, if a check lets it through."""
    from node import run

    def fail_start(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("`pmarket node start` got past its checks and would start a daemon")

    monkeypatch.setattr(run, "Node", fail_start)


def _initialised(tmp_path: Path) -> Path:
    root = tmp_path / "node"
    init(DataDir(root))
    return root


# Errors keep square brackets -------------------------------------------------------


def test_error_keeps_config_section(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_daemon: None) -> None:
    root = _initialised(tmp_path)
    (root / "config.toml").write_text("[limitz]\n", encoding="utf-8")

    status, _, err = _run(capsys, "node", "start", "--data-dir", str(root))

    assert status == 1
    assert f"error: {root / 'config.toml'}: unknown section [limitz]" in err


def test_error_type_names_file_section_key(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_daemon: None) -> None:
    root = _initialised(tmp_path)
    (root / "config.toml").write_text('[limits]\nmax_connections = "lots"\n', encoding="utf-8")

    status, _, err = _run(capsys, "node", "start", "--data-dir", str(root))

    assert status == 1
    assert err.strip() == f"error: {root / 'config.toml'}: [limits] max_connections must be an integer, got 'lots'"


def test_error_unknown_split_in_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_daemon: None) -> None:
    root = _initialised(tmp_path)
    (root / "config.toml").write_text('[task]\nname = "digits"\nsplit = "random"\n', encoding="utf-8")

    status, _, err = _run(capsys, "node", "start", "--data-dir", str(root))

    assert status == 1
    assert "[task] split 'random' is not a split of task digits; use one of complementary, iid" in err


def test_table_cells_keep_brackets(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    peers = [{"peer_id": PEER, "addrs": ["/ip4/127.0.0.1/tcp/1 [bold]x[/bold]"]}]
    _use_client(monkeypatch, FakeClient({"/v1/peers": peers}))

    status, out, _ = _run(capsys, "peers", "--data-dir", "unused")

    assert status == 0
    assert "[bold]x[/bold]" in out


# Multiaddrs ---------------------------------------------------------------------


def test_listen_garbage_rejected(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_daemon: None) -> None:
    status, _, err = _run(capsys, "node", "start", "--data-dir", str(tmp_path), "--listen", "garbage")

    assert status == 1
    assert err.startswith("error: --listen 'garbage' is not a valid multiaddr")
    assert err.strip().endswith("write it as /ip4/127.0.0.1/tcp/4001")


def test_listen_host_port_gets_example(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_daemon: None) -> None:
    status, _, err = _run(capsys, "node", "start", "--data-dir", str(tmp_path), "--listen", "127.0.0.1:4001")

    assert status == 1
    assert err.strip().endswith("write it as /ip4/127.0.0.1/tcp/4001")


def test_bootstrap_host_port_gets_example(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_daemon: None) -> None:
    status, _, err = _run(capsys, "node", "start", "--data-dir", str(tmp_path), "--bootstrap", "127.0.0.1:4001")

    assert status == 1
    assert err.startswith("error: --bootstrap '127.0.0.1:4001' is not a valid multiaddr")
    assert err.strip().endswith("write it as /ip4/127.0.0.1/tcp/4001/p2p/<peer ID>")


def test_bootstrap_without_peer_id(tmp_path: Path, capsys: pytest.CaptureFixture[str], no_daemon: None) -> None:
    status, _, err = _run(capsys, "node", "start", "--data-dir", str(tmp_path),
                          "--bootstrap", "/ip4/127.0.0.1/tcp/45447")

    assert status == 1
    assert err.startswith("error: --bootstrap '/ip4/127.0.0.1/tcp/45447' must end in /p2p/<peer ID>")


def test_connect_without_peer_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _initialised(tmp_path)

    status, _, err = _run(capsys, "connect", "/ip4/127.0.0.1/tcp/45447", "--data-dir", str(root))

    assert status == 1
    assert err.startswith("error: peer address '/ip4/127.0.0.1/tcp/45447' must end in /p2p/<peer ID>")
    assert "for example /ip4/127.0.0.1/tcp/45447/p2p/12D3KooW..." in err
    assert "P_P2P" not in err


def test_connect_full_address_reaches_daemon(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    client = FakeClient({"/v1/connect": {"peer_id": PEER}})
    _use_client(monkeypatch, client)
    address = f"/ip4/127.0.0.1/tcp/45447/p2p/{PEER}"

    status, out, _ = _run(capsys, "connect", address, "--data-dir", "unused")

    assert status == 0
    assert client.requests == [("/v1/connect", {"address": address})]
    assert f"Connected to {PEER}" in out


# init ---------------------------------------------------------------------------


def test_init_unknown_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "node"

    status, _, err = _run(capsys, "init", "--data-dir", str(root), "--task", "nosuchtask")

    assert status == 1
    assert err.strip() == "error: --task 'nosuchtask' is not a known task; known tasks: digits"
    assert not root.exists()


def test_init_shard_needs_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "node"

    status, _, err = _run(capsys, "init", "--data-dir", str(root), "--shard", "1/2")

    assert status == 1
    assert err.strip() == "error: --shard sets the node's task data and needs --task, for example --task digits"
    assert not root.exists()


def test_init_split_and_seed_need_task(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(capsys, "init", "--data-dir", str(tmp_path / "node"), "--split", "complementary",
                          "--seed", "3")

    assert status == 1
    assert "--split, --seed set the node's task data and need --task" in err


@pytest.mark.parametrize("deduction", ["2", "0", "-0.1"])
def test_init_deduction_out_of_range(tmp_path: Path, capsys: pytest.CaptureFixture[str], deduction: str) -> None:
    root = tmp_path / "node"

    status, _, err = _run(capsys, "init", "--data-dir", str(root), "--task", "digits", "--shard", "0/2",
                          "--split", "complementary", "--deduction", deduction)

    assert status == 1
    assert f"--deduction {float(deduction):g} must be greater than 0 and at most 1" in err
    assert not root.exists()


def test_init_deduction_needs_complementary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(capsys, "init", "--data-dir", str(tmp_path / "node"), "--task", "digits",
                          "--deduction", "0.5")

    assert status == 1
    assert "--deduction applies only to --split complementary; the split is iid" in err


def test_init_bad_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(capsys, "init", "--data-dir", str(tmp_path / "node"), "--task", "digits", "--shard", "2/2")

    assert status == 1
    assert "--shard '2/2' must be INDEX/COUNT with 0 <= INDEX < COUNT" in err


def test_init_writes_task_section(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "node"

    status, _, _ = _run(capsys, "init", "--data-dir", str(root), "--task", "digits", "--shard", "1/2",
                        "--split", "complementary", "--seed", "7")

    assert status == 0
    task = load(root / "config.toml").task
    assert (task.name, task.index, task.orgs, task.split, task.seed) == ("digits", 1, 2, "complementary", 7)
    assert task.deduction == 0.1


def test_init_iid_keeps_whole_classes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "node"

    status, _, _ = _run(capsys, "init", "--data-dir", str(root), "--task", "digits", "--shard", "0/3")

    assert status == 0
    task = load(root / "config.toml").task
    assert (task.split, task.deduction, task.orgs) == ("iid", 1.0, 3)


# Models -------------------------------------------------------------------------


@pytest.mark.parametrize("task", ["nosuchtask", "DIGITS"])
def test_model_import_unknown_task(tmp_path: Path, capsys: pytest.CaptureFixture[str], task: str) -> None:
    root = _initialised(tmp_path)

    status, _, err = _run(capsys, "model", "import", str(tmp_path / "w.safetensors"), "--name", "x",
                          "--task", task, "--data-dir", str(root))

    assert status == 1
    assert err.strip() == f"error: --task {task!r} is not a known task; known tasks: digits"


class ExportClient:
    """Exports through a real model store and reports its errors as node.api does."""

    def __init__(self, store: ModelStore) -> None:
        self.store = store

    def post(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
        assert path == "/v1/models/export"
        try:
            written = self.store.export(body["model"], Path(body["path"]), overwrite=body["overwrite"])
        except DestinationExists as exc:
            raise ControlError(f"{exc.path} already exists", status=409) from None
        except ModelError as exc:
            raise ControlError(str(exc), status=400) from None
        return {"model": body["model"], "path": str(written)}


def test_export_existing_file_names_option(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    database = Database(tmp_path / "node.db")
    store = ModelStore(tmp_path / "models", database, chunk_size=limits.MIN_CHUNK_SIZE)
    save_file({"w": torch.zeros(4)}, str(tmp_path / "w.safetensors"))
    store.import_file(tmp_path / "w.safetensors", name="mlp", now_ms=1)
    _use_client(monkeypatch, ExportClient(store))
    dest = tmp_path / "out.safetensors"

    try:
        first = _run(capsys, "model", "export", "mlp@1", str(dest), "--data-dir", "unused")
        second = _run(capsys, "model", "export", "mlp@1", str(dest), "--data-dir", "unused")
        third = _run(capsys, "model", "export", "mlp@1", str(dest), "--overwrite", "--data-dir", "unused")
    finally:
        database.close()

    assert first[0] == 0
    assert second[0] == 1
    assert second[2].strip() == f"error: {dest} already exists; choose another path or pass --overwrite"
    assert third[0] == 0


def test_export_other_errors_unchanged(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    class Failing:
        def post(self, path: str, body: Any = None, *, timeout: float | None = None) -> Any:
            raise ControlError("model 'nope' not found")

    _use_client(monkeypatch, Failing())

    status, _, err = _run(capsys, "model", "export", "nope", "out.safetensors", "--data-dir", "unused")

    assert status == 1
    assert err.strip() == "error: model 'nope' not found"


# offers --family ----------------------------------------------------------------


def _offer(family: str, offer_id: str) -> dict[str, Any]:
    return {
        "offer_id": offer_id, "seller": PEER, "offer_key": "mlp@1", "family": family, "total_bytes": 1000,
        "price": 10, "payment": "delivery", "min_gain_ppm": 0, "seq": 1,
    }


def test_offers_family_prefix(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    client = FakeClient({"/v1/offers": [_offer(FAMILY_A, "a" * 64), _offer(FAMILY_B, "b" * 64)]})
    _use_client(monkeypatch, client)

    status, out, _ = _run(capsys, "offers", "--family", "3C15BDE718B0", "--data-dir", "unused", "--json")

    assert status == 0
    assert [offer["family"] for offer in json.loads(out)] == [FAMILY_A]
    assert client.requests == [("/v1/offers", {"family": None})]


def test_offers_whole_family_filtered_by_daemon(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    client = FakeClient({"/v1/offers": [_offer(FAMILY_A, "a" * 64)]})
    _use_client(monkeypatch, client)

    status, out, _ = _run(capsys, "offers", "--family", FAMILY_A, "--data-dir", "unused")

    assert status == 0
    assert client.requests == [("/v1/offers", {"family": FAMILY_A})]
    assert "1 live offer\n" in out


@pytest.mark.parametrize("family", ["3c15bde", "xyz12345", "3c15bde718b0" * 6])
def test_offers_bad_family(family: str, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = _run(capsys, "offers", "--family", family, "--data-dir", "unused")

    assert status == 1
    assert err.startswith(f"error: --family {family!r} must be 8 to 64 hex digits from the start of a model family")


# Counts -------------------------------------------------------------------------


def test_plural() -> None:
    assert cli.plural(0, "deal") == "0 deals"
    assert cli.plural(1, "deal") == "1 deal"
    assert cli.plural(2, "ledger entry", "ledger entries") == "2 ledger entries"
    assert cli.plural(1, "ledger entry", "ledger entries") == "1 ledger entry"


def test_one_peer_singular(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    _use_client(monkeypatch, FakeClient({"/v1/peers": [{"peer_id": PEER, "addrs": []}]}))

    _, out, _ = _run(capsys, "peers", "--data-dir", "unused")

    assert "1 connected peer\n" in out


def test_one_deal_and_entry_singular(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    deal = {"deal_id": "d" * 64, "role": "buyer", "state": "paid", "counterparty": PEER, "price": 5,
            "gain_ppm": 100, "reason": "", "model": "mlp@2"}
    entry = {"index": 0, "deal_id": "d" * 64, "seller": PEER, "buyer": PEER, "outcome": "paid", "amount": 5,
             "gain_ppm": 100, "entry_hash": "e" * 64}
    ledger = {"entries": [entry], "chain": "ok", "balances": {PEER: -5}, "earned": 0, "spent": 5}
    _use_client(monkeypatch, FakeClient({"/v1/deals": [deal], "/v1/ledger": ledger}))

    _, deals_out, _ = _run(capsys, "deals", "--data-dir", "unused")
    _, ledger_out, _ = _run(capsys, "ledger", "--data-dir", "unused")

    assert "1 deal\n" in deals_out
    assert "1 ledger entry (chain ok)" in ledger_out


# Second daemon ------------------------------------------------------------------


def test_second_daemon_names_data_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PMARKET_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    data_dir = DataDir(_initialised(tmp_path))
    first = DaemonLock(data_dir)
    first.acquire()
    try:
        with pytest.raises(DataDirError) as raised:
            DaemonLock(data_dir).acquire()
    finally:
        first.release()

    assert f"stop it with `pmarket node stop --data-dir {data_dir.root}`" in str(raised.value)


def test_second_daemon_default_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_dir = DataDir(_initialised(tmp_path))
    monkeypatch.setenv("PMARKET_DATA_DIR", str(data_dir.root))
    first = DaemonLock(data_dir)
    first.acquire()
    try:
        with pytest.raises(DataDirError) as raised:
            DaemonLock(data_dir).acquire()
    finally:
        first.release()

    assert "stop it with `pmarket node stop` or use another --data-dir" in str(raised.value)


def test_status_counts_model_names_and_versions(monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    status_body = {
        "peer_id": PEER, "addrs": [], "data_dir": "/tmp/x", "pid": 1, "uptime_s": 3.0, "peers": 0, "offers": 0,
        "offers_accepted": {}, "offers_rejected": {}, "models": 1, "model_versions": 2, "deals_open": 0,
        "balance": 0, "metrics_port": None,
    }
    _use_client(monkeypatch, FakeClient({"/v1/status": status_body}))

    status, out, _ = _run(capsys, "status", "--data-dir", "unused")

    assert status == 0
    assert "1 name, 2 versions" in out


def test_refusal_names_offer_minimum(capsys: pytest.CaptureFixture[str]) -> None:
    deal = {"deal_id": "ab" * 16, "state": "refused", "price": 50, "gain_ppm": -88_500, "min_gain_ppm": 10_000,
            "reason": "gain_below_minimum", "detail": "", "model": None}

    cli_trade._print_outcome(deal)

    out = capsys.readouterr().out
    assert "validation loss 8.85% higher" in out
    assert "below the offer's minimum of 1%" in out
    assert "gain_below_minimum" not in out


def test_paid_outcome_names_model(capsys: pytest.CaptureFixture[str]) -> None:
    deal = {"deal_id": "ab" * 16, "state": "paid", "price": 100, "gain_ppm": 350_700, "min_gain_ppm": 0,
            "reason": "ok", "detail": "", "model": "mlp@3"}

    cli_trade._print_outcome(deal)

    out = capsys.readouterr().out
    assert "Paid 100 (validation loss 35.07% lower); model mlp@3" in out


def test_offers_mine_keeps_own_offers(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    other = "12D3KooWQ9Ut3m1HJKv1jTkKRDzX1FVz1Kc4sGLtNrEBTLnHUxJx"
    offers = [
        {"offer_id": "aa" * 32, "seller": PEER, "offer_key": "mlp", "family": FAMILY_A, "total_bytes": 10,
         "price": 100, "payment": "delivery", "min_gain_ppm": 0, "seq": 1},
        {"offer_id": "bb" * 32, "seller": other, "offer_key": "mlp", "family": FAMILY_A, "total_bytes": 10,
         "price": 50, "payment": "delivery", "min_gain_ppm": 0, "seq": 1},
    ]
    _use_client(monkeypatch, FakeClient({"/v1/offers": offers, "/v1/status": {"peer_id": PEER}}))

    status, out, _ = _run(capsys, "offers", "--mine", "--json", "--data-dir", "unused")

    assert status == 0
    assert [offer["offer_id"] for offer in json.loads(out)] == ["aa" * 32]
