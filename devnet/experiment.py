"""The trading experiment: organizations that trade against the same ones alone.

`run_experiment` computes the controls in this process first: every
organization training alone (siloed) and one model trained on all shards
together (centralized), with the same task, model, optimizer, seeds and
epochs as the nodes use. Then it starts a devnet and drives the rounds
through each node's control API: every node trains one epoch and publishes
an offer (phase `prepare`), the runner waits until every node holds every
other node's new offer, and every node's agent buys what it chooses through
the real trade path (phase `trade`). After each round the runner measures
each trading model on the held-out test split, which no node ever sees.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from devnet.network import Devnet, DevnetError, NodeSettings, OrgProcess
from node.client import ControlError

BARRIER_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ExperimentSettings:
    orgs: int = 4
    task: str = "digits"
    rounds: int = 10
    split: str = "complementary"
    deduction: float = 0.1
    seed: int = 0
    align: bool = True
    pricing: str = "nash"
    share: float = 0.5
    reserve_fraction: float = 0.5
    budget: int = 1_000_000
    agent: dict[str, Any] = field(default_factory=dict)
    compete: bool = False
    dir: str = "devnet-data"
    report_dir: str = ""

    def node_settings(self) -> NodeSettings:
        return NodeSettings(
            task=self.task, orgs=self.orgs, split=self.split, deduction=self.deduction, seed=self.seed,
            align=self.align, pricing=self.pricing, share=self.share, reserve_fraction=self.reserve_fraction,
            budget=self.budget, agent={"price": 20, "terms": "gain:0.0001", **self.agent}, compete=self.compete,
        )


@dataclass
class OrgRound:
    round: int
    validation_accuracy: float | None
    test_accuracy: float
    siloed_test_accuracy: float
    bought: int
    sold: int
    spent: int
    earned: int


@dataclass
class ExperimentResult:
    settings: ExperimentSettings
    orgs: list[OrgProcess] = field(default_factory=list)
    rounds: list[list[OrgRound]] = field(default_factory=list)  # [round][org]
    siloed_curves: list[list[float]] = field(default_factory=list)  # [org][round]
    centralized_curve: list[float] = field(default_factory=list)
    trades: list[dict[str, Any]] = field(default_factory=list)
    ledgers_consistent: bool | None = None
    ledger_problems: list[str] = field(default_factory=list)
    status: str = "running"
    seconds: float = 0.0

    @property
    def completed_rounds(self) -> int:
        return len(self.rounds)


def controls(settings: ExperimentSettings) -> tuple[Any, Any, list[list[float]], list[float]]:
    """Siloed and centralized test-accuracy curves, one value per round."""
    from devnet.simulate import ORG_SEED_STRIDE
    from node.tasks import get_task

    task = get_task(settings.task)
    data = task.load_data(orgs=settings.orgs, split=settings.split, deduction=settings.deduction, seed=settings.seed)
    siloed: list[list[float]] = []
    for org in range(settings.orgs):
        seed = settings.seed * ORG_SEED_STRIDE + org
        params = task.initial_params(seed)
        curve = []
        for epoch in range(settings.rounds):
            params = task.train_epoch(params, data.train[org], epoch=epoch, seed=seed, device="cpu")
            curve.append(task.evaluate(params, data.test, device="cpu").accuracy)
        siloed.append(curve)
    union = data.union_train()
    seed = settings.seed * ORG_SEED_STRIDE
    params = task.initial_params(seed)
    centralized = []
    for epoch in range(settings.rounds):
        params = task.train_epoch(params, union, epoch=epoch, seed=seed, device="cpu")
        centralized.append(task.evaluate(params, data.test, device="cpu").accuracy)
    return task, data, siloed, centralized


def _parallel(devnet: Devnet, call: Callable[[OrgProcess], Any]) -> list[Any]:
    """Call every node at once; stop waiting as soon as a node dies."""
    pool = ThreadPoolExecutor(max_workers=len(devnet.orgs))
    try:
        futures = [pool.submit(call, org) for org in devnet.orgs]
        while True:
            done, pending = wait(futures, timeout=0.5, return_when=FIRST_EXCEPTION)
            devnet.check_alive()
            failed = [future for future in done if future.exception() is not None]
            if failed:
                raise failed[0].exception()  # type: ignore[misc]
            if not pending:
                return [future.result() for future in futures]
    finally:
        # Calls still waiting on a dead node fail once the nodes are stopped.
        pool.shutdown(wait=False, cancel_futures=True)


def _phase(org: OrgProcess, *, round_index: int, phase: str) -> Any:
    return org.client.post("/v1/agent/round", {"round": round_index, "phase": phase}, timeout=900.0)


def _barrier(devnet: Devnet, offer_ids: list[str | None]) -> None:
    """Wait until every node holds every other node's offer of this round."""
    wanted = {offer_id for offer_id in offer_ids if offer_id}
    deadline = time.monotonic() + BARRIER_TIMEOUT_S
    while time.monotonic() < deadline:
        devnet.check_alive()
        complete = True
        for org, own in zip(devnet.orgs, offer_ids, strict=True):
            held = {offer["offer_id"] for offer in org.client.get("/v1/offers")}
            if not (wanted - {own}) <= held:
                complete = False
                break
        if complete:
            return
        time.sleep(0.1)
    raise DevnetError(f"offers of the round did not reach every node within {BARRIER_TIMEOUT_S:g} s")


