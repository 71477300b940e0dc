"""The built-in ``digits`` task: an MLP on scikit-learn's 8x8 handwritten digits.

The data is ``sklearn.datasets.load_digits()``: 1797 images of 64 pixels
with integer intensities 0..16, in 10 classes of 174 to 183 images, bundled
with scikit-learn so nothing is downloaded.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor

from node.merge import PermutationSpec
from node.tasks.base import Dataset, Device, Metrics, Task, TaskData

NUM_FEATURES = 64
NUM_CLASSES = 10
HALF_INTENSITY = 8.0  # pixel intensities are integers 0..16

# Fractions of every class held out before the training shards are cut.
TEST_FRACTION = 0.2
VALIDATION_FRACTION = 0.2

SPLITS = ("complementary", "iid")


@dataclass(frozen=True)
class DigitsHyperparameters:
    """Model and SGD settings shared by every organization.

    Epoch ``e`` (counted from 0) trains with learning rate
    ``learning_rate / (1 + learning_rate_decay * e)``.
    """

    hidden_sizes: tuple[int, ...] = (128,)
    learning_rate: float = 0.05
    learning_rate_decay: float = 0.1
    momentum: float = 0.9
    batch_size: int = 8
    weight_decay: float = 0.0


@functools.cache
def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """Load the images, mapped from intensities 0..16 to [-1, 1], and the labels."""
    bunch = load_digits()
    # A fixed map needs no statistics, so no data (test data included) leaks
    # into any organization's inputs, and all models share one input space,
    # which interpolating weights requires. A scaler fitted per organization
    # would give each model its own input space. Centring on 0 trained and
    # merged better than [0, 1] in devnet.simulate runs on seeds 0 to 4.
    inputs = np.asarray(bunch.data, dtype=np.float32) / HALF_INTENSITY - 1.0  # (1797, 64)
    targets = np.asarray(bunch.target, dtype=np.int64)  # (1797,)
    inputs.setflags(write=False)
    targets.setflags(write=False)
    return inputs, targets


def _dataset(rows: np.ndarray) -> Dataset:
    inputs, targets = _digits_arrays()
    rows = np.sort(rows)
    return Dataset(
        inputs=torch.from_numpy(inputs[rows].copy()),
        targets=torch.from_numpy(targets[rows].copy()),
        indices=torch.from_numpy(rows.astype(np.int64)),
    )


def _proportional_counts(total: int, weights: Sequence[float]) -> list[int]:
    """Split ``total`` into integers proportional to ``weights`` (largest remainder)."""
    exact = np.asarray(weights, dtype=np.float64) * total / float(sum(weights))
    counts = np.floor(exact).astype(np.int64)
    shortfall = total - int(counts.sum())
    # Stable sort, so equal remainders go to the lowest index first.
    for position in np.argsort(-(exact - counts), kind="stable")[:shortfall]:
        counts[position] += 1
    return [int(count) for count in counts]


def _mlp_logits(params: Mapping[str, Tensor], inputs: Tensor, depth: int) -> Tensor:
    """Compute the MLP's logits, shape (N, 10), from inputs of shape (N, 64)."""
    activations = inputs
    for layer in range(1, depth + 1):
        activations = F.relu(
            F.linear(activations, params[f"hidden{layer}.weight"], params[f"hidden{layer}.bias"])
        )
    return F.linear(activations, params["output.weight"], params["output.bias"])


class DigitsMLP(torch.nn.Module):
    """ReLU MLP with layers ``hidden1`` ... ``hiddenK`` and ``output``."""

    def __init__(self, hidden_sizes: Sequence[int]) -> None:
        super().__init__()
        self.depth = len(hidden_sizes)
        sizes = [NUM_FEATURES, *hidden_sizes]
        for layer in range(1, self.depth + 1):
            # Built on the meta device so construction draws nothing from
            # torch's global random generator; `build_model` fills the values.
            self.add_module(
                f"hidden{layer}", torch.nn.Linear(sizes[layer - 1], sizes[layer], device="meta")
            )
        self.output = torch.nn.Linear(sizes[-1], NUM_CLASSES, device="meta")

    def forward(self, inputs: Tensor) -> Tensor:
        return _mlp_logits(dict(self.named_parameters()), inputs, self.depth)


