"""Try delivered weights before paying, and the other jobs that workers run.

Everything here blocks and may use a GPU, so the node calls it inside a
`node.workers.WorkerPool` job with that job's device. Importing this module
does not import torch: the functions import it when they run.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from protocol.errors import Reason

if TYPE_CHECKING:
    from torch import Tensor

    from node.config import TaskSection
    from node.tasks import Dataset, Task

DECISIONS = ("merge", "keep", "outright", "invalid")


@dataclass
class Evaluation:
    """Verdict on one delivery of weights, measured on this node's validation data.

    ``decision`` is one of:

    * "merge": the delivery fits the local model, and merging lowers the
      validation loss by more than the minimum gain. ``merged`` is the
      full merged model.
    * "keep": the delivery is valid, but merging does not gain enough.
    * "outright": there is no local model, task or validation data to
      merge with, so the delivery can only be stored as a model of its own.
    * "invalid": the delivery cannot be used. ``reason`` is the code to
      put in a refusal, and ``problems`` lists every problem, each naming
      its tensor.
    """

    decision: str
    reason: Reason
    problems: list[str]
    gain: float | None = None  # (loss_before - loss_after) / loss_before
    alpha: float | None = None  # weight of the delivery in the best merge
    loss_before: float | None = None
    loss_after: float | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    merged: dict[str, Tensor] | None = None  # CPU tensors, only for "merge"
    # Seconds the alpha search spent interpolating, apart from its evaluations.
    merge_seconds: float = 0.0


def _invalid(reason: Reason, problems: list[str]) -> Evaluation:
    return Evaluation(decision="invalid", reason=reason, problems=problems)


def evaluate_delivery(
    delivered: Path,
    *,
    local: Mapping[str, Tensor] | None,
    task: Task | None,
    validation: Dataset | None,
    align: bool,
    device: str,
    min_gain: float = 0.0,
) -> Evaluation:
    """Decide what to do with a delivered safetensors file.

    The file is read with the safetensors library only, then every
    floating-point tensor must be finite. With a task, the delivery must
    fit the task's model (a subset of its tensors is allowed). With a local
    model, a task and validation data, the delivery must also fit the local
    model. Its hidden units are then aligned to the local model's, when
    ``align`` is true and the task defines a permutation spec, and
    `search_merge` picks the best mixing weight. Tensors that the delivery
    lacks keep their local values. ``min_gain`` is a fraction, not parts per million.
    An OSError (a missing file, say) is this node's problem, not the
    seller's, so it propagates instead of becoming an "invalid" verdict.
    """
    import safetensors
    from safetensors.torch import load_file

    from node.merge import check_compatible, check_finite

    try:
        incoming = load_file(str(delivered), device="cpu")
    except safetensors.SafetensorError as exc:
        return _invalid(Reason.INVALID_WEIGHTS, [f"{delivered} is not a valid safetensors file: {exc}"])
    if not incoming:
        return _invalid(Reason.INVALID_WEIGHTS, [f"{delivered} contains no tensors"])

    problems = check_finite(incoming)
    if problems:
        return _invalid(Reason.NON_FINITE, problems)

    if task is not None:
        problems = check_compatible(_task_template(task), incoming)
        if problems:
            return _invalid(Reason.TENSOR_MISMATCH, problems)

    if local is None or task is None or validation is None:
        return _outright(incoming, task, validation, device)

    problems = check_compatible(local, incoming)
    if problems:
        return _invalid(Reason.TENSOR_MISMATCH, problems)
    return _merge(incoming, local, task, validation, align=align, device=device, min_gain=min_gain)


def _outright(
    incoming: dict[str, Tensor], task: Task | None, validation: Dataset | None, device: str
) -> Evaluation:
    """Return an "outright" verdict, with validation metrics when they can be measured.

    The delivery is measured only when it contains every tensor of the task's
    model, because a partial delivery has nothing to fill the rest from.
    """
    evaluation = Evaluation(decision="outright", reason=Reason.OK, problems=[])
    if task is None or validation is None:
        return evaluation
    if set(incoming) != set(_task_template(task)):
        return evaluation
    metrics = task.evaluate(incoming, validation, device=device)
    evaluation.loss_after = metrics.loss
    evaluation.accuracy_after = metrics.accuracy
    return evaluation


_templates: weakref.WeakKeyDictionary[Task, dict[str, Tensor]] = weakref.WeakKeyDictionary()
_templates_lock = threading.Lock()


def _task_template(task: Task) -> dict[str, Tensor]:
    """Return the task model's tensors on the meta device: names, dtypes and shapes, no data."""
    with _templates_lock:
        template = _templates.get(task)
        if template is None:
            template = {
                name: tensor.to("meta") for name, tensor in task.initial_params(0).items()
            }
            _templates[task] = template
    return template