def _test_accuracy(task: Any, data: Any, org: OrgProcess) -> tuple[float, float | None]:
    from safetensors.torch import load_file

    versions = [v for v in org.client.get("/v1/models") if v["name"] == "model"]
    latest = max(versions, key=lambda v: v["version"])
    params = load_file(latest["path"])
    return task.evaluate(params, data.test, device="cpu").accuracy, latest["metrics"].get("val_accuracy")


def _org_round(task: Any, data: Any, org: OrgProcess, round_index: int, siloed: float) -> OrgRound:
    test, validation = _test_accuracy(task, data, org)
    deals = org.client.get("/v1/deals")
    ledger = org.client.get("/v1/ledger")
    return OrgRound(
        round=round_index,
        validation_accuracy=validation,
        test_accuracy=test,
        siloed_test_accuracy=siloed,
        bought=sum(1 for d in deals if d["role"] == "buyer" and d["state"] == "paid"),
        sold=sum(1 for d in deals if d["role"] == "seller" and d["state"] == "paid"),
        spent=ledger["spent"],
        earned=ledger["earned"],
    )


def check_ledgers(orgs: list[OrgProcess]) -> list[str]:
    """Problems with the ledgers: one side missing or holding another receipt, or balances not summing to zero."""
    ledgers = {org.peer_id: org.client.get("/v1/ledger") for org in orgs}
    problems = []
    receipts: dict[str, dict[str, str]] = {}
    total = 0
    for peer, ledger in ledgers.items():
        if ledger["chain"] != "ok":
            problems.append(f"{peer}: ledger chain {ledger['chain']}")
        receipts[peer] = {entry["deal_id"]: entry["receipt"] for entry in ledger["entries"]}
        total += sum(ledger["balances"].values())
        for entry in ledger["entries"]:
            if peer not in (entry["seller"], entry["buyer"]):
                problems.append(f"{peer}: entry {entry['deal_id'][:12]} names neither side as this node")
    for peer, ledger in ledgers.items():
        for entry in ledger["entries"]:
            other = entry["buyer"] if entry["seller"] == peer else entry["seller"]
            theirs = receipts.get(other, {}).get(entry["deal_id"])
            if theirs != entry["receipt"]:
                problems.append(f"deal {entry['deal_id'][:12]}: {peer[-6:]} and {other[-6:]} hold different receipts")
    if total != 0:
        problems.append(f"balances sum to {total}, not 0")
    return problems


