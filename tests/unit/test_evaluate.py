"""Tests for evaluating delivered weights on the digits task, and the worker jobs."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from node.config import TaskSection
from node.evaluate import Evaluation, evaluate_delivery, local_task_data, train_job
from node.merge import DEFAULT_ALPHAS
from node.tasks import Dataset, TaskData
from node.tasks.digits import DigitsTask
from protocol.errors import Reason

EPOCHS = 5
# Accept any merge, so that tests of the merge arithmetic do not depend on
# whether the merge happens to help.
ANY_GAIN = -math.inf


@pytest.fixture(scope="module")
def task() -> DigitsTask:
    return DigitsTask()


@pytest.fixture(scope="module")
def data(task: DigitsTask) -> TaskData:
    return task.load_data(orgs=2, split="iid", deduction=1.0, seed=0)


def _train(task: DigitsTask, shard: Dataset, seed: int, epochs: int) -> dict[str, Tensor]:
    params = task.initial_params(seed)
    for epoch in range(epochs):
        params = task.train_epoch(params, shard, epoch=epoch, seed=seed, device="cpu")
    return params


@pytest.fixture(scope="module")
def local(task: DigitsTask, data: TaskData) -> dict[str, Tensor]:
    return _train(task, data.train[0], seed=0, epochs=EPOCHS)


@pytest.fixture(scope="module")
def peer(task: DigitsTask, data: TaskData) -> dict[str, Tensor]:
    """A model trained on the same shard from another initialisation."""
    return _train(task, data.train[0], seed=1, epochs=EPOCHS)


def _save(path: Path, tensors: dict[str, Tensor]) -> Path:
    save_file(tensors, str(path))
    return path


def test_trained_delivery_gain_finite(
    task: DigitsTask, data: TaskData, local: dict[str, Tensor], peer: dict[str, Tensor], tmp_path: Path
) -> None:
    delivered = _save(tmp_path / "peer.safetensors", peer)

    result = evaluate_delivery(
        delivered, local=local, task=task, validation=data.validation[0], align=True, device="cpu"
    )

    assert result.decision in ("merge", "keep")
    assert result.reason == Reason.OK
    assert result.problems == []
    assert result.gain is not None
    assert math.isfinite(result.gain)
    assert result.alpha in DEFAULT_ALPHAS
    assert result.loss_before == pytest.approx(task.evaluate(local, data.validation[0], device="cpu").loss)
    assert (result.merged is not None) == (result.decision == "merge")


def test_merge_decision_follows_min_gain(
    task: DigitsTask, data: TaskData, local: dict[str, Tensor], peer: dict[str, Tensor], tmp_path: Path
) -> None:
    delivered = _save(tmp_path / "peer.safetensors", peer)

    # A gain is at most 1 (the loss cannot fall below 0), so 1.0 is never beaten.
    result = evaluate_delivery(
        delivered, local=local, task=task, validation=data.validation[0], align=True,
        device="cpu", min_gain=1.0,
    )

    assert result.decision == "keep"
    assert result.merged is None


def test_undertrained_local_merges(
    task: DigitsTask, data: TaskData, peer: dict[str, Tensor], tmp_path: Path
) -> None:
    weak = task.initial_params(0)  # untrained, so a trained delivery lowers its loss
    delivered = _save(tmp_path / "peer.safetensors", peer)

    result = evaluate_delivery(
        delivered, local=weak, task=task, validation=data.validation[0], align=True, device="cpu"
    )

    assert result.decision == "merge"
    assert result.gain is not None
    assert result.gain > 0
    assert result.loss_after is not None
    assert result.loss_before is not None
    assert result.loss_after < result.loss_before
    assert result.merged is not None
    assert all(tensor.device.type == "cpu" for tensor in result.merged.values())


def test_nan_tensor_non_finite(
    task: DigitsTask, data: TaskData, local: dict[str, Tensor], peer: dict[str, Tensor], tmp_path: Path
) -> None:
    broken = dict(peer)
    broken["output.bias"] = peer["output.bias"].clone()
    broken["output.bias"][3] = math.nan
    delivered = _save(tmp_path / "nan.safetensors", broken)

    result = evaluate_delivery(
        delivered, local=local, task=task, validation=data.validation[0], align=True, device="cpu"
    )

    assert result.decision == "invalid"
    assert result.reason == Reason.NON_FINITE
    assert len(result.problems) == 1
    assert result.problems[0].startswith("output.bias: 1 NaN")


def test_wrong_shapes_list_all(
    task: DigitsTask, data: TaskData, local: dict[str, Tensor], peer: dict[str, Tensor], tmp_path: Path
) -> None:
    broken = dict(peer)
    broken["hidden1.weight"] = torch.zeros(64, 64)
    broken["output.bias"] = torch.zeros(5)
    delivered = _save(tmp_path / "shapes.safetensors", broken)

    result = evaluate_delivery(
        delivered, local=local, task=task, validation=data.validation[0], align=True, device="cpu"
    )

    assert result.decision == "invalid"
    assert result.reason == Reason.TENSOR_MISMATCH
    assert len(result.problems) == 2
    assert any(problem.startswith("hidden1.weight: shape") for problem in result.problems)
    assert any(problem.startswith("output.bias: shape") for problem in result.problems)


def test_mismatch_with_local_model(
    task: DigitsTask, data: TaskData, local: dict[str, Tensor], peer: dict[str, Tensor],
    tmp_path: Path,
) -> None:
    # The delivery fits the task's float32 model but not a float64 local model.
    wide_local = {name: tensor.double() for name, tensor in local.items()}
    delivered = _save(tmp_path / "peer.safetensors", peer)

    result = evaluate_delivery(
        delivered, local=wide_local, task=task, validation=data.validation[0], align=False,
        device="cpu",
    )

    assert result.reason == Reason.TENSOR_MISMATCH
    assert len(result.problems) == len(local)
    assert all("expected torch.float64" in problem for problem in result.problems)


def test_unreadable_file_invalid(
    task: DigitsTask, data: TaskData, local: dict[str, Tensor], tmp_path: Path
) -> None:
    delivered = tmp_path / "garbage.safetensors"
    delivered.write_bytes(b"\x80\x04\x95this is a pickle, not safetensors")

    result = evaluate_delivery(
        delivered, local=local, task=task, validation=data.validation[0], align=True, device="cpu"
    )

    assert result.decision == "invalid"
    assert result.reason == Reason.INVALID_WEIGHTS
    assert len(result.problems) == 1


def test_no_local_model_outright(
    task: DigitsTask, data: TaskData, peer: dict[str, Tensor], tmp_path: Path
) -> None:
    delivered = _save(tmp_path / "peer.safetensors", peer)

    result = evaluate_delivery(
        delivered, local=None, task=task, validation=data.validation[0], align=True, device="cpu"
    )

    expected = task.evaluate(peer, data.validation[0], device="cpu")
    assert result.decision == "outright"
    assert result.reason == Reason.OK
    assert result.merged is None
    assert result.gain is None
    assert result.accuracy_after == pytest.approx(expected.accuracy)
    assert result.loss_after == pytest.approx(expected.loss)


def test_no_task_outright(
    local: dict[str, Tensor], peer: dict[str, Tensor], tmp_path: Path
) -> None:
    delivered = _save(tmp_path / "peer.safetensors", peer)

    result = evaluate_delivery(
        delivered, local=local, task=None, validation=None, align=True, device="cpu"
    )

    assert result.decision == "outright"
    assert result.loss_after is None


def test_no_task_still_checks_finite(peer: dict[str, Tensor], tmp_path: Path) -> None:
    broken = {name: tensor.clone() for name, tensor in peer.items()}
    broken["hidden1.bias"][0] = math.inf
    delivered = _save(tmp_path / "inf.safetensors", broken)

    result = evaluate_delivery(
        delivered, local=None, task=None, validation=None, align=True, device="cpu"
    )

    assert result.reason == Reason.NON_FINITE


def test_merged_equals_interpolation(
    task: DigitsTask, data: TaskData, local: dict[str, Tensor], peer: dict[str, Tensor], tmp_path: Path
) -> None:
    delivered = _save(tmp_path / "peer.safetensors", peer)

    result = evaluate_delivery(
        delivered, local=local, task=task, validation=data.validation[0], align=False,
        device="cpu", min_gain=ANY_GAIN,
    )

    assert result.decision == "merge"
    assert result.merged is not None
    assert result.alpha is not None
    for name, mine in local.items():
        expected = (1.0 - result.alpha) * mine + result.alpha * peer[name]
        # Both sides compute the same float32 expression, so only rounding differs.
        torch.testing.assert_close(result.merged[name], expected, rtol=1e-6, atol=1e-6)
    after = task.evaluate(result.merged, data.validation[0], device="cpu")
    assert result.loss_after == pytest.approx(after.loss, rel=1e-6)


def test_subset_merges_only_its_tensors(
    task: DigitsTask, data: TaskData, local: dict[str, Tensor], tmp_path: Path
) -> None:
    # More training of the local model keeps its hidden units in place, so
    # its output layer fits the local hidden layer without alignment.
    further = dict(local)
    for epoch in range(EPOCHS, EPOCHS + 3):
        further = task.train_epoch(further, data.train[0], epoch=epoch, seed=0, device="cpu")
    subset = {name: further[name] for name in ("output.weight", "output.bias")}
    delivered = _save(tmp_path / "subset.safetensors", subset)

    result = evaluate_delivery(
        delivered, local=local, task=task, validation=data.validation[0], align=True,
        device="cpu", min_gain=ANY_GAIN,
    )

    assert result.decision == "merge"
    assert result.merged is not None
    assert result.alpha is not None
    assert result.merged.keys() == local.keys()
    assert torch.equal(result.merged["hidden1.weight"], local["hidden1.weight"])
    assert torch.equal(result.merged["hidden1.bias"], local["hidden1.bias"])
    for name, theirs in subset.items():
        expected = (1.0 - result.alpha) * local[name] + result.alpha * theirs
        torch.testing.assert_close(result.merged[name], expected, rtol=1e-6, atol=1e-6)


def test_alignment_recovers_permuted_copy(
    task: DigitsTask, data: TaskData, local: dict[str, Tensor], tmp_path: Path
) -> None:
    order = torch.randperm(128, generator=torch.Generator().manual_seed(3))
    permuted = {
        "hidden1.weight": local["hidden1.weight"][order],
        "hidden1.bias": local["hidden1.bias"][order],
        "output.weight": local["output.weight"][:, order],
        "output.bias": local["output.bias"],
    }
    delivered = _save(tmp_path / "permuted.safetensors", permuted)

    result = evaluate_delivery(
        delivered, local=local, task=task, validation=data.validation[0], align=True,
        device="cpu", min_gain=ANY_GAIN,
    )

    # Aligned, the copy equals the local model, so every merge is the local model.
    assert result.merged is not None
    for name, mine in local.items():
        torch.testing.assert_close(result.merged[name], mine, rtol=1e-6, atol=1e-6)


def test_train_job_matches_train_epoch(
    task: DigitsTask, data: TaskData, local: dict[str, Tensor]
) -> None:
    trained = train_job(task, local, data.train[0], epoch=EPOCHS, seed=0, device="cpu")

    expected = task.train_epoch(local, data.train[0], epoch=EPOCHS, seed=0, device="cpu")
    assert trained.keys() == expected.keys()
    for name, tensor in expected.items():
        assert trained[name].device.type == "cpu"
        assert torch.equal(trained[name], tensor), name


def test_local_task_data_empty_name() -> None:
    assert local_task_data(TaskSection(name="")) is None


def test_local_task_data_loads_shard(task: DigitsTask, data: TaskData) -> None:
    section = TaskSection(name="digits", orgs=2, index=1, split="iid", deduction=1.0, seed=0)

    loaded = local_task_data(section)

    assert loaded is not None
    assert loaded.task.name == "digits"
    assert torch.equal(loaded.train.indices, data.train[1].indices)
    assert torch.equal(loaded.validation.indices, data.validation[1].indices)
    assert local_task_data(section) is loaded


def test_local_task_data_bad_index() -> None:
    with pytest.raises(ValueError, match=r"\[task\] index is 2"):
        local_task_data(TaskSection(name="digits", orgs=2, index=2))


@pytest.mark.gpu
def test_cuda_matches_cpu(
    task: DigitsTask, data: TaskData, local: dict[str, Tensor], peer: dict[str, Tensor], tmp_path: Path
) -> None:
    delivered = _save(tmp_path / "peer.safetensors", peer)

    def run(device: str) -> Evaluation:
        return evaluate_delivery(
            delivered, local=local, task=task, validation=data.validation[0], align=True,
            device=device, min_gain=ANY_GAIN,
        )

    on_cpu = run("cpu")
    on_gpu = run("cuda:0")

    assert on_gpu.decision == "merge"
    # CUDA kernels sum in another order, so losses agree only approximately.
    assert on_gpu.loss_after == pytest.approx(on_cpu.loss_after, rel=1e-3)
    assert on_gpu.merged is not None
    assert all(tensor.device.type == "cpu" for tensor in on_gpu.merged.values())


@pytest.mark.gpu
def test_train_job_cuda_returns_cpu(
    task: DigitsTask, data: TaskData, local: dict[str, Tensor]
) -> None:
    trained = train_job(task, local, data.train[0], epoch=EPOCHS, seed=0, device="cuda:0")

    assert all(tensor.device.type == "cpu" for tensor in trained.values())
