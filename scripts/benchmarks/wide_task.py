"""A task plugin for benchmarks of the trade path: a 100 MiB model, cheap to evaluate.

The model is an MLP of 256 inputs, two hidden layers of 5,000 units and 10
classes: 26,340,010 float32 parameters, 100.5 MiB. The data are Gaussian
clusters drawn from a fixed seed, and each organization validates on 64
examples, so one evaluation costs about 1.7 GFLOP and the merge search, not
the evaluation, is the larger cost of trying weights. Nothing trains on it:
`train_epoch` raises.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from node.merge import PermutationSpec
from node.tasks.base import Dataset, Device, Metrics, Task, TaskData

INPUTS = 256
HIDDEN = 5000
CLASSES = 10
EXAMPLES = 64  # per organization and split


class WideModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.hidden1 = torch.nn.Linear(INPUTS, HIDDEN)
        self.hidden2 = torch.nn.Linear(HIDDEN, HIDDEN)
        self.output = torch.nn.Linear(HIDDEN, CLASSES)


class WideTask(Task):
    name = "wide"

    def build_model(self, seed: int) -> torch.nn.Module:
        model = WideModel()
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for layer in (model.hidden1, model.hidden2, model.output):
                bound = 1.0 / math.sqrt(layer.in_features)
                layer.weight.uniform_(-bound, bound, generator=generator)
                layer.bias.uniform_(-bound, bound, generator=generator)
        return model

    def load_data(self, *, orgs: int, split: str, deduction: float, seed: int) -> TaskData:
        generator = torch.Generator().manual_seed(seed)
        centers = torch.randn(CLASSES, INPUTS, generator=generator)

        def draw(count: int, offset: int) -> Dataset:
            targets = torch.randint(0, CLASSES, (count,), generator=generator)
            inputs = centers[targets] + torch.randn(count, INPUTS, generator=generator)
            return Dataset(inputs=inputs, targets=targets, indices=torch.arange(offset, offset + count))

        train = tuple(draw(EXAMPLES, 2 * index * EXAMPLES) for index in range(orgs))
        validation = tuple(draw(EXAMPLES, (2 * index + 1) * EXAMPLES) for index in range(orgs))
        test = draw(EXAMPLES, 2 * orgs * EXAMPLES)
        return TaskData(train=train, validation=validation, test=test, num_classes=CLASSES,
                        strong_classes=tuple(() for _ in range(orgs)))

    def train_epoch(self, params: Mapping[str, Tensor], shard: Dataset, *, epoch: int, seed: int,
                    device: Device) -> dict[str, Tensor]:
        raise NotImplementedError("the wide benchmark task does not train; create models with --epochs 0")

    def evaluate(self, params: Mapping[str, Tensor], data: Dataset, *, device: Device) -> Metrics:
        with torch.no_grad():
            inputs = data.inputs.to(device)
            hidden = F.relu(F.linear(inputs, params["hidden1.weight"], params["hidden1.bias"]))
            hidden = F.relu(F.linear(hidden, params["hidden2.weight"], params["hidden2.bias"]))
            logits = F.linear(hidden, params["output.weight"], params["output.bias"])
            targets = data.targets.to(device)
            loss = float(F.cross_entropy(logits, targets))
            accuracy = float((logits.argmax(dim=1) == targets).float().mean())
        return Metrics(loss=loss, accuracy=accuracy)

    def permutation_spec(self) -> PermutationSpec | None:
        return None