def run_experiment(
    settings: ExperimentSettings,
    *,
    on_round: Callable[[ExperimentResult], None] | None = None,
    keep: bool = False,
) -> ExperimentResult:
    """Run controls, start the devnet, drive the rounds and stop every node again."""
    started = time.monotonic()
    result = ExperimentResult(settings)
    task, data, result.siloed_curves, result.centralized_curve = controls(settings)
    devnet = Devnet(Path(settings.dir))
    try:
        devnet.start(settings.orgs, settings.node_settings())
        result.orgs = devnet.orgs
        for round_index in range(settings.rounds):
            devnet.check_alive()
            prepared = _parallel(devnet, functools.partial(_phase, round_index=round_index, phase="prepare"))
            _barrier(devnet, [report["offer_id"] for report in prepared])
            traded = _parallel(devnet, functools.partial(_phase, round_index=round_index, phase="trade"))
            for org, report in zip(devnet.orgs, traded, strict=True):
                for purchase in report["purchases"]:
                    result.trades.append({"round": round_index, "buyer": org.name, **purchase})
            result.rounds.append(
                [
                    _org_round(task, data, org, round_index, result.siloed_curves[org.index][round_index])
                    for org in devnet.orgs
                ]
            )
            if on_round is not None:
                on_round(result)
        result.ledger_problems = check_ledgers(devnet.orgs)
        result.ledgers_consistent = not result.ledger_problems
        result.status = "complete"
    except (DevnetError, ControlError) as exc:
        result.status = f"incomplete: {exc}"
        crash = _find_crash(devnet)
        if crash is not None:
            result.status = f"incomplete: {crash}"
    except KeyboardInterrupt:
        # Ctrl-C or SIGTERM: stop the nodes and report what completed.
        result.status = "incomplete: interrupted"
    finally:
        result.seconds = time.monotonic() - started
        if not keep or result.status != "complete":
            devnet.stop()
    return result


def _find_crash(devnet: Devnet, wait_s: float = 2.0) -> DevnetError | None:
    """Return the error naming a node that is no longer running, or None.

    A node killed by a signal closes its sockets before the kernel marks it
    as exited, so a control request can fail a moment before the process
    looks dead: look again for up to `wait_s` seconds.
    """
    deadline = time.monotonic() + wait_s
    while True:
        try:
            devnet.check_alive()
        except DevnetError as crash:
            return crash
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.1)


def result_json(result: ExperimentResult) -> dict[str, Any]:
    """Build the report.json document (its keys are listed in the README)."""
    last = result.rounds[-1] if result.rounds else []
    orgs = []
    for org in result.orgs:
        final = last[org.index] if last else None
        siloed_curve = result.siloed_curves[org.index] if result.siloed_curves else []
        orgs.append(
            {
                "name": org.name,
                "peer_id": org.peer_id,
                "siloed_accuracy": siloed_curve[result.completed_rounds - 1] if result.completed_rounds else None,
                "trading_accuracy": final.test_accuracy if final else None,
                "validation_accuracy": final.validation_accuracy if final else None,
                "bought": final.bought if final else 0,
                "sold": final.sold if final else 0,
                "spent": final.spent if final else 0,
                "earned": final.earned if final else 0,
                "trading_curve": [rounds[org.index].test_accuracy for rounds in result.rounds],
                "siloed_curve": siloed_curve[: result.completed_rounds],
            }
        )
    return {
        "status": result.status,
        "rounds": result.settings.rounds,
        "completed_rounds": result.completed_rounds,
        "settings": asdict(result.settings),
        "orgs": orgs,
        "centralized_accuracy": result.centralized_curve[result.completed_rounds - 1] if result.completed_rounds else None,
        "centralized_curve": result.centralized_curve[: result.completed_rounds],
        "ledgers_consistent": result.ledgers_consistent,
        "ledger_problems": result.ledger_problems,
        "trades": result.trades,
        "seconds": round(result.seconds, 1),
    }