def _merge(
    incoming: dict[str, Tensor],
    local: Mapping[str, Tensor],
    task: Task,
    validation: Dataset,
    *,
    align: bool,
    device: str,
    min_gain: float,
) -> Evaluation:
    from node.merge import HasLossAndAccuracy, apply_permutations, match_weights, search_merge

    # Interpolating on the job's device saves a copy per evaluated alpha.
    local_on_device = {name: tensor.to(device) for name, tensor in local.items()}
    incoming_on_device = {name: tensor.to(device) for name, tensor in incoming.items()}
    spec = task.permutation_spec() if align else None
    if spec is not None:
        permutations = match_weights(spec, local_on_device, incoming_on_device)
        incoming_on_device = apply_permutations(spec, permutations, incoming_on_device)

    evaluating = 0.0

    def evaluate(params: Mapping[str, Tensor]) -> HasLossAndAccuracy:
        nonlocal evaluating
        started = time.perf_counter()
        metrics = task.evaluate(params, validation, device=device)
        evaluating += time.perf_counter() - started
        return metrics

    started = time.perf_counter()
    result = search_merge(local_on_device, incoming_on_device, evaluate)
    merge_seconds = time.perf_counter() - started - evaluating
    improved = result.gain > min_gain
    return Evaluation(
        decision="merge" if improved else "keep",
        reason=Reason.OK,
        problems=[],
        gain=result.gain,
        alpha=result.alpha,
        loss_before=result.loss_before,
        loss_after=result.loss_after,
        accuracy_before=result.accuracy_before,
        accuracy_after=result.accuracy_after,
        merged={name: tensor.cpu() for name, tensor in result.params.items()} if improved else None,
        merge_seconds=merge_seconds,
    )


def train_job(
    task: Task,
    params: Mapping[str, Tensor],
    shard: Dataset,
    *,
    epoch: int,
    seed: int,
    device: str,
) -> dict[str, Tensor]:
    """Train ``params`` for one epoch on ``device`` and return the result as CPU tensors."""
    on_device = {name: tensor.to(device) for name, tensor in params.items()}
    trained = task.train_epoch(on_device, shard, epoch=epoch, seed=seed, device=device)
    return {name: tensor.cpu() for name, tensor in trained.items()}


@dataclass(frozen=True)
class LocalData:
    """This organization's task, training shard and validation set."""

    task: Task
    train: Dataset
    validation: Dataset


_local_data: dict[tuple[str, int, int, str, float, int], LocalData] = {}
_local_data_lock = threading.Lock()


def local_task_data(section: TaskSection) -> LocalData | None:
    """Load the data that the ``[task]`` section names, once per distinct section.

    Returns None when ``name`` is empty. The first call blocks for a few
    seconds for the digits task, mostly to import torch and scikit-learn,
    so call it in a worker thread. Raises ValueError for an unknown task or a bad split.
    """
    if not section.name:
        return None
    if not 0 <= section.index < section.orgs:
        raise ValueError(
            f"[task] index is {section.index}; it must be in 0..{section.orgs - 1} for orgs = {section.orgs}"
        )
    key = (section.name, section.orgs, section.index, section.split, section.deduction, section.seed)
    with _local_data_lock:
        cached = _local_data.get(key)
        if cached is None:
            from node.tasks import get_task

            task = get_task(section.name)
            data = task.load_data(
                orgs=section.orgs, split=section.split, deduction=section.deduction, seed=section.seed
            )
            cached = LocalData(
                task=task, train=data.train[section.index], validation=data.validation[section.index]
            )
            _local_data[key] = cached
    return cached
