"""The README's trade between two nodes, as a user types it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import safetensors.numpy

from tests.e2e.processes import Daemon, run, run_json

pytestmark = pytest.mark.e2e


def test_two_terminal_trade(tmp_path: Path) -> None:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    run("init", "--data-dir", str(alice), "--task", "digits", "--shard", "0/2", "--split", "complementary")
    run("init", "--data-dir", str(bob), "--task", "digits", "--shard", "1/2", "--split", "complementary")
    daemons = [Daemon(alice)]
    try:
        address = daemons[0].wait_ready()["addrs"][0]
        daemons.append(Daemon(bob, "--bootstrap", address))
        daemons[1].wait_ready()

        run("model", "init", "mlp", "--epochs", "3", "--data-dir", str(alice))
        offer = run_json("offer", "publish", "mlp", "--price", "100", "--data-dir", str(alice))
        run("model", "init", "mlp", "--epochs", "3", "--data-dir", str(bob))
        deadline = 30
        offers: list[dict[str, object]] = []
        import time

        started = time.monotonic()
        while time.monotonic() - started < deadline and not offers:
            offers = run_json("offers", "--data-dir", str(bob))
            time.sleep(0.2)
        assert [o["offer_id"] for o in offers] == [offer["offer_id"]]

        bought = run("buy", str(offer["offer_id"])[:16], "--data-dir", str(bob))
        assert "Paid 100" in bought.stdout
        deals = run_json("deals", "--data-dir", str(bob))
        assert [d["state"] for d in deals] == ["paid"]
        models = run_json("models", "--data-dir", str(bob))
        assert [m["source"] for m in models] == ["init", "train", "merge"]

        bob_ledger = run_json("ledger", "--data-dir", str(bob))
        alice_ledger = run_json("ledger", "--data-dir", str(alice))
        assert [e["receipt"] for e in bob_ledger["entries"]] == [e["receipt"] for e in alice_ledger["entries"]]
        assert bob_ledger["chain"] == "ok"
        assert bob_ledger["spent"] == 100
        assert alice_ledger["earned"] == 100
        table = run("ledger", "--data-dir", str(alice)).stdout
        assert "chain ok" in table
    finally:
        for daemon in daemons:
            daemon.stop()


def test_import_rejects_pickle_with_advice(tmp_path: Path, ) -> None:
    node = tmp_path / "node"
    run("init", "--data-dir", str(node))
    daemon = Daemon(node)
    try:
        daemon.wait_ready()
        checkpoint = tmp_path / "model.pt"
        import pickle

        checkpoint.write_bytes(pickle.dumps({"weight": [1.0, 2.0]}))
        result = run("model", "import", str(checkpoint), "--name", "m", "--data-dir", str(node), check=False)
        assert result.returncode == 1
        assert "weights_only=True" in result.stderr
        assert "save_file" in result.stderr

        good = tmp_path / "good.safetensors"
        safetensors.numpy.save_file({"w": np.ones((4, 4), np.float32)}, str(good))
        imported = run_json("model", "import", str(good), "--name", "m", "--data-dir", str(node))
        assert imported["ref"] == "m@1"
        exported = tmp_path / "out.safetensors"
        run("model", "export", "m", str(exported), "--data-dir", str(node))
        assert exported.read_bytes() == good.read_bytes()
        listed = json.loads(run("models", "--data-dir", str(node), "--json").stdout)
        assert [m["ref"] for m in listed] == ["m@1"]
    finally:
        daemon.stop()