class DigitsTask(Task):
    """Classify scikit-learn's 8x8 digits with a small MLP.

    Splits (both deterministic in ``seed``):

    * First, every class is shuffled and cut into a test part
      (``TEST_FRACTION``), a validation part (``VALIDATION_FRACTION``) and a
      training pool (the rest), so all three are stratified and disjoint.
    * Validation is balanced: each class's validation part is dealt out in
      near-equal shares to the organizations. An organization cares about
      the whole task, and the test set is balanced too, so a merge should be
      judged on all classes. On an organization's own skewed mix, its weak
      classes would carry little weight, so the merges that teach them, which
      are the point of trading, would look worthless.
    * ``complementary``: the classes are shuffled and cut into ``orgs``
      disjoint groups of near-equal size, one strong group per organization
      (so ``orgs`` may be at most 10). Each class's training pool is divided
      among all organizations in the ratio 1 for its owner to ``deduction``
      for each other organization. So every organization holds ``deduction``
      times as many examples of each weak class as the owner holds of it,
      the shards are disjoint, and the whole pool is used for any ``orgs``
      and any 0 < deduction <= 1. With ``deduction = 1`` the split is iid
      within each class. With 4 organizations and deduction 0.1, the owner
      holds 1 / 1.3 = 77% of a class and each other organization 7.7%.
    * ``iid``: the training pool is shuffled and cut into ``orgs`` near-equal
      shards. ``deduction`` is ignored.
    """

    name = "digits"

    def __init__(self, hyperparameters: DigitsHyperparameters | None = None) -> None:
        self.hyperparameters = hyperparameters or DigitsHyperparameters()
        self._shapes = {
            name: tuple(tensor.shape) for name, tensor in self.build_model(0).state_dict().items()
        }

    # Model

    def build_model(self, seed: int) -> DigitsMLP:
        model = DigitsMLP(self.hyperparameters.hidden_sizes).to_empty(device="cpu")
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for module in model.children():
                assert isinstance(module, torch.nn.Linear)
                # Kaiming-uniform weights suit ReLU; the bias bound matches
                # torch.nn.Linear's default.
                bound = (6.0 / module.in_features) ** 0.5
                module.weight.uniform_(-bound, bound, generator=generator)
                bias_bound = module.in_features**-0.5
                module.bias.uniform_(-bias_bound, bias_bound, generator=generator)
        return model

    def permutation_spec(self) -> PermutationSpec:
        depth = len(self.hyperparameters.hidden_sizes)
        axes: dict[str, tuple[tuple[str, int], ...]] = {}
        for layer in range(1, depth + 1):
            consumer = f"hidden{layer + 1}" if layer < depth else "output"
            axes[f"hidden{layer}"] = (
                (f"hidden{layer}.weight", 0),
                (f"hidden{layer}.bias", 0),
                (f"{consumer}.weight", 1),
            )
        return PermutationSpec(axes)

    # Data

    def load_data(self, *, orgs: int, split: str, deduction: float, seed: int) -> TaskData:
        if split not in SPLITS:
            raise ValueError(
                f"unknown split {split!r} for task digits; use one of {', '.join(SPLITS)}"
            )
        if not 1 <= orgs <= NUM_CLASSES:
            raise ValueError(
                f"orgs is {orgs}; the digits task supports 1 to {NUM_CLASSES} organizations"
            )
        if split == "complementary" and not 0.0 < deduction <= 1.0:
            raise ValueError(f"deduction is {deduction}; it must be in (0, 1]")
        if seed < 0:
            raise ValueError(f"seed is {seed}; it must be a non-negative integer")

        _, targets = _digits_arrays()
        rng = np.random.default_rng(seed)
        test_rows: list[np.ndarray] = []
        validation_rows: list[list[np.ndarray]] = [[] for _ in range(orgs)]
        pool_by_class: list[np.ndarray] = []
        for label in range(NUM_CLASSES):
            rows = rng.permutation(np.flatnonzero(targets == label))
            test_count = round(TEST_FRACTION * len(rows))
            validation_count = round(VALIDATION_FRACTION * len(rows))
            test_rows.append(rows[:test_count])
            shares = np.array_split(rows[test_count : test_count + validation_count], orgs)
            for share_index, share in enumerate(shares):
                # Rotating by class spreads the larger shares over organizations.
                validation_rows[(share_index + label) % orgs].append(share)
            pool_by_class.append(rows[test_count + validation_count :])

        if split == "complementary":
            groups = np.array_split(rng.permutation(NUM_CLASSES), orgs)
            strong_classes = tuple(tuple(sorted(int(label) for label in group)) for group in groups)
            train_rows = self._complementary_shards(pool_by_class, strong_classes, deduction)
        else:
            strong_classes = tuple(() for _ in range(orgs))
            pool = rng.permutation(np.concatenate(pool_by_class))
            train_rows = list(np.array_split(pool, orgs))

        return TaskData(
            train=tuple(_dataset(rows) for rows in train_rows),
            validation=tuple(_dataset(np.concatenate(parts)) for parts in validation_rows),
            test=_dataset(np.concatenate(test_rows)),
            num_classes=NUM_CLASSES,
            strong_classes=strong_classes,
        )

    @staticmethod
    def _complementary_shards(
        pool_by_class: list[np.ndarray],
        strong_classes: tuple[tuple[int, ...], ...],
        deduction: float,
    ) -> list[np.ndarray]:
        orgs = len(strong_classes)
        owner_of = {label: org for org, group in enumerate(strong_classes) for label in group}
        parts: list[list[np.ndarray]] = [[] for _ in range(orgs)]
        for label, rows in enumerate(pool_by_class):
            weights = [1.0 if org == owner_of[label] else deduction for org in range(orgs)]
            start = 0
            for org, count in enumerate(_proportional_counts(len(rows), weights)):
                parts[org].append(rows[start : start + count])
                start += count
        return [np.concatenate(org_parts) for org_parts in parts]

    # Training and evaluation

    def _check_params(self, params: Mapping[str, Tensor]) -> None:
        problems = [f"missing {name}" for name in self._shapes if name not in params]
        for name, tensor in params.items():
            expected = self._shapes.get(name)
            if expected is None:
                problems.append(f"unexpected {name}")
            elif tuple(tensor.shape) != expected:
                problems.append(f"{name} has shape {tuple(tensor.shape)}, expected {expected}")
        if problems:
            raise ValueError(
                f"parameters do not fit the digits model with hidden sizes "
                f"{self.hyperparameters.hidden_sizes}: {'; '.join(problems)}"
            )

    def train_epoch(
        self,
        params: Mapping[str, Tensor],
        shard: Dataset,
        *,
        epoch: int,
        seed: int,
        device: Device,
    ) -> dict[str, Tensor]:
        self._check_params(params)
        if epoch < 0 or seed < 0:
            raise ValueError(f"epoch is {epoch} and seed is {seed}; both must be non-negative")

        hyper = self.hyperparameters
        device = torch.device(device)
        # The result goes back to each tensor's own device and dtype.
        originals = {name: (tensor.device, tensor.dtype) for name, tensor in params.items()}
        weights = {
            name: tensor.detach()
            .to(device=device, dtype=torch.float32, copy=True)
            .requires_grad_(True)
            for name, tensor in params.items()
        }
        # Momentum buffers start at zero on every call, so the result depends
        # on the parameters alone and not on an earlier epoch's optimizer.
        optimizer = torch.optim.SGD(
            list(weights.values()),
            lr=hyper.learning_rate / (1.0 + hyper.learning_rate_decay * epoch),
            momentum=hyper.momentum,
            weight_decay=hyper.weight_decay,
        )
        # A CPU generator seeded from (seed, epoch) fixes the batch order on
        # any device without touching torch's global generator.
        order_seed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])
        order = torch.randperm(len(shard), generator=torch.Generator().manual_seed(order_seed))
        order = order.to(device)  # (N,)

        inputs = shard.inputs.to(device)  # (N, 64)
        targets = shard.targets.to(device)  # (N,)
        depth = len(hyper.hidden_sizes)
        for start in range(0, len(shard), hyper.batch_size):
            batch = order[start : start + hyper.batch_size]
            loss = F.cross_entropy(_mlp_logits(weights, inputs[batch], depth), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)  # loss.backward(), which mypy sees as untyped
            optimizer.step()

        return {
            name: tensor.detach().to(device=originals[name][0], dtype=originals[name][1])
            for name, tensor in weights.items()
        }

    def evaluate(self, params: Mapping[str, Tensor], data: Dataset, *, device: Device) -> Metrics:
        self._check_params(params)
        if len(data) == 0:
            raise ValueError("the evaluation data set is empty; pass at least one example")
        device = torch.device(device)
        weights = {
            name: tensor.detach().to(device=device, dtype=torch.float32)
            for name, tensor in params.items()
        }
        with torch.no_grad():
            logits = _mlp_logits(
                weights, data.inputs.to(device), len(self.hyperparameters.hidden_sizes)
            )
            targets = data.targets.to(device)
            loss = F.cross_entropy(logits, targets).item()
            accuracy = (logits.argmax(dim=1) == targets).float().mean().item()
        return Metrics(loss=loss, accuracy=accuracy)
