"""In-process simulation of the weight market, without a network.

Three regimes run on the same data, model, optimizer and number of epochs:

* siloed: every organization trains one epoch per round on its own shard
  and never trades;
* trading: every organization trains one epoch per round, then buys from
  the others as in "Train 'n Trade" (Huang, Vishwakarma, Sala, NeurIPS
  2023). Each buyer aligns a seller's weights to its own by weight matching
  and tries every mixing weight alpha on its validation set. It keeps the
  best merge when that lowers its validation loss;
* centralized: one model trains on the union of all training shards for
  as many epochs as there are rounds, as a reference.

Decisions inside a run use validation data only; the test set is used for
the final report. Run ``python -m devnet.simulate --help`` for the options.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import Tensor

from node.merge import apply_permutations, match_weights, search_merge
from node.tasks import Dataset, Device, Metrics, Task, TaskData, get_task, task_names

# Organization i starts from build_model(seed * ORG_SEED_STRIDE + i) and
# shuffles its batches with the same number, so organizations differ in
# initialisation and batch order.
ORG_SEED_STRIDE = 1000


@dataclass(frozen=True)
class SimulationConfig:
    """One simulated market."""

    task: str = "digits"
    orgs: int = 4
    rounds: int = 10
    split: str = "complementary"
    deduction: float = 0.1
    seed: int = 0
    align: bool = True
    device: str = "cpu"

    def org_seed(self, org: int) -> int:
        return self.seed * ORG_SEED_STRIDE + org


@dataclass(frozen=True)
class Trade:
    """One buyer's evaluation of one seller's snapshot."""

    round: int  # 0-based
    buyer: int
    seller: int
    alpha: float  # best mixing weight on the grid
    gain: float  # relative drop in the buyer's validation loss at that alpha
    merged: bool  # whether the buyer replaced its model, which happens when gain > 0
    validation_accuracy_before: float
    validation_accuracy_after: float


@dataclass(frozen=True)
class OrgResult:
    """Final test metrics of one organization's siloed and trading models."""

    org: int
    siloed: Metrics
    trading: Metrics

    @property
    def gain_points(self) -> float:
        """Trading minus siloed test accuracy, in percentage points."""
        return 100.0 * (self.trading.accuracy - self.siloed.accuracy)


@dataclass(frozen=True)
class SimulationResult:
    """Everything one simulation measured."""

    config: SimulationConfig
    orgs: tuple[OrgResult, ...]
    centralized: Metrics
    trades: tuple[Trade, ...]
    seconds: dict[str, float] = field(default_factory=dict)  # wall-clock time per regime

    @property
    def mean_siloed_accuracy(self) -> float:
        return float(np.mean([org.siloed.accuracy for org in self.orgs]))

    @property
    def mean_trading_accuracy(self) -> float:
        return float(np.mean([org.trading.accuracy for org in self.orgs]))

    @property
    def mean_gain_points(self) -> float:
        return float(np.mean([org.gain_points for org in self.orgs]))


def _evaluator(
    task: Task, dataset: Dataset, device: Device
) -> Callable[[Mapping[str, Tensor]], Metrics]:
    def evaluate(params: Mapping[str, Tensor]) -> Metrics:
        return task.evaluate(params, dataset, device=device)

    return evaluate


def run_siloed(task: Task, data: TaskData, config: SimulationConfig) -> list[dict[str, Tensor]]:
    """Train every organization alone for ``config.rounds`` epochs; return final params."""
    models = []
    for org in range(data.orgs):
        params = task.initial_params(config.org_seed(org))
        for epoch in range(config.rounds):
            params = task.train_epoch(
                params,
                data.train[org],
                epoch=epoch,
                seed=config.org_seed(org),
                device=config.device,
            )
        models.append(params)
    return models


def run_trading(
    task: Task, data: TaskData, config: SimulationConfig
) -> tuple[list[dict[str, Tensor]], list[Trade]]:
    """Train and trade for ``config.rounds`` rounds; return final params and all trades.

    Each round every organization trains one epoch. Then a snapshot of every
    post-training model is offered to all others. Buyers take turns in
    organization order, and each goes through the other sellers' snapshots
    in an order drawn from (seed, round, buyer). Every offer is aligned to
    and searched against the buyer's current model, which may already
    include merges from this round.
    """
    spec = task.permutation_spec() if config.align else None
    models = [task.initial_params(config.org_seed(org)) for org in range(data.orgs)]
    trades: list[Trade] = []
    for round_index in range(config.rounds):
        models = [
            task.train_epoch(
                models[org],
                data.train[org],
                epoch=round_index,
                seed=config.org_seed(org),
                device=config.device,
            )
            for org in range(data.orgs)
        ]
        snapshots = list(models)
        for buyer in range(data.orgs):
            sellers = [org for org in range(data.orgs) if org != buyer]
            order = np.random.default_rng([config.seed, round_index, buyer]).permutation(sellers)
            evaluate = _evaluator(task, data.validation[buyer], config.device)
            for seller in order.tolist():
                offer = snapshots[seller]
                if spec is not None:
                    offer = apply_permutations(
                        spec, match_weights(spec, models[buyer], offer), offer
                    )
                result = search_merge(models[buyer], offer, evaluate)
                if result.improved:
                    models[buyer] = result.params
                trades.append(
                    Trade(
                        round=round_index,
                        buyer=buyer,
                        seller=seller,
                        alpha=result.alpha,
                        gain=result.gain,
                        merged=result.improved,
                        validation_accuracy_before=result.accuracy_before,
                        validation_accuracy_after=result.accuracy_after,
                    )
                )
    return models, trades


