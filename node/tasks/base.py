"""The task plugin interface: model, data, one epoch of training, evaluation.

A task is everything a node needs to train, trade and judge weights for one
learning problem. Nodes call tasks from worker threads, so implementations
must not rely on global state such as torch's default random generator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor

from node.merge import PermutationSpec

Device = torch.device | str


@dataclass(frozen=True)
class Dataset:
    """Labelled examples held as CPU tensors.

    ``inputs`` has shape (N, ...) and dtype float32, ``targets`` has shape
    (N,) and contains int64 class ids, and ``indices`` has shape (N,) and
    contains each example's int64 row number in the task's full data set, so
    that splits can be checked for overlap.
    """

    inputs: Tensor
    targets: Tensor
    indices: Tensor

    def __post_init__(self) -> None:
        lengths = {len(self.inputs), len(self.targets), len(self.indices)}
        if len(lengths) != 1:
            raise ValueError(
                f"inputs, targets and indices have {len(self.inputs)}, {len(self.targets)} and "
                f"{len(self.indices)} rows; they must have the same number"
            )

    def __len__(self) -> int:
        return len(self.targets)

    def class_counts(self, num_classes: int) -> list[int]:
        return torch.bincount(self.targets, minlength=num_classes).tolist()

    @staticmethod
    def concatenate(parts: list[Dataset]) -> Dataset:
        if not parts:
            raise ValueError("no datasets to concatenate; pass at least one")
        return Dataset(
            inputs=torch.cat([part.inputs for part in parts]),
            targets=torch.cat([part.targets for part in parts]),
            indices=torch.cat([part.indices for part in parts]),
        )


@dataclass(frozen=True)
class TaskData:
    """All data for one market: per organization a training shard and a
    validation set, and one test set that no organization trains or
    validates on.

    ``strong_classes[i]`` lists the classes that organization i owns under a
    skewed split, and is empty for an iid split.
    """

    train: tuple[Dataset, ...]
    validation: tuple[Dataset, ...]
    test: Dataset
    num_classes: int
    strong_classes: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.train) != len(self.validation) or len(self.train) != len(self.strong_classes):
            raise ValueError(
                f"got {len(self.train)} training shards, {len(self.validation)} validation sets and "
                f"{len(self.strong_classes)} strong-class lists; there must be one of each per organization"
            )

    @property
    def orgs(self) -> int:
        return len(self.train)

    def union_train(self) -> Dataset:
        """Return all organizations' training shards as one data set."""
        return Dataset.concatenate(list(self.train))


@dataclass(frozen=True)
class Metrics:
    """Evaluation of one set of parameters on one data set."""

    loss: float  # mean cross-entropy in nats
    accuracy: float  # fraction of examples classified correctly, in [0, 1]


class Task(ABC):
    """A learning problem that nodes train on and trade weights for."""

    name: str

    @abstractmethod
    def build_model(self, seed: int) -> torch.nn.Module:
        """Return a freshly initialised model on the CPU, deterministic in ``seed``.

        Its ``state_dict()`` names are the tensor names in safetensors files
        and trade offers.
        """

    @abstractmethod
    def load_data(self, *, orgs: int, split: str, deduction: float, seed: int) -> TaskData:
        """Split the task's data among ``orgs`` organizations, deterministic in ``seed``.

        ``split`` names the partition scheme, and ``deduction`` (0 < D <= 1)
        is how much of its weak classes a skewed split leaves an organization.
        """

    @abstractmethod
    def train_epoch(
        self,
        params: Mapping[str, Tensor],
        shard: Dataset,
        *,
        epoch: int,
        seed: int,
        device: Device,
    ) -> dict[str, Tensor]:
        """Train for one epoch and return the new parameters.

        The result depends only on the arguments: optimizer state starts
        fresh on every call, and the batch order derives from (seed, epoch).
        On the CPU, equal arguments give identical results for a given torch
        build and thread count. The inputs are not modified, and the result
        is on the device the inputs were on.

        NOTE: a different ``torch.get_num_threads()`` can change the last
        bits of the result, because matrix products then sum in another
        order. CUDA kernels are not guaranteed to be bitwise reproducible.
        """

    @abstractmethod
    def evaluate(self, params: Mapping[str, Tensor], data: Dataset, *, device: Device) -> Metrics:
        """Return mean cross-entropy and accuracy of ``params`` on ``data``."""

    @abstractmethod
    def permutation_spec(self) -> PermutationSpec | None:
        """Return the hidden-unit permutations for weight matching, or None
        when the model has no permutation symmetry to exploit."""

    def initial_params(self, seed: int) -> dict[str, Tensor]:
        """Return the initial parameters of ``build_model(seed)`` as detached CPU tensors."""
        return {
            name: tensor.detach().clone()
            for name, tensor in self.build_model(seed).state_dict().items()
        }