def run_centralized(task: Task, data: TaskData, config: SimulationConfig) -> dict[str, Tensor]:
    """Train one model on the union of all shards for ``config.rounds`` epochs.

    It starts from organization 0's initial weights and uses its seed.
    """
    union = data.union_train()
    params = task.initial_params(config.org_seed(0))
    for epoch in range(config.rounds):
        params = task.train_epoch(
            params, union, epoch=epoch, seed=config.org_seed(0), device=config.device
        )
    return params


def simulate(config: SimulationConfig, task: Task | None = None) -> SimulationResult:
    """Run all three regimes for ``config`` and measure them on the test set.

    ``task`` overrides ``config.task``, for example to try other hyperparameters.
    """
    task = task or get_task(config.task)
    data = task.load_data(
        orgs=config.orgs, split=config.split, deduction=config.deduction, seed=config.seed
    )
    seconds: dict[str, float] = {}

    started = time.perf_counter()
    siloed = run_siloed(task, data, config)
    seconds["siloed"] = time.perf_counter() - started

    started = time.perf_counter()
    trading, trades = run_trading(task, data, config)
    seconds["trading"] = time.perf_counter() - started

    started = time.perf_counter()
    centralized = run_centralized(task, data, config)
    seconds["centralized"] = time.perf_counter() - started

    test = _evaluator(task, data.test, config.device)
    orgs = tuple(
        OrgResult(org=org, siloed=test(siloed[org]), trading=test(trading[org]))
        for org in range(data.orgs)
    )
    return SimulationResult(
        config=config,
        orgs=orgs,
        centralized=test(centralized),
        trades=tuple(trades),
        seconds=seconds,
    )


def format_table(result: SimulationResult) -> str:
    """Render per-organization test accuracies (in %) and the means as text."""
    config = result.config
    lines = [
        f"task={config.task} orgs={config.orgs} rounds={config.rounds} split={config.split} "
        f"deduction={config.deduction} seed={config.seed} align={'on' if config.align else 'off'}",
        f"{'org':>4} {'siloed':>8} {'trading':>8} {'gain pp':>8} {'central':>8} {'merges':>7}",
    ]
    central = 100.0 * result.centralized.accuracy
    for org in result.orgs:
        merges = sum(1 for trade in result.trades if trade.buyer == org.org and trade.merged)
        lines.append(
            f"{org.org:>4} {100.0 * org.siloed.accuracy:>8.2f} {100.0 * org.trading.accuracy:>8.2f} "
            f"{org.gain_points:>+8.2f} {central:>8.2f} {merges:>7}"
        )
    lines.append(
        f"{'mean':>4} {100.0 * result.mean_siloed_accuracy:>8.2f} {100.0 * result.mean_trading_accuracy:>8.2f} "
        f"{result.mean_gain_points:>+8.2f} {central:>8.2f}"
    )
    timing = ", ".join(f"{name} {value:.2f} s" for name, value in result.seconds.items())
    lines.append(f"wall-clock time: {timing}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m devnet.simulate",
        description="Compare siloed, trading and centralized training in one process.",
    )
    parser.add_argument("--task", default="digits", choices=task_names(), help="task to simulate")
    parser.add_argument("--orgs", type=int, default=4, help="number of organizations")
    parser.add_argument(
        "--rounds", type=int, default=10, help="rounds, each one epoch of training (and trading)"
    )
    parser.add_argument("--split", default="complementary", help="data split: complementary or iid")
    parser.add_argument(
        "--deduction",
        type=float,
        default=0.1,
        help="complementary split: share of each weak class, in (0, 1]",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed for the data split and all models"
    )
    parser.add_argument(
        "--no-align", dest="align", action="store_false", help="skip weight matching before merging"
    )
    parser.add_argument("--device", default="cpu", help="torch device, for example cpu or cuda")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    config = SimulationConfig(
        task=args.task,
        orgs=args.orgs,
        rounds=args.rounds,
        split=args.split,
        deduction=args.deduction,
        seed=args.seed,
        align=args.align,
        device=args.device,
    )
    print(format_table(simulate(config)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
